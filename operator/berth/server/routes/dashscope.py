"""DashScope's native API: ``POST /api/v1/services/aigc/text-generation/generation``.

Errors are in DashScope's ``{"code", "message", "request_id"}`` shape (401 included), so
``dashscope.Generation.call`` reports them as it does for the hosted service.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from berth.server.protocol import DashScopeRequest, DashScopeResponse
from berth.server.routes.deps import AUTH, SSE_HEADERS, ctx_of, serving, until_disconnect
from berth.server.serving.dashscope import DASHSCOPE_PATH, wants_sse

router = APIRouter(dependencies=AUTH)


@router.post(DASHSCOPE_PATH, response_model=None, tags=["generation"])
async def generation(body: DashScopeRequest, request: Request) -> Response:
    stream = wants_sse(request.headers.get("x-dashscope-sse"), request.headers.get("accept"))
    result = await until_disconnect(request, serving(request).dashscope.create(body, ctx_of(request), stream))
    if isinstance(result, DashScopeResponse):
        return JSONResponse(result.model_dump(exclude_none=True), headers={"x-request-id": result.request_id})
    headers = {**SSE_HEADERS, "X-DashScope-SSE": "enable", "x-request-id": ctx_of(request).request_id}
    return StreamingResponse(result, media_type="text/event-stream", headers=headers)
