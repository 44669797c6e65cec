"""Errors as HTTP answers: OpenAI's error shape, TGI's on TGI routes (401 is OpenAI's there too),
DashScope's on the DashScope route,
FastAPI's validation errors as a 400 naming the field, and errors after a stream started."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Collection
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from berth.server.protocol import ErrorDetail, ErrorResponse, TGIErrorResponse
from berth.server.serving import ApiError, RequestContext
from berth.server.serving import dashscope as dashscope_serving

log = logging.getLogger(__name__)

_TGI_ERROR_TYPES = {422: "validation", 429: "overloaded", 503: "overloaded", 404: "validation"}
_BRANCH_MARKERS = frozenset({"str", "int", "float", "bool", "none", "list", "dict"})


def error_response(err: ApiError, tgi: bool = False, dashscope_request_id: str | None = None) -> JSONResponse:
    """``err`` in OpenAI's shape, TGI's (``tgi``), or DashScope's (when ``dashscope_request_id`` is given)."""
    if dashscope_request_id is not None:
        status = err.status
        body: BaseModel = dashscope_serving.error_body(err, dashscope_request_id)
    elif tgi and err.status != 401:
        status = 422 if err.status == 400 else err.status
        body = TGIErrorResponse(error=err.message, error_type=_TGI_ERROR_TYPES.get(status, "generation"))
    else:
        status = err.status
        body = ErrorResponse(
            error=ErrorDetail(message=err.message, type=err.type, param=err.param, code=err.code)
        )
    return JSONResponse(body.model_dump(), status_code=status, headers=err.headers)


def _param_of(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in (p for p in loc if p != "body"):
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


def http_error(request: Request, exc: StarletteHTTPException) -> ApiError:
    if exc.status_code == 404:
        return ApiError(404, f"no such route: {request.method} {request.url.path}", code="not_found")
    if exc.status_code == 405:
        return ApiError(
            405,
            f"{request.method} is not allowed on {request.url.path}",
            code="method_not_allowed",
            headers=dict(exc.headers or {}),
        )
    return ApiError(exc.status_code, str(exc.detail), code="http_error")


class ClientGone(Exception):
    """The client disconnected before its response started (answered 499, never seen by it)."""


def install(app: FastAPI, tgi_paths: Collection[str], dashscope_paths: Collection[str] = ()) -> None:
    """Render every error of the app in its route family's shape; note it for the access log."""

    def answer(request: Request, err: ApiError) -> JSONResponse:
        ctx = getattr(request.state, "ctx", None)
        if isinstance(ctx, RequestContext):
            ctx.error = err.message[:300]
        if request.url.path in dashscope_paths:
            rid = ctx.request_id if isinstance(ctx, RequestContext) and ctx.request_id else ""
            rid = rid or dashscope_serving.new_request_id()
            if isinstance(ctx, RequestContext):
                ctx.request_id = rid
            return error_response(err, dashscope_request_id=rid)
        return error_response(err, tgi=request.url.path in tgi_paths)

    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return answer(request, exc)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        return answer(request, http_error(request, exc))

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return answer(request, validation_error(exc))

    async def on_client_gone(request: Request, exc: Exception) -> Response:
        return Response(status_code=499)

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(ClientGone, on_client_gone)


async def guard_stream(body: AsyncIterator[str], tgi: bool = False) -> AsyncIterator[str]:
    """Pass SSE chunks through; an error after the headers went out becomes a final error event."""
    try:
        async for chunk in body:
            yield chunk
    except ApiError as exc:
        yield f"data: {bytes(error_response(exc, tgi).body).decode()}\n\n"
    except Exception as exc:
        log.exception("stream failed")
        detail = ErrorDetail(message=f"generation failed: {exc}", type="server_error", code="internal_error")
        yield f"data: {ErrorResponse(error=detail).model_dump_json()}\n\n"
    finally:
        aclose = getattr(body, "aclose", None)
        if aclose is not None:
            await aclose()
