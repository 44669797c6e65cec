"""The seed clients, unchanged, against the gateway in front of a real `berth serve` (the built-in
SmolLM2) on loopback: ``dashscope.Generation.call`` with ``dashscope.base_http_api_url`` pointed
at the gateway, zai-sdk's ``ZhipuAiClient(base_url=...)``, and the Node ``openai`` SDK
(``new OpenAI({baseURL})``, installed by tools/node_openai.sh). Each runs its documented example;
the gateway's usage book must equal what the clients were told."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from berth.gateway.usage import Delta
from tests.gateway.conftest import REAL_KEY, REAL_TENANT, Env

pytestmark = pytest.mark.slow

TENANT = REAL_TENANT
FRANCE = "What is the capital of France?"
ROOT = Path(__file__).resolve().parents[2]


def usage_after(env: Env, requests: int) -> Delta:
    """The usage the gateway booked for the tenant once ``requests`` requests finished."""
    total = Delta()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for key, delta in env.gw.usage.take().items():
            assert key == REAL_KEY
            total.add(delta)
        if total.requests >= requests:
            return total
        time.sleep(0.02)
    raise AssertionError(f"usage did not settle: {total}")


def test_dashscope_generation_call(real_gateway: Env) -> None:
    dashscope = pytest.importorskip("dashscope")
    real_gateway.gw.usage.take()
    previous = dashscope.base_http_api_url
    dashscope.base_http_api_url = f"{real_gateway.server.url}/api/v1"
    try:
        resp = dashscope.Generation.call(
            model="smol", prompt=FRANCE, api_key=TENANT, max_tokens=10, temperature=0
        )
        assert resp.status_code == 200, resp
        assert "Paris" in resp.output.text
        chat = dashscope.Generation.call(
            model="team-a/smol",
            messages=[{"role": "user", "content": FRANCE}],
            result_format="message",
            api_key=TENANT,
            max_tokens=10,
            temperature=0,
        )
        assert chat.status_code == 200, chat
        assert chat.output.choices[0].message.content == resp.output.text
        parts = list(
            dashscope.Generation.call(
                model="smol",
                prompt=FRANCE,
                api_key=TENANT,
                max_tokens=10,
                temperature=0,
                stream=True,
                incremental_output=True,
            )
        )
        assert "".join(p.output.text for p in parts) == resp.output.text
        assert parts[-1].output.finish_reason in ("stop", "length")
        denied = dashscope.Generation.call(model="smol", prompt="hi", api_key="bk-not-a-key")
        assert (denied.status_code, denied.code) == (401, "InvalidApiKey")
    finally:
        dashscope.base_http_api_url = previous
    told = [resp.usage, chat.usage, parts[-1].usage]
    booked = usage_after(real_gateway, 3)
    assert booked.requests == 3
    assert booked.prompt_tokens == sum(u.input_tokens for u in told)
    assert booked.completion_tokens == sum(u.output_tokens for u in told)


def test_zai_sdk_chat_completions(real_gateway: Env) -> None:
    zai = pytest.importorskip("zai")
    real_gateway.gw.usage.take()
    client = zai.ZhipuAiClient(api_key=TENANT, base_url=f"{real_gateway.server.url}/v1", max_retries=0)
    messages = [{"role": "user", "content": FRANCE}]
    resp = client.chat.completions.create(
        model="team-a/smol", messages=messages, max_tokens=10, temperature=0
    )
    text = resp.choices[0].message.content
    assert "Paris" in text
    assert resp.model == "smol" and resp.usage.prompt_tokens > 0
    streamed = ""
    for chunk in client.chat.completions.create(
        model="smol", messages=messages, max_tokens=10, temperature=0, stream=True
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            streamed += chunk.choices[0].delta.content
    assert streamed == text
    booked = usage_after(real_gateway, 2)
    assert booked.prompt_tokens == 2 * resp.usage.prompt_tokens
    assert booked.completion_tokens == 2 * resp.usage.completion_tokens


def _node_modules() -> Path:
    """The Node openai SDK (tools/node_openai.sh installs it once, keyed by version)."""
    ci = os.environ.get("CI") == "true"
    if shutil.which("node") is None and not ci and os.geteuid() != 0:
        pytest.skip("node is not installed (tools/node_openai.sh installs it as root)")
    out = subprocess.run(
        ["bash", str(ROOT / "tools" / "node_openai.sh")], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return Path(out.stdout.strip().splitlines()[-1])


def test_node_openai_sdk_chat_and_stream(real_gateway: Env) -> None:
    modules = _node_modules()
    real_gateway.gw.usage.take()
    env: dict[str, Any] = {
        **os.environ,
        "NODE_PATH": str(modules),
        "BASE_URL": f"{real_gateway.server.url}/v1",
        "API_KEY": TENANT,
        "MODEL": "team-a/smol",
    }
    out = subprocess.run(
        ["node", str(Path(__file__).parent / "node" / "openai_chat.cjs")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert "Paris" in got["whole"] and got["finish"] in ("stop", "length")
    assert got["model"] == "smol"
    assert got["streamed"] == got["whole"] and got["chunks"] >= 3
    booked = usage_after(real_gateway, 2)
    assert booked.prompt_tokens == 2 * got["usage"]["prompt_tokens"]
    assert booked.completion_tokens == 2 * got["usage"]["completion_tokens"]
