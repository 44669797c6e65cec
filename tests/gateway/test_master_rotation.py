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
