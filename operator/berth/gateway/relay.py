"""Relaying one admitted request to an instance: pick an endpoint, retry on a connect failure, 503 or
429 while nothing has reached the client, relay a stream event by event (reading ``usage`` from it and
stripping what the client did not ask for), hold a request while a scaled-to-zero instance wakes, and
account for the request when it ends (balancer, quotas, metrics, usage).

`Gateway` is the state a relay works with; app.py authenticates, resolves the model and admits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
from fastapi.responses import JSONResponse, Response, StreamingResponse

from berth.gateway.balancer import Balancer
from berth.gateway.errors import DASHSCOPE_PATH, dashscope_error_body, error
from berth.gateway.metrics import GatewayMetrics
from berth.gateway.quota import Quotas
from berth.gateway.registry import Endpoint, Instance, Key, Registry, Target, instance_credential
from berth.gateway.settings import GatewaySettings, MasterKey
from berth.gateway.usage import Delta, UsageBook

log = logging.getLogger(__name__)


KEY_ID_HEADER = "x-berth-key-id"


RETRY_STATUSES = frozenset({429, 503})


_NULL_USAGE = re.compile(rb',\s*"usage"\s*:\s*null|"usage"\s*:\s*null\s*,')


_PASS_HEADERS = ("content-type", "x-request-id", "retry-after", "x-dashscope-sse")


def _error_event(call: Call, body: bytes) -> bytes:
    """An error inside a stream that had already started (held while the instance woke)."""
    if call.path == DASHSCOPE_PATH:
        return b"id:1\nevent:error\n:HTTP_STATUS/%d\ndata:%s\n\n" % (call.status, dashscope_error_body(body))
    return b"data: " + body + b"\n\n"


@dataclass
class Gateway:
    settings: GatewaySettings
    registry: Registry
    client: httpx.AsyncClient
    master_key: bytes | None = None
    master: MasterKey = field(default_factory=lambda: MasterKey(None))  # main: the file, re-read
    balancer: Balancer = field(default_factory=Balancer)
    metrics: GatewayMetrics = field(default_factory=GatewayMetrics)
    usage: UsageBook = field(default_factory=UsageBook)
    quotas: Quotas | None = None
    waker: Callable[[Instance], Awaitable[None]] | None = None  # scales a ModelDeployment up from zero

    def __post_init__(self) -> None:
        if self.master.path is None and self.master.key is None:
            self.master.key = self.master_key  # a fixed key (tests)
        if self.quotas is None:
            self.quotas = Quotas(self.settings.replicas)

    @property
    def q(self) -> Quotas:
        assert self.quotas is not None
        return self.quotas

    def upstream_headers(self, target: Target, key: Key, master: bytes | None = None) -> dict[str, str]:
        """The headers for an instance: its credential from the current master key, or from `master`
        (the key before the last rotation, for the retry of a 401)."""
        headers = {"content-type": "application/json", KEY_ID_HEADER: key.key_id}
        if master is None:
            master = self.master.current()
        if master is not None:
            cred = instance_credential(master, target.instance.namespace, target.instance.name)
            headers["authorization"] = f"Bearer {cred}"
        return headers


def _usage_of(body: Any) -> tuple[int, int]:
    usage = body.get("usage") if isinstance(body, dict) else None
    if isinstance(usage, dict):
        if "input_tokens" in usage:  # DashScope
            return int(usage.get("input_tokens") or 0), int(usage.get("output_tokens") or 0)
        return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    details = body.get("details") if isinstance(body, dict) else None
    if isinstance(details, dict):  # TGI
        return 0, int(details.get("generated_tokens") or 0)
    return 0, 0


@dataclass
class Call:
    key: Key
    target: Target
    path: str
    body: dict[str, Any]
    stream: bool
    client_usage: bool
    started: float = field(default_factory=time.monotonic)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    status: int = 0
    extra_headers: dict[str, str] = field(default_factory=dict)


class _SSEUsage:
    """Splits an upstream SSE byte stream into events, reads ``usage``, strips it when asked."""

    def __init__(self, call: Call) -> None:
        self.call = call
        self.buf = b""

    def feed(self, data: bytes) -> bytes:
        self.buf += data
        end = self.buf.rfind(b"\n\n")
        if end < 0:
            return b""
        ready, self.buf = self.buf[: end + 2], self.buf[end + 2 :]
        if b'"usage"' not in ready and b'"generated_tokens"' not in ready:
            return ready
        return b"".join(self._event(e + b"\n\n") for e in ready.split(b"\n\n")[:-1])

    def _event(self, event: bytes) -> bytes:
        if b'"usage"' not in event and b'"generated_tokens"' not in event:
            return event
        if _NULL_USAGE.search(event) and b'"generated_tokens"' not in event:  # the common chunk: no parse
            return event if self.call.client_usage else _NULL_USAGE.sub(b"", event)
        payload = event.partition(b"data:")[2].strip()
        try:
            chunk = json.loads(payload)
        except ValueError:
            return event
        prompt, completion = _usage_of(chunk)
        if prompt or completion:
            self.call.prompt_tokens, self.call.completion_tokens = prompt, completion
        if self.call.client_usage or self.call.path.startswith("/generate"):
            return event
        if isinstance(chunk, dict) and chunk.get("usage") and not chunk.get("choices"):
            return b""  # the usage-only chunk we asked for ourselves
        return _NULL_USAGE.sub(b"", event)

    def tail(self) -> bytes:
        rest, self.buf = self.buf, b""
        return rest


async def _relay(
    gw: Gateway, call: Call, endpoint: Endpoint, resp: httpx.Response
) -> AsyncGenerator[bytes, None]:
    parser = _SSEUsage(call)
    try:
        async for data in resp.aiter_raw():
            out = parser.feed(data)
            if out:
                yield out
        rest = parser.tail()
        if rest:
            yield rest
    finally:
        await resp.aclose()
        _done(gw, call, endpoint)


def _done(gw: Gateway, call: Call, endpoint: Endpoint | None) -> None:

    inst = call.target.instance
    if endpoint is not None:
        gw.balancer.release(endpoint)
    gw.metrics.in_flight.labels(inst.namespace, inst.served_name).dec()
    tokens = call.prompt_tokens + call.completion_tokens
    gw.q.finish(call.key.key_id, tokens)
    labels = (inst.namespace, inst.served_name, call.key.key_id)
    gw.metrics.requests.labels(*labels, str(call.status)).inc()
    if call.prompt_tokens:
        gw.metrics.tokens.labels(*labels, "prompt").inc(call.prompt_tokens)
    if call.completion_tokens:
        gw.metrics.tokens.labels(*labels, "completion").inc(call.completion_tokens)
    if 200 <= call.status < 300:
        gw.usage.record(
            call.key.namespace,
            call.key.name,
            Delta(1, call.prompt_tokens, call.completion_tokens, datetime.now(UTC)),
        )


async def _attempt(gw: Gateway, call: Call, endpoint: Endpoint) -> httpx.Response | None:
    """One request to an endpoint. A 401 is retried once with the credential of the master key before
    the last rotation, while it is kept (`BERTH_GATEWAY_PREVIOUS_MASTER_KEY_GRACE_SECONDS` after the
    change): the instance's copy of its gateway-key Secret may not be updated yet (MasterKey)."""
    resp = await _send(gw, call, endpoint)
    if resp is None or resp.status_code != 401:
        return resp
    previous = gw.master.previous
    if previous is not None:
        await resp.aclose()
        inst = call.target.instance
        gw.metrics.retries.labels(inst.namespace, inst.served_name, "previous_master_key").inc()
        resp = await _send(gw, call, endpoint, previous)
    return resp


async def _send(
    gw: Gateway, call: Call, endpoint: Endpoint, master: bytes | None = None
) -> httpx.Response | None:
    req = gw.client.build_request(
        "POST",
        endpoint.url + call.path,
        content=json.dumps(call.body).encode(),
        headers={**gw.upstream_headers(call.target, call.key, master), **call.extra_headers},
    )
    try:
        return await gw.client.send(req, stream=True)
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        log.info("connect to %s failed: %s", endpoint.url, exc.__class__.__name__)
        return None


@dataclass
class _Opened:
    endpoint: Endpoint
    resp: httpx.Response


async def _open(gw: Gateway, call: Call) -> _Opened | Response:
    """Try endpoints until one answers with something other than 429/503 (nothing has reached the
    client yet, so retrying is safe); return the open upstream response, or the final error."""
    inst = call.target.instance
    tried: list[Endpoint] = []
    last: httpx.Response | None = None
    last_body = b""
    for _ in range(gw.settings.max_attempts):
        endpoint = gw.balancer.pick(gw.registry.endpoints(inst), tried)
        if endpoint is None:
            break
        tried.append(endpoint)
        gw.balancer.acquire(endpoint)
        resp = await _attempt(gw, call, endpoint)
        if resp is not None and resp.status_code not in RETRY_STATUSES:
            gw.metrics.ttfb.labels(inst.namespace, inst.served_name).observe(time.monotonic() - call.started)
            call.status = resp.status_code
            return _Opened(endpoint, resp)
        reason = "connect" if resp is None else str(resp.status_code)
        if resp is not None:
            last_body = await resp.aread()
            await resp.aclose()
            last = resp
        gw.balancer.release(endpoint)
        gw.metrics.retries.labels(inst.namespace, inst.served_name, reason).inc()
    if last is not None:  # every endpoint said 429/503: pass the last answer on
        call.status = last.status_code
        headers = {h: last.headers[h] for h in _PASS_HEADERS if h in last.headers}
        return Response(last_body, status_code=last.status_code, headers=headers)
    call.status = 503
    return error(
        503,
        f"No instance of `{call.target.model}` is ready; try again shortly.",
        "service_unavailable",
        "no_ready_instance",
        {"Retry-After": str(gw.settings.no_endpoint_retry_after_seconds)},
    )


async def _respond(gw: Gateway, call: Call, opened: _Opened | Response) -> Response:
    if isinstance(opened, Response):
        _done(gw, call, None)
        return opened
    endpoint, resp = opened.endpoint, opened.resp
    headers = {h: resp.headers[h] for h in _PASS_HEADERS if h in resp.headers}
    if call.stream and resp.status_code == 200:
        headers["cache-control"] = "no-cache"
        headers["x-accel-buffering"] = "no"
        return StreamingResponse(
            _relay(gw, call, endpoint, resp),
            status_code=200,
            headers=headers,
            media_type=resp.headers.get("content-type", "text/event-stream"),
        )
    try:
        content = await resp.aread()
    finally:
        await resp.aclose()
    if resp.status_code == 200:
        with contextlib.suppress(ValueError):
            call.prompt_tokens, call.completion_tokens = _usage_of(json.loads(content))
    _done(gw, call, endpoint)
    return Response(content, status_code=resp.status_code, headers=headers)


def _must_wait(gw: Gateway, inst: Instance) -> bool:
    return inst.autoscaling and not gw.registry.endpoints(inst)


async def _wait_ready(gw: Gateway, inst: Instance, deadline: float) -> bool:
    """Wake a scaled-to-zero instance and wait for a ready endpoint (or the deadline)."""
    if gw.waker is not None and inst.capacity == 0:
        await gw.waker(inst)
    labels = gw.metrics.waiting.labels(inst.namespace, inst.name, inst.served_name)
    labels.inc()
    try:
        while time.monotonic() < deadline:
            current = gw.registry.instance(inst.namespace, inst.name) or inst
            if gw.registry.endpoints(current):
                return True
            await asyncio.sleep(0.05)
        return False
    finally:
        labels.dec()


def _wake_timeout(call: Call) -> JSONResponse:
    call.status = 503
    return error(
        503,
        f"`{call.target.model}` is scaling up from zero and was not ready within "
        f"{call.target.instance.wake_timeout_seconds:g} s; try again shortly.",
        "service_unavailable",
        "wake_timeout",
        {"Retry-After": "10"},
    )


async def _held_stream(gw: Gateway, call: Call, deadline: float) -> AsyncIterator[bytes]:
    """A stream held while the instance wakes: SSE comments keep the connection alive, then the
    upstream stream follows (or an error event when the wake timed out)."""
    inst = call.target.instance
    waiter = asyncio.ensure_future(_wait_ready(gw, inst, deadline))
    try:
        while not waiter.done():
            done, _ = await asyncio.wait({waiter}, timeout=gw.settings.keepalive_seconds)
            if not done:
                yield b": keep-alive\n\n"
        opened = await _open(gw, call) if waiter.result() else _wake_timeout(call)
    except BaseException:
        waiter.cancel()
        _done(gw, call, None)
        raise
    if isinstance(opened, Response):
        _done(gw, call, None)
        yield _error_event(call, bytes(opened.body))
        return
    if opened.resp.status_code != 200:
        content = await opened.resp.aread()
        await opened.resp.aclose()
        call.status = opened.resp.status_code
        _done(gw, call, opened.endpoint)
        yield _error_event(call, content)
        return
    async with contextlib.aclosing(_relay(gw, call, opened.endpoint, opened.resp)) as relay:
        async for chunk in relay:
            yield chunk


async def forward(gw: Gateway, call: Call) -> Response:
    inst = call.target.instance
    gw.metrics.in_flight.labels(inst.namespace, inst.served_name).inc()
    if not _must_wait(gw, inst):
        return await _respond(gw, call, await _open(gw, call))
    deadline = time.monotonic() + inst.wake_timeout_seconds
    if call.stream:
        call.status = 200
        headers = {"cache-control": "no-cache", "x-accel-buffering": "no"}
        return StreamingResponse(
            _held_stream(gw, call, deadline), media_type="text/event-stream", headers=headers
        )
    if not await _wait_ready(gw, inst, deadline):
        response = _wake_timeout(call)
        _done(gw, call, None)
        return response
    return await _respond(gw, call, await _open(gw, call))
