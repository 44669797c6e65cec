"""The gateway in front of a real `berth serve` process (the built-in SmolLM2): the per-instance
credential is accepted, the tenant key id reaches the server's metrics, and the gateway's usage
equals the server's own ``usage`` fields, streamed and not."""

from __future__ import annotations

import json

import httpx
import pytest

from berth.server.testing import ServerProcess
from tests.gateway.conftest import REAL_DIRECT, REAL_KEY, REAL_KEY_ID, REAL_TENANT, Env

pytestmark = pytest.mark.slow


def test_usage_through_the_gateway_equals_the_servers(real_server: ServerProcess, real_gateway: Env) -> None:
    headers = {"Authorization": f"Bearer {REAL_TENANT}"}
    msgs = [{"role": "user", "content": "Say hi."}]
    seen_prompt = seen_completion = 0
    r = httpx.post(
        real_gateway.server.url + "/v1/chat/completions",
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
        real_gateway.server.url + "/v1/chat/completions",
        json={"model": "smol", "messages": msgs, "max_tokens": 5, "stream": True},
        headers=headers,
        timeout=120,
    ) as s:
        text = b"".join(s.iter_raw()).decode()
    assert '"usage"' not in text and text.rstrip().endswith("data: [DONE]")
    # the same request direct with include_usage tells what the server counted
    with httpx.stream(
        "POST",
        real_server.base_url + "/v1/chat/completions",
        json={
            "model": "smol",
            "messages": msgs,
            "max_tokens": 5,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        headers={"Authorization": f"Bearer {REAL_DIRECT}"},
        timeout=120,
    ) as s:
        events = [
            json.loads(e[6:])
            for e in b"".join(s.iter_raw()).decode().split("\n\n")
            if e.startswith("data: {")
        ]
    direct_usage = events[-1]["usage"]
    delta = real_gateway.gw.usage.take()[REAL_KEY]
    assert delta.requests == 2
    # greedy-free sampling may stop early; the prompt is the same, completion tokens bounded by max_tokens
    assert delta.prompt_tokens == seen_prompt + direct_usage["prompt_tokens"]
    assert seen_completion + 1 <= delta.completion_tokens <= seen_completion + 5
    metrics = real_server.metrics()
    gen_by_gateway = sum(
        v
        for k, v in metrics.items()
        if k.startswith("berth_generation_tokens_total{") and f'key_id="gateway/{REAL_KEY_ID}"' in k
    )
    assert gen_by_gateway == delta.completion_tokens
    # the tenant's key itself opens nothing on the instance
    direct = httpx.post(
        real_server.base_url + "/v1/chat/completions",
        json={"model": "smol", "messages": msgs, "max_tokens": 2},
        headers=headers,
    )
    assert direct.status_code == 401
