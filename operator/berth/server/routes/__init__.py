"""HTTP routes, one ``APIRouter`` per API family; they only map HTTP to the serving layer.

- ``openai``: ``/v1/*``, errors in OpenAI's ``{"error": {"message", "type", "param", "code"}}`` shape.
- ``tgi``: ``/generate``, ``/generate_stream``, ``/info``, ``POST /``; errors in TGI's
  ``{"error", "error_type"}`` shape, except 401, which is OpenAI's shape everywhere.
- ``dashscope``: DashScope's ``/api/v1/services/aigc/text-generation/generation``; errors (401 too)
  in DashScope's ``{"code", "message", "request_id"}`` shape.
- ``health``: ``/health/*`` and ``/metrics``, open, no key.

Routes tagged ``generation`` count as in-flight work (draining waits for them); the access log and
the error renderer read the families from the routers themselves (``RouteTable``), so no list of
paths repeats the decorators.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import APIRouter
from fastapi.routing import APIRoute

from berth.server.routes import dashscope, health, openai, tgi

GENERATION = "generation"
ROUTERS: tuple[APIRouter, ...] = (health.router, openai.router, tgi.router, dashscope.router)


def _paths(router: APIRouter, tag: str | None = None) -> frozenset[str]:
    return frozenset(
        r.path for r in router.routes if isinstance(r, APIRoute) and (tag is None or tag in (r.tags or []))
    )


@dataclass(frozen=True)
class RouteTable:
    """Paths by family, read off the routers."""

    known: frozenset[str]
    generation: frozenset[str]
    tgi: frozenset[str]
    dashscope: frozenset[str]
    quiet: frozenset[str]  # not in the access log (probes and scrapes)

    @classmethod
    def from_routers(cls) -> RouteTable:
        return cls(
            known=frozenset().union(*(_paths(r) for r in ROUTERS)),
            generation=frozenset().union(*(_paths(r, GENERATION) for r in ROUTERS)),
            tgi=_paths(tgi.router),
            dashscope=_paths(dashscope.router),
            quiet=_paths(health.router),
        )


ROUTES = RouteTable.from_routers()
