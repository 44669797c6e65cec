"""HTTP routes of the inference server (FastAPI). Routes only map HTTP to the serving layer.

Route families:
- OpenAI (``/v1/*``): errors in OpenAI's ``{"error": {"message", "type", "param", "code"}}`` shape.
- TGI (``/generate``, ``/generate_stream``, ``/info``, ``POST /``): errors in TGI's
  ``{"error", "error_type"}`` shape, except 401, which is OpenAI's shape everywhere.
- Health and metrics: open, no key.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from berth import __version__
from berth.server.auth import KeyStore
from berth.server.metrics import CONTENT_TYPE, ServerMetrics
from berth.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorDetail,
    ErrorResponse,
    TGIErrorResponse,
    TGIGenerateRequest,
)
from berth.server.serving import ApiError, RequestContext, Serving
from berth.server.settings import ServerSettings

log = logging.getLogger(__name__)
access_log = logging.getLogger("berth.access")

GENERATION_ROUTES = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/generate", "/generate_stream", "/"}
)
TGI_ROUTES = frozenset({"/generate", "/generate_stream", "/info", "/"})
KNOWN_ROUTES = GENERATION_ROUTES | TGI_ROUTES | {"/v1/models", "/health/live", "/health/ready", "/metrics"}
QUIET_ROUTES = frozenset({"/health/live", "/health/ready", "/metrics"})
DISCONNECT_POLL_SECONDS = 0.25
T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected before its response started (answered 499, never seen by it)."""


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class Phase(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


@dataclass
class ServerState:
    """What the routes share: settings, keys, metrics, the serving layer once loaded, the phase."""

    settings: ServerSettings
    keys: KeyStore
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    serving: Serving | None = None
    phase: Phase = Phase.LOADING
    in_flight: int = 0
    load_error: str | None = None

    def set_phase(self, phase: Phase) -> None:
        self.phase = phase
        self.metrics.ready.set(1 if phase is Phase.READY else 0)
        self.metrics.draining.set(1 if phase is Phase.DRAINING else 0)


# ------------------------------------------------------------------------------ error rendering


def _is_tgi(path: str) -> bool:
    return path in TGI_ROUTES


def error_response(path: str, err: ApiError) -> JSONResponse:
    if _is_tgi(path) and err.status != 401:
        status = 422 if err.status == 400 else err.status
        error_type = {422: "validation", 429: "overloaded", 503: "overloaded", 404: "validation"}.get(
            status, "generation"
        )
        body: BaseModel = TGIErrorResponse(error=err.message, error_type=error_type)
    else:
        status = err.status
        body = ErrorResponse(
            error=ErrorDetail(message=err.message, type=err.type, param=err.param, code=err.code)
        )
    return JSONResponse(body.model_dump(), status_code=status, headers=err.headers)


_BRANCH_MARKERS = frozenset({"str", "int", "float", "bool", "none", "list", "dict"})


def _param_of(loc: tuple[Any, ...]) -> str:
    parts = [p for p in loc if p != "body"]
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif str(part) in _BRANCH_MARKERS or str(part).startswith(("function-", "union[", "list[", "dict[")):
            continue  # pydantic's union-branch markers
        else:
            out += ("." if out else "") + str(part)
    return out or "body"


def validation_error(exc: RequestValidationError) -> ApiError:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
    param = _param_of(tuple(first.get("loc", ())))
    message = f"{param}: {first.get('msg', 'invalid value')}"
    if first.get("type") == "json_invalid":
        param, message = "body", f"the request body is not valid JSON: {first.get('msg')}"
    return ApiError(400, message, param=param, code="invalid_parameter")


# ---------------------------------------------------------------------- access log + counters


class AccessLogMiddleware:
    """Pure ASGI middleware: one JSON access-log line and a request count per request.

    It creates the request's ``RequestContext`` (``request.state.ctx``), which auth and serving
    fill in; streamed responses are logged when their last byte is sent (or the client left).
    """

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        route = path if path in KNOWN_ROUTES else "other"
        ctx = RequestContext(route=route)
        scope.setdefault("state", {})["ctx"] = ctx
        status = 500
        generation = route in GENERATION_ROUTES and scope["method"] == "POST"

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        if generation:
            self.state.in_flight += 1
            self.state.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        except asyncio.CancelledError:
            status = 499  # client closed the connection
            raise
        finally:
            if generation:
                self.state.in_flight -= 1
                self.state.metrics.in_flight.dec()
            self.state.metrics.requests.labels(route, str(status)).inc()
            if route not in QUIET_ROUTES:
                line = {
                    "ts": round(time.time(), 3),
                    "method": scope["method"],
                    "path": path,
                    "route": route,
                    "status": status,
                    "latency_ms": round((time.monotonic() - ctx.arrival) * 1000, 1),
                    **ctx.log_fields(self.state.settings.log_content),
                }
                access_log.info("%s", json.dumps(line, ensure_ascii=False))


# ------------------------------------------------------------------------------------ the app


def create_app(
    state: ServerState,
    on_startup: Callable[[], Coroutine[Any, Any, None]] | None = None,
    on_shutdown: Callable[[], Awaitable[None]] | None = None,
) -> FastAPI:
    """Build the FastAPI app. ``on_startup`` runs as a background task (loading does not block
    liveness); ``on_shutdown`` runs when the server stops."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        task: asyncio.Task[None] | None = asyncio.create_task(on_startup()) if on_startup else None
        try:
            yield
        finally:
            if task is not None and not task.done():
                task.cancel()
            if on_shutdown is not None:
                await on_shutdown()

    app = FastAPI(
        title="Berth inference server", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None
    )
    app.add_middleware(AccessLogMiddleware, state=state)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        _note_error(request, exc.message)
        return error_response(request.url.path, exc)

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            err = ApiError(404, f"no such route: {request.method} {request.url.path}", code="not_found")
        elif exc.status_code == 405:
            err = ApiError(
                405,
                f"{request.method} is not allowed on {request.url.path}",
                code="method_not_allowed",
                headers=dict(exc.headers or {}),
            )
        else:
            err = ApiError(exc.status_code, str(exc.detail), code="http_error")
        _note_error(request, err.message)
        return error_response(request.url.path, err)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = validation_error(exc)
        _note_error(request, err.message)
        return error_response(request.url.path, err)

    def _note_error(request: Request, message: str) -> None:
        ctx = getattr(request.state, "ctx", None)
        if isinstance(ctx, RequestContext):
            ctx.error = message[:300]

    def ctx_of(request: Request) -> RequestContext:
        ctx = getattr(request.state, "ctx", None)
        if not isinstance(ctx, RequestContext):
            ctx = RequestContext(route=request.url.path)
            request.state.ctx = ctx
        return ctx

    async def require_key(request: Request) -> str:
        key_id = state.keys.authenticate(request.headers.get("authorization"))
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

    def serving() -> Serving:
        if state.phase is Phase.DRAINING:
            raise ApiError(
                503,
                "The server is shutting down and no longer accepts requests",
                type_="service_unavailable",
                code="draining",
                headers={"Retry-After": "1"},
            )
        if state.serving is None or state.phase is not Phase.READY:
            raise ApiError(
                503,
                f"The model is not ready ({state.phase.value})",
                type_="service_unavailable",
                code="not_ready",
                headers={"Retry-After": "5"},
            )
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
                ctx = ctx_of(request)
                ctx.error = "client disconnected"
                raise ClientGone

    def sse(path: str, body: AsyncIterator[str]) -> StreamingResponse:
        return StreamingResponse(
            _guard_stream(path, body), media_type="text/event-stream", headers=SSE_HEADERS
        )

    auth = [Depends(require_key)]

    # ---- health and metrics (open)

    @app.get("/health/live")
    async def live() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/health/ready")
    async def ready() -> JSONResponse:
        ok = state.phase is Phase.READY
        body: dict[str, Any] = {"ready": ok, "status": state.phase.value}
        if state.load_error:
            body["error"] = state.load_error
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    # ---- OpenAI

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict[str, Any]:
        return serving().model_list().model_dump()

    def reply(request: Request, result: BaseModel | AsyncIterator[str]) -> Response:
        """A whole answer as JSON, a stream as server-sent events."""
        if isinstance(result, BaseModel):
            return JSONResponse(result.model_dump())
        return sse(request.url.path, result)

    @app.post("/v1/chat/completions", dependencies=auth, response_model=None)
    async def chat(body: ChatCompletionRequest, request: Request) -> Any:
        return reply(request, await until_disconnect(request, serving().chat(body, ctx_of(request))))

    @app.post("/v1/completions", dependencies=auth, response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return reply(request, await until_disconnect(request, serving().completion(body, ctx_of(request))))

    # ---- TGI

    @app.get("/info", dependencies=auth)
    async def info() -> dict[str, Any]:
        return serving().tgi_info(__version__).model_dump()

    @app.post("/generate", dependencies=auth, response_model=None)
    async def generate(body: TGIGenerateRequest, request: Request) -> Any:
        result = await until_disconnect(request, serving().tgi_generate(body, ctx_of(request)))
        return JSONResponse(result.model_dump())

    @app.post("/generate_stream", dependencies=auth, response_model=None)
    async def generate_stream(body: TGIGenerateRequest, request: Request) -> Any:
        stream = await until_disconnect(request, serving().tgi_generate_stream(body, ctx_of(request)))
        return sse(request.url.path, stream)

    @app.post("/", dependencies=auth, response_model=None)
    async def compat_generate(body: TGIGenerateRequest, request: Request) -> Any:
        """TGI's compatibility route: ``stream`` picks /generate_stream, else a one-item list."""
        if body.stream:
            stream = await until_disconnect(request, serving().tgi_generate_stream(body, ctx_of(request)))
            return sse(request.url.path, stream)
        result = await until_disconnect(request, serving().tgi_generate(body, ctx_of(request)))
        return JSONResponse([result.model_dump()])

    return app


async def _guard_stream(path: str, body: AsyncIterator[str]) -> AsyncIterator[str]:
    """Pass SSE chunks through; an error after the headers went out becomes a final error event."""
    try:
        async for chunk in body:
            yield chunk
    except ApiError as exc:
        yield f"data: {bytes(error_response(path, exc).body).decode()}\n\n"
    except Exception as exc:
        log.exception("stream failed")
        detail = ErrorDetail(message=f"generation failed: {exc}", type="server_error", code="internal_error")
        yield f"data: {ErrorResponse(error=detail).model_dump_json()}\n\n"
    finally:
        aclose = getattr(body, "aclose", None)
        if aclose is not None:
            await aclose()
