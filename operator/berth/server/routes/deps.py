"""What the routes of every family depend on: the state, the API key, the serving layer, the
request context, running work until the client goes away, and replying (JSON or SSE)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

from fastapi import Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from berth.server import http_errors
from berth.server.auth import FORWARDED_KEY_ID_HEADER
from berth.server.serving import ApiError, RequestContext, Serving
from berth.server.serving import errors as serving_errors
from berth.server.state import Phase, ServerState

DISCONNECT_POLL_SECONDS = 0.25
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
T = TypeVar("T")


def server_state(request: Request) -> ServerState:
    state: ServerState = request.app.state.server
    return state


def ctx_of(request: Request) -> RequestContext:
    ctx = getattr(request.state, "ctx", None)
    if not isinstance(ctx, RequestContext):
        ctx = RequestContext(route=request.url.path)
        request.state.ctx = ctx
    return ctx


async def require_key(request: Request) -> str:
    key_id = server_state(request).keys.authenticate_forwarded(
        request.headers.get("authorization"), request.headers.get(FORWARDED_KEY_ID_HEADER)
    )
    if key_id is None:
        raise ApiError(
            401,
            "Incorrect or missing API key. Send 'Authorization: Bearer <key>'.",
            type_="invalid_request_error",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    ctx_of(request).key_id = key_id
    return key_id


AUTH = [Depends(require_key)]


def serving(request: Request) -> Serving:
    """The serving layer, or 503 while the model loads or the server drains."""
    state = server_state(request)
    if state.phase is Phase.DRAINING:
        raise serving_errors.draining()
    if state.serving is None or state.phase is not Phase.READY:
        raise serving_errors.not_ready(state.phase.value)
    return state.serving


async def until_disconnect(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Run ``work``; cancel it (aborting its engine requests) if the client goes away first.

    Streams are covered by Starlette once they started; this covers the time before the first
    token (waiting in the queue, prefill) and whole non-streamed generations.
    """
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, ApiError):
                await task
            ctx_of(request).error = "client disconnected"
            raise http_errors.ClientGone


def sse(body: AsyncIterator[str], tgi: bool = False) -> StreamingResponse:
    return StreamingResponse(
        http_errors.guard_stream(body, tgi=tgi), media_type="text/event-stream", headers=SSE_HEADERS
    )


def reply(result: BaseModel | AsyncIterator[str]) -> Response:
    """A whole answer as JSON, a stream as server-sent events."""
    if isinstance(result, BaseModel):
        return JSONResponse(result.model_dump())
    return sse(result)
