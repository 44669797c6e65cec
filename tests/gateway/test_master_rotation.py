"""A gateway master key rotation without a gateway restart: the gateway re-reads the mounted key when
the file changes and, while an instance still holds the credential derived from the previous key
(its kubelet has not updated its copy of the rewritten gateway-key Secret yet), retries its 401 once
with that credential."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from berth.gateway.registry import Endpoint, instance_credential
from berth.gateway.settings import MasterKey
from tests.gateway.conftest import KEY_A, Env, Server

OLD, NEW = b"master-secret", b"master-rotated"


class Instance:
    """A fake instance that accepts one credential, as Berth's server does with its key directory."""

    def __init__(self, master: bytes) -> None:
        self.accepts = "Bearer " + instance_credential(master, "team-a", "chat")
        self.seen: list[str] = []
        self.app = FastAPI()

        @self.app.post("/v1/chat/completions")
        async def answer(request: Request) -> Any:
            self.seen.append(request.headers.get("authorization", ""))
            if request.headers.get("authorization") != self.accepts:
                error = {"message": "bad key", "type": "invalid_request_error", "param": None, "code": None}
                return JSONResponse({"error": error}, status_code=401)
            return JSONResponse({"id": "x", "object": "chat.completion", "choices": [], "usage": {}})


def _post(env: Env) -> httpx.Response:
    return httpx.post(
        env.server.url + "/v1/chat/completions",
        json={"model": "chat"},
        headers={"Authorization": f"Bearer {KEY_A}"},
        timeout=10,
    )


def test_a_rotation_is_bridged_until_the_instance_has_the_new_credential(env: Env, tmp_path: Path) -> None:
    master = env.gw.master
    assert master.path is not None and master.current() == OLD
    master.check_seconds = 0.0  # re-read on every request (the default is once a second)
    instance = Instance(OLD)
    server = Server(instance.app)
    try:
        env.gw.registry.put_slice("team-a", "chat", "chat-slice", (Endpoint("127.0.0.1", server.port),))
        assert _post(env).status_code == 200
        master.path.write_bytes(NEW + b"\n")  # the kubelet updated the gateway's copy of the master key
        instance.seen.clear()
        assert _post(env).status_code == 200  # the instance still has the old credential
        old, new = (f"Bearer {instance_credential(k, 'team-a', 'chat')}" for k in (OLD, NEW))
        assert instance.seen == [new, old]  # the new one first, the 401 retried with the previous
        metrics = httpx.get(env.server.url + "/metrics").text
        assert 'reason="previous_master_key"} 1.0' in metrics
        instance.accepts = new  # the instance's kubelet updated its copy of the rewritten Secret
        instance.seen.clear()
        assert _post(env).status_code == 200
        assert instance.seen == [new]
        instance.accepts = "Bearer something-else"  # neither: the 401 reaches the client, one retry only
        instance.seen.clear()
        assert _post(env).status_code == 401
        assert instance.seen == [new, old]
    finally:
        server.stop()


def test_without_a_rotation_a_401_is_not_retried(env: Env) -> None:
    instance = Instance(b"not-the-gateway-master")
    server = Server(instance.app)
    try:
        env.gw.registry.put_slice("team-a", "chat", "chat-slice", (Endpoint("127.0.0.1", server.port),))
        assert _post(env).status_code == 401
        assert len(instance.seen) == 1
    finally:
        server.stop()


def test_the_master_key_is_re_read_at_most_every_check_interval(tmp_path: Path) -> None:
    path = tmp_path / "master"
    path.write_bytes(b"one\n")
    key = MasterKey(path, check_seconds=3600.0)
    assert key.current() == b"one" and key.previous is None  # the first call reads the file
    path.write_bytes(b"two")
    assert key.current() == b"one"  # not yet re-read
    key.check_seconds = 0.0
    assert key.current() == b"two" and key.previous == b"one"
    path.unlink()  # mid-swap, or gone: the key in hand is kept
    assert key.current() == b"two" and key.previous == b"one"
    path.write_bytes(b"two\n")  # the same content again: no change
    assert key.current() == b"two" and key.previous == b"one"


class Clock:
    """An injected monotonic clock: advanced by hand, no sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_previous_master_key_is_dropped_after_the_grace_window(tmp_path: Path) -> None:
    path = tmp_path / "master"
    path.write_bytes(b"one")
    clock = Clock()
    key = MasterKey(path, check_seconds=0.0, grace_seconds=600.0, clock=clock)
    assert key.current() == b"one" and key.previous is None
    clock.now += 50
    path.write_bytes(b"two")
    assert key.current() == b"two" and key.previous == b"one"  # the window starts when the change is seen
    clock.now += 599.0
    assert key.current() == b"two" and key.previous == b"one"  # still within it
    clock.now += 1.0
    assert key.previous is None  # dropped at 600 s
    assert key.current() == b"two" and key.previous is None  # and not brought back by a re-read
    path.write_bytes(b"three")  # a later rotation starts a window of its own
    assert key.current() == b"three" and key.previous == b"two"
    clock.now += 600.0
    assert key.previous is None


def test_the_default_grace_window_is_ten_minutes_and_set_from_the_settings(tmp_path: Path) -> None:
    from berth.gateway.main import build
    from berth.gateway.settings import GatewaySettings

    assert GatewaySettings(kubernetes=False).previous_master_key_grace_seconds == 600.0
    path = tmp_path / "master"
    path.write_bytes(b"one")
    settings = GatewaySettings(kubernetes=False, master_key_file=path, previous_master_key_grace_seconds=30)
    _, gw = build(settings)
    assert gw.master.grace_seconds == 30.0 and gw.master.current() == b"one"


def test_a_401_is_retried_with_the_previous_key_only_within_the_grace_window(env: Env) -> None:
    path = env.gw.master.path
    assert path is not None
    clock = Clock()
    env.gw.master = MasterKey(path, check_seconds=0.0, grace_seconds=600.0, clock=clock)
    assert env.gw.master.current() == OLD
    instance = Instance(OLD)  # never updated: its kubelet does not catch up
    server = Server(instance.app)
    old, new = (f"Bearer {instance_credential(k, 'team-a', 'chat')}" for k in (OLD, NEW))

    def retries() -> float:
        for line in httpx.get(env.server.url + "/metrics").text.splitlines():
            if line.startswith("berth_gateway_upstream_retries_total{") and "previous_master_key" in line:
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    try:
        env.gw.registry.put_slice("team-a", "chat", "chat-slice", (Endpoint("127.0.0.1", server.port),))
        path.write_bytes(NEW + b"\n")
        assert env.gw.master.current() == NEW  # the change is seen at clock 1000
        clock.now += 599.0  # within the window: bridged
        instance.seen.clear()
        assert _post(env).status_code == 200
        assert instance.seen == [new, old] and retries() == 1.0
        clock.now += 1.0  # the window is over: the previous key is dropped, the 401 reaches the client
        instance.seen.clear()
        assert _post(env).status_code == 401
        assert instance.seen == [new] and env.gw.master.previous is None
        assert retries() == 1.0  # the counter stops growing
    finally:
        server.stop()
