"""The gateway's HTTP surface: authenticate, resolve the model, admit against quotas, relay.

OpenAI routes (`/v1/chat/completions`, `/v1/completions`, `/v1/models`), the TGI routes
(`/generate`, `/generate_stream`; the model comes from the body's ``model`` or the ``X-Berth-Model``
header) and DashScope's native generation route, which the instances serve themselves (the gateway
relays it unchanged). Errors are OpenAI-shaped, DashScope-shaped (``{"code", "message",
"request_id"}``) on the DashScope route (errors.py). A request is retried on another endpoint on a
connect failure, 503 or 429, and only before anything reached the client; a stream is relayed event
by event (relay.py, which also holds `Gateway`, the state; it is re-exported here).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from berth.gateway.errors import DASHSCOPE_PATH, as_dashscope, error, not_found
from berth.gateway.registry import Key
from berth.gateway.relay import Call, Gateway, forward

__all__ = ["Gateway", "create_app"]

log = logging.getLogger(__name__)


def _bearer(request: Request) -> str | None:
    scheme, _, token = (request.headers.get("authorization") or "").strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _authenticate(gw: Gateway, request: Request) -> Key | JSONResponse:
    key = gw.registry.authenticate(_bearer(request))
    if key is None:
        return error(
            401,
            "Incorrect, revoked or missing API key. Send 'Authorization: Bearer <key>'.",
            "invalid_request_error",
            "invalid_api_key",
            {"WWW-Authenticate": "Bearer"},
        )
    return key


async def _read_json(gw: Gateway, request: Request) -> dict[str, Any] | JSONResponse:
    raw = await request.body()
    if len(raw) > gw.settings.max_body_bytes:
        return error(413, "Request body too large.", "invalid_request_error", "body_too_large")
    try:
        body = json.loads(raw)
    except ValueError:
        return error(400, "The body is not valid JSON.", "invalid_request_error", "invalid_json")
    if not isinstance(body, dict):
        return error(400, "The body must be a JSON object.", "invalid_request_error", "invalid_json")
    return body


async def _proxy(gw: Gateway, request: Request, path: str) -> Response:
    key = _authenticate(gw, request)
    if isinstance(key, JSONResponse):
        return key
    body = await _read_json(gw, request)
    if isinstance(body, JSONResponse):
        return body
    tgi = path.startswith("/generate")
    model = body.pop("model", None) if tgi else body.get("model")
    model = model or request.headers.get("x-berth-model")
    if not isinstance(model, str) or not model:
        return error(400, "The request names no `model`.", "invalid_request_error", "model_required")
    target = gw.registry.resolve(key, model)
    if target is None:
        return not_found(model)
    refusal = gw.q.admit(key)
    if refusal is not None:
        gw.metrics.rate_limited.labels(key.namespace, key.key_id, refusal.limit).inc()
        return error(
            429,
            refusal.message,
            "rate_limit_exceeded",
            refusal.limit,
            {"Retry-After": str(refusal.retry_after)},
        )
    if path == DASHSCOPE_PATH:  # DashScope native: SSE when asked by header; usage is in every event
        sse = (request.headers.get("x-dashscope-sse") or "").strip().lower() == "enable" or (
            "text/event-stream" in (request.headers.get("accept") or "")
        )
        body["model"] = target.model
        call = Call(key, target, path, body, sse, True)
        if sse:
            call.extra_headers["x-dashscope-sse"] = "enable"
        return await forward(gw, call)
    stream = path == "/generate_stream" or (not tgi and bool(body.get("stream")))
    options = body.get("stream_options")
    client_usage = isinstance(options, dict) and bool(options.get("include_usage"))
    if not tgi:
        body["model"] = target.model
        if stream:
            body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    call = Call(key, target, path, body, stream, client_usage)
    return await forward(gw, call)


def create_app(gw: Gateway) -> FastAPI:
    app = FastAPI(title="Berth gateway", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gateway = gw

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await _proxy(gw, request, "/v1/chat/completions")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _proxy(gw, request, "/v1/completions")

    @app.post("/generate")
    async def generate(request: Request) -> Response:
        return await _proxy(gw, request, "/generate")

    @app.post("/generate_stream")
    async def generate_stream(request: Request) -> Response:
        return await _proxy(gw, request, "/generate_stream")

    @app.post(DASHSCOPE_PATH)
    async def dashscope(request: Request) -> Response:
        return as_dashscope(await _proxy(gw, request, DASHSCOPE_PATH))

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        key = _authenticate(gw, request)
        if isinstance(key, JSONResponse):
            return key
        data = [
            {"id": f"{inst.namespace}/{model}", "object": "model", "created": 0, "owned_by": inst.namespace}
            for inst, model in gw.registry.models_for(key)
        ]
        return JSONResponse({"object": "list", "data": data})

    @app.get("/health/live")
    async def live() -> Response:
        return JSONResponse({"status": "ok"})

    @app.get("/health/ready")
    async def ready() -> Response:
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
