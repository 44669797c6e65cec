"""Health and metrics: open, no key."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from berth.server.metrics import CONTENT_TYPE
from berth.server.routes.deps import server_state
from berth.server.state import Phase

router = APIRouter()


@router.get("/health/live")
async def live() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/health/ready")
async def ready(request: Request) -> JSONResponse:
    state = server_state(request)
    ok = state.phase is Phase.READY
    body: dict[str, Any] = {"ready": ok, "status": state.phase.value}
    if state.load_error:
        body["error"] = state.load_error
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(server_state(request).metrics.render(), media_type=CONTENT_TYPE)
