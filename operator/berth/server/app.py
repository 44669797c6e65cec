"""The inference server's FastAPI app: the routers of each API family, the error renderers and the
access-log middleware, around one ``ServerState`` kept in ``app.state.server``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from berth import __version__
from berth.server import http_errors
from berth.server.middleware import AccessLogMiddleware
from berth.server.routes import ROUTERS, ROUTES
from berth.server.state import Phase, ServerState

__all__ = ["Phase", "ServerState", "create_app"]


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
    app.state.server = state
    app.add_middleware(AccessLogMiddleware, state=state, routes=ROUTES)
    http_errors.install(app, ROUTES.tgi, ROUTES.dashscope)
    for router in ROUTERS:
        app.include_router(router)
    return app
