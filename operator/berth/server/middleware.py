"""The access log and request counters, as pure ASGI middleware."""

from __future__ import annotations

import asyncio
import json
import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from berth.server.routes import RouteTable
from berth.server.serving import RequestContext
from berth.server.state import ServerState

access_log = logging.getLogger("berth.access")


class AccessLogMiddleware:
    """One JSON access-log line and a request count per request.

    It creates the request's ``RequestContext`` (``request.state.ctx``), which auth and serving
    fill in; streamed responses are logged when their last byte is sent (or the client left).
    Generation requests count as in flight while they run (draining waits for them).
    """

    def __init__(self, app: ASGIApp, state: ServerState, routes: RouteTable) -> None:
        self.app = app
        self.state = state
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        route = path if path in self.routes.known else "other"
        ctx = RequestContext(route=route)
        scope.setdefault("state", {})["ctx"] = ctx
        status = 500
        generation = route in self.routes.generation and scope["method"] == "POST"

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        metrics = self.state.metrics
        if generation:
            self.state.in_flight += 1
            metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        except asyncio.CancelledError:
            status = 499  # client closed the connection
            raise
        finally:
            if generation:
                self.state.in_flight -= 1
                metrics.in_flight.dec()
            metrics.requests.labels(route, str(status)).inc()
            if route not in self.routes.quiet:
                self._log(scope, path, route, status, ctx)

    def _log(self, scope: Scope, path: str, route: str, status: int, ctx: RequestContext) -> None:
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
