"""OpenAI's API: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from berth.server.protocol import ChatCompletionRequest, CompletionRequest
from berth.server.routes.deps import AUTH, ctx_of, reply, serving, until_disconnect

router = APIRouter(prefix="/v1", dependencies=AUTH)


@router.get("/models")
async def models(request: Request) -> dict[str, Any]:
    return serving(request).model.model_list().model_dump()


@router.post("/chat/completions", response_model=None, tags=["generation"])
async def chat(body: ChatCompletionRequest, request: Request) -> Response:
    return reply(await until_disconnect(request, serving(request).chat.create(body, ctx_of(request))))


@router.post("/completions", response_model=None, tags=["generation"])
async def completions(body: CompletionRequest, request: Request) -> Response:
    return reply(await until_disconnect(request, serving(request).completions.create(body, ctx_of(request))))
