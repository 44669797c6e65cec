"""The gateway in front of a real `berth serve` process (the built-in SmolLM2): the per-instance
credential is accepted, the tenant key id reaches the server's metrics, and the gateway's usage
equals the server's own ``usage`` fields, streamed and not."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from berth.gateway.registry import Endpoint, Instance, Key, hash_key, instance_credential
from berth.server.testing import ServerProcess
from tests.gateway.conftest import Env, Server

pytestmark = pytest.mark.slow

MASTER = b"master-secret"
TENANT = "bk-tenant-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    cred = instance_credential(MASTER, "team-a", "chat")
    proc = ServerProcess(
        ["--max-num-seqs", "4", "--device", "cpu", "--served-model-name", "smol"],
        log_dir=tmp_path_factory.mktemp("gw-real"),
        env={"BERTH_API_KEYS": f"berth-gateway:{cred},direct:sk-direct"},
    )
    with proc:
        yield proc


@pytest.fixture
def gateway(server: ServerProcess, tmp_path: Path) -> Iterator[Env]:
    from berth.gateway.main import build
    from berth.gateway.settings import GatewaySettings

    (tmp_path / "master").write_bytes(MASTER)
    app, gw = build(GatewaySettings(kubernetes=False, master_key_file=tmp_path / "master"))
    gw.registry.put_instance(Instance("team-a", "chat", "smol"))
    gw.registry.put_slice("team-a", "chat", "s", (Endpoint("127.0.0.1", server.port),))
    gw.registry.put_key(Key("team-a", "ci", "ak-ci", hash_key(TENANT)))
    env = Env(gw, Server(app), {})
    yield env
    env.server.stop()


def test_usage_through_the_gateway_equals_the_servers(server: ServerProcess, gateway: Env) -> None:
    headers = {"Authorization": f"Bearer {TENANT}"}
    msgs = [{"role": "user", "content": "Say hi."}]
    seen_prompt = seen_completion = 0
    r = httpx.post(
        gateway.server.url + "/v1/chat/completions",
        json={"model": "team-a/smol", "messages": msgs, "max_tokens": 6},
        headers=headers,
        timeout=120,
    )
    assert r.status_code == 200, r.text
    seen_prompt += r.json()["usage"]["prompt_tokens"]
    seen_completion += r.json()["usage"]["completion_tokens"]
    # a stream where the client does not ask for usage: the gateway still counts it exactly
    with httpx.stream(
        "POST",
        gateway.server.url + "/v1/chat/completions",
        json={"model": "smol", "messages": msgs, "max_tokens": 5, "stream": True},
        headers=headers,
        timeout=120,
    ) as s:
        text = b"".join(s.iter_raw()).decode()
    assert '"usage"' not in text and text.rstrip().endswith("data: [DONE]")
    # the same request direct with include_usage tells what the server counted
    with httpx.stream(
        "POST",
        server.base_url + "/v1/chat/completions",
        json={
            "model": "smol",
            "messages": msgs,
            "max_tokens": 5,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        headers={"Authorization": "Bearer sk-direct"},
        timeout=120,
    ) as s:
        events = [
            json.loads(e[6:])
            for e in b"".join(s.iter_raw()).decode().split("\n\n")
            if e.startswith("data: {")
        ]
    direct_usage = events[-1]["usage"]
    delta = gateway.gw.usage.take()[("team-a", "ci")]
    assert delta.requests == 2
    # greedy-free sampling may stop early; the prompt is the same, completion tokens bounded by max_tokens
    assert delta.prompt_tokens == seen_prompt + direct_usage["prompt_tokens"]
    assert seen_completion + 1 <= delta.completion_tokens <= seen_completion + 5
    metrics = server.metrics()
    gen_by_gateway = sum(
        v
        for k, v in metrics.items()
        if k.startswith("berth_generation_tokens_total{") and 'key_id="gateway/ak-ci"' in k
    )
    assert gen_by_gateway == delta.completion_tokens
    # the tenant's key itself opens nothing on the instance
    direct = httpx.post(
        server.base_url + "/v1/chat/completions",
        json={"model": "smol", "messages": msgs, "max_tokens": 2},
        headers=headers,
    )
    assert direct.status_code == 401
