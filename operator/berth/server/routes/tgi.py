"""TGI's API: ``/generate``, ``/generate_stream``, ``/info`` and the compatibility route ``POST /``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from berth import __version__
from berth.server.protocol import TGIGenerateRequest
from berth.server.routes.deps import AUTH, ctx_of, serving, sse, until_disconnect

router = APIRouter(dependencies=AUTH)


@router.get("/info")
async def info(request: Request) -> dict[str, Any]:
    return serving(request).tgi.info(__version__).model_dump()


@router.post("/generate", response_model=None, tags=["generation"])
async def generate(body: TGIGenerateRequest, request: Request) -> Response:
    result = await until_disconnect(request, serving(request).tgi.generate(body, ctx_of(request)))
    return JSONResponse(result.model_dump())


@router.post("/generate_stream", response_model=None, tags=["generation"])
async def generate_stream(body: TGIGenerateRequest, request: Request) -> Response:
    stream = await until_disconnect(request, serving(request).tgi.generate_stream(body, ctx_of(request)))
    return sse(stream, tgi=True)


@router.post("/", response_model=None, tags=["generation"])
async def compat_generate(body: TGIGenerateRequest, request: Request) -> Response:
    """TGI's compatibility route: ``stream`` picks /generate_stream, else a one-item list."""
    tgi = serving(request).tgi
    if body.stream:
        return sse(await until_disconnect(request, tgi.generate_stream(body, ctx_of(request))), tgi=True)
    result = await until_disconnect(request, tgi.generate(body, ctx_of(request)))
    return JSONResponse([result.model_dump()])
