"""Gateway tests: real loopback HTTP servers (uvicorn in threads) for the gateway and fake instances."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from berth.gateway.app import Gateway
from berth.gateway.main import build
from berth.gateway.registry import (
    Endpoint,
    Instance,
    Key,
    Limits,
    Registry,
    hash_key,
    instance_credential,
)
from berth.gateway.settings import GatewaySettings

if TYPE_CHECKING:
    from berth.server.testing import ServerProcess


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, app: Any, port: int | None = None, host: str = "127.0.0.1") -> None:
        self.port = port or free_port()
        self.host = host
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(5)


@dataclass
class Upstream:
    """A fake instance: records what it got; answers like Berth's server (usage only when asked)."""

    name: str
    status: int = 200
    prompt_tokens: int = 5
    completion_tokens: int = 3
    chunks: int = 3
    gate: threading.Event | None = None  # stream holds before its last chunk until set
    sent_last: threading.Event = field(default_factory=threading.Event)
    requests: list[tuple[dict[str, str], dict[str, Any]]] = field(default_factory=list)

    async def dashscope(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append((dict(request.headers), body))
        usage = {"input_tokens": self.prompt_tokens, "output_tokens": self.completion_tokens}
        if request.headers.get("x-dashscope-sse") != "enable":
            return JSONResponse(
                {"output": {"text": "hi", "finish_reason": "stop"}, "usage": usage, "request_id": "r"}
            )

        async def events() -> Any:
            for i in range(1, self.chunks + 1):
                u = {"input_tokens": self.prompt_tokens, "output_tokens": i}
                yield (
                    f"id:{i}\nevent:result\n:HTTP_STATUS/200\ndata:"
                    + json.dumps({"output": {"text": "x" * i}, "usage": u})
                    + "\n\n"
                )

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"X-DashScope-SSE": "enable"}
        )

    def app(self) -> FastAPI:
        app = FastAPI()

        async def answer(request: Request) -> Response:
            body = await request.json()
            self.requests.append((dict(request.headers), body))
            if self.status != 200:
                return JSONResponse(
                    {"error": {"message": "busy", "type": "x", "param": None, "code": None}},
                    status_code=self.status,
                    headers={"Retry-After": "1"},
                )
            usage = {
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
            }
            if not body.get("stream"):
                return JSONResponse(
                    {
                        "id": "x",
                        "object": "chat.completion",
                        "model": body.get("model"),
                        "served_by": self.name,
                        "choices": [],
                        "usage": usage,
                    }
                )
            with_usage = bool((body.get("stream_options") or {}).get("include_usage"))

            async def events() -> Any:
                for i in range(self.chunks):
                    if i == self.chunks - 1 and self.gate is not None:
                        while not self.gate.is_set():
                            await asyncio.sleep(0.01)
                    chunk: dict[str, Any] = {
                        "id": "x",
                        "choices": [{"index": 0, "delta": {"content": f"t{i}"}}],
                    }
                    if with_usage:
                        chunk["usage"] = None
                    yield f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n"
                self.sent_last.set()
                if with_usage:
                    yield (
                        "data: "
                        + json.dumps({"id": "x", "choices": [], "usage": usage}, separators=(",", ":"))
                        + "\n\n"
                    )
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

        app.post("/v1/chat/completions")(answer)
        app.post("/v1/completions")(answer)
        app.post("/generate")(answer)

        app.post("/api/v1/services/aigc/text-generation/generation")(self.dashscope)
        return app


KEY_A = "berth-key-team-a"
KEY_B = "berth-key-team-b"


@dataclass
class Env:
    gw: Gateway
    server: Server
    upstreams: dict[str, tuple[Upstream, Server]]

    def add_upstream(self, ns: str, md: str, name: str, **kw: Any) -> Upstream:
        up = Upstream(name, **kw)
        srv = Server(up.app())
        self.upstreams[name] = (up, srv)
        eps = tuple(
            Endpoint("127.0.0.1", s.port)
            for n, (u, s) in self.upstreams.items()
            if n.startswith(f"{ns}/{md}/")
        )
        self.gw.registry.put_slice(ns, md, f"{md}-slice", eps)
        return up


@pytest.fixture
def env(tmp_path: Any) -> Iterator[Env]:
    master = tmp_path / "master"
    master.write_text("master-secret\n")
    settings = GatewaySettings(kubernetes=False, master_key_file=master, connect_timeout_seconds=0.5)
    app, gw = build(settings)
    reg: Registry = gw.registry
    reg.put_instance(Instance("team-a", "chat", "chat", adapters=("sql",)))
    reg.put_instance(Instance("team-a", "coder", "coder-7b"))
    reg.put_instance(Instance("team-b", "chat", "chat"))
    reg.put_key(Key("team-a", "ci", "ak-a", hash_key(KEY_A)))
    reg.put_key(Key("team-b", "ci", "ak-b", hash_key(KEY_B), models=("chat",)))
    e = Env(gw, Server(app), {})
    yield e
    e.server.stop()
    for _, srv in e.upstreams.values():
        srv.stop()


def limits(**kw: int) -> Limits:
    return Limits(kw.get("rpm"), kw.get("tpm"), kw.get("conc"))


# A real `berth serve` (the built-in SmolLM2, served as "smol") behind a real gateway: one per test
# module, so what a module reads from the server's metrics is its own traffic.
REAL_MASTER = b"master-secret-real"
REAL_TENANT = "bk-real-tenant"  # the tenant's key: opens the gateway, not the instance
REAL_DIRECT = "sk-direct"  # a key of the instance itself, for asking the server directly
REAL_KEY = ("team-a", "ci")  # (namespace, ApiKey) the gateway books the tenant's usage under
REAL_KEY_ID = "ak-ci"


@pytest.fixture(scope="module")
def real_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    from berth.server.testing import ServerProcess

    cred = instance_credential(REAL_MASTER, "team-a", "chat")
    proc = ServerProcess(
        ["--max-num-seqs", "4", "--device", "cpu", "--served-model-name", "smol"],
        log_dir=tmp_path_factory.mktemp("gw-real"),
        env={"BERTH_API_KEYS": f"berth-gateway:{cred},direct:{REAL_DIRECT}"},
    )
    with proc:
        yield proc


@pytest.fixture(scope="module")
def real_gateway(real_server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    master = tmp_path_factory.mktemp("gw-real-master") / "master"
    master.write_bytes(REAL_MASTER)
    app, gw = build(GatewaySettings(kubernetes=False, master_key_file=master))
    gw.registry.put_instance(Instance("team-a", "chat", "smol"))
    gw.registry.put_slice("team-a", "chat", "s", (Endpoint("127.0.0.1", real_server.port),))
    gw.registry.put_key(Key(*REAL_KEY, REAL_KEY_ID, hash_key(REAL_TENANT)))
    env = Env(gw, Server(app), {})
    yield env
    env.server.stop()
