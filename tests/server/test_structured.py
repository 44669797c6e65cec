"""Structured outputs (xgrammar token masks in the sampler) on the built-in SmolLM2.

- Engine: sampled answers under a JSON schema validate, mixed in one batch with unconstrained
  requests that still give exactly their solo output, through preemption, and for a regex; a schema
  that cannot compile is a ParamError naming the field.
- Forced tool choice (named function, "required") through the real app, a real engine and the
  official ``openai`` SDK, with a tool-calling chat template on SmolLM2's tokenizer.
The answers through ``berth serve`` for a set of schemas, streamed and not, are in test_api_real.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import jsonschema
import pytest

pytest.importorskip("xgrammar")

from fastapi.testclient import TestClient
from openai import OpenAI

from berth.server.app import Phase, ServerState, create_app
from berth.server.auth import KeyStore
from berth.server.engine import Engine, EngineConfig, EngineCore, GenerationRequest, SamplingParams
from berth.server.engine.guided import TokenBitmask, schema_spec
from berth.server.engine.types import GuidedSpec, ParamError
from berth.server.serving import Serving
from berth.server.settings import ServerSettings

if TYPE_CHECKING:
    from berth.server.engine.types import LoadedModel

CAT = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 1},
        "color": {"enum": ["black", "white", "orange"]},
    },
    "required": ["name", "age", "color"],
    "additionalProperties": False,
}


def _core(m: LoadedModel, **kw: Any) -> EngineCore:
    cfg: dict[str, Any] = {
        "num_blocks": 128,
        "block_size": 16,
        "max_num_batched_tokens": 256,
        "prepare_guided": False,
    }
    cfg.update(kw)
    return EngineCore(m, EngineConfig(**cfg))


def _text(events: list[Any]) -> str:
    return "".join(e.text for e in events)


def test_sampled_answers_follow_the_schema_beside_unconstrained_requests(
    smollm2: LoadedModel, chat_ids: Callable[..., list[int]]
) -> None:
    ids = chat_ids("Describe a cat as JSON.")
    plain = GenerationRequest(
        "plain", chat_ids("What is the capital of France?"), SamplingParams(max_tokens=12, temperature=0.0)
    )
    solo = _core(smollm2).run([plain])["plain"]
    spec = schema_spec(CAT, "response_format")
    guided = [
        GenerationRequest(f"g{i}", ids, SamplingParams(max_tokens=80, temperature=0.8, seed=i, guided=spec))
        for i in range(4)
    ]
    out = _core(smollm2).run([*guided, plain])
    assert [e.token_id for e in out["plain"]] == [e.token_id for e in solo]  # masks touch only their rows
    for g in guided:
        events = out[g.request_id]
        assert events[-1].finish_reason == "stop", _text(events)
        jsonschema.validate(json.loads(_text(events)), CAT)


def test_guided_requests_survive_preemption(smollm2: LoadedModel, chat_ids: Callable[..., list[int]]) -> None:
    # 14 blocks of 8 tokens for 4 requests of ~40 prompt tokens + ~40 output tokens each: preemption.
    c = _core(smollm2, num_blocks=14, block_size=8, max_num_batched_tokens=64)
    spec = schema_spec(
        {"type": "array", "items": {"type": "integer", "minimum": 10}, "minItems": 8, "maxItems": 10},
        "response_format",
    )
    reqs = [
        GenerationRequest(
            f"p{i}",
            chat_ids(f"List some numbers, take {i}."),
            SamplingParams(max_tokens=70, temperature=0.8, seed=i, guided=spec),
        )
        for i in range(4)
    ]
    out = c.run(reqs)
    assert c.scheduler.counters.num_preemptions > 0
    for r in reqs:
        value = json.loads(_text(out[r.request_id]))
        assert 8 <= len(value) <= 10 and all(isinstance(v, int) and v >= 10 for v in value), value


def test_regex_grammar(smollm2: LoadedModel, chat_ids: Callable[..., list[int]]) -> None:
    spec = GuidedSpec("regex", r"[0-9]{3}-[a-z]{2,4}", param="grammar")
    out = _core(smollm2).run(
        [
            GenerationRequest(
                "re",
                chat_ids("Give me a code."),
                SamplingParams(max_tokens=20, temperature=1.0, seed=5, guided=spec),
            )
        ]
    )["re"]
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", _text(out)), _text(out)
    assert out[-1].finish_reason == "stop"


def test_the_token_bitmask_is_allocated_once_and_reused_dirty_as_if_fresh(smollm2: LoadedModel) -> None:
    import torch
    import xgrammar as xgr

    core = _core(smollm2)
    vocab = core.runner.vocab_size
    # two rows that allow different tokens: digits, and what opens a JSON object
    guides = [
        core.guides.guide(GuidedSpec("regex", r"[0-9]{3}-[a-z]{2,4}", param="grammar")),
        core.guides.guide(schema_spec(CAT, "response_format")),
    ]
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(0)).repeat(3, 1)  # equal rows
    fresh = xgr.allocate_token_bitmask(3, vocab)
    for r, g in zip((0, 2), guides, strict=True):
        g.fill(fresh, r)
    want = logits.clone()
    xgr.apply_token_bitmask_inplace(want, fresh, vocab_size=vocab, indices=[0, 2])
    assert torch.isinf(want[0]).sum() > 0 and not torch.equal(want[0].isinf(), want[2].isinf())

    bitmask = TokenBitmask()
    got = logits.clone()
    bitmask.apply(got, [0, 2], guides)
    assert torch.equal(got, want)
    host = bitmask._host
    assert host is not None
    pointer = host.data_ptr()
    host.fill_(0)  # what an earlier step might have left: every token forbidden, in every row
    for batch in (3, 2, 3):  # smaller batches reuse the rows of the larger one
        got = logits[:batch].clone()
        bitmask.apply(got, [0, batch - 1], [guides[0], guides[1]])
        assert torch.equal(got[0], want[0]) and torch.equal(got[batch - 1], want[2])
        if batch == 3:
            assert torch.equal(got[1], logits[1])  # an unguided row stays as it was
        assert bitmask._host is host and host.data_ptr() == pointer
    bitmask.apply(torch.randn(5, vocab), [4], [guides[0]])  # a larger batch: grown once, doubled
    assert bitmask._host is not None and bitmask._host.shape[0] == 6
    sampler = core.runner.sampler
    assert sampler is not None and sampler._bitmask.capacity == core.config.max_num_seqs == 32


class _AllowAll:
    """A guide that allows every token (xgrammar's bitmask: -1 is every bit set)."""

    def fill(self, bitmask: Any, row: int) -> None:
        bitmask[row].fill_(-1)


def test_the_token_bitmask_is_not_reallocated_each_time_the_batch_grows_by_a_row() -> None:
    import torch

    vocab = 1000
    seen: list[tuple[int, int]] = []  # (data pointer, rows) of the host mask after each step

    def grow(bitmask: TokenBitmask, upto: int) -> list[tuple[int, int]]:
        seen.clear()
        for batch in range(1, upto + 1):
            logits = torch.randn(batch, vocab)
            want = logits.clone()
            bitmask.apply(logits, list(range(batch)), [_AllowAll()] * batch)  # type: ignore[list-item]
            assert torch.equal(logits, want)  # everything allowed: untouched
            host = bitmask._host
            assert host is not None
            seen.append((host.data_ptr(), host.shape[0]))
        return seen

    # Sized for max_num_seqs up front: 1 -> 2 -> 3 rows use the one allocation.
    steps = grow(TokenBitmask(capacity=8), 3)
    assert len({p for p, _ in steps}) == 1 and [r for _, r in steps] == [8, 8, 8]
    # Without a capacity it doubles: 1, 2, 4, 4, 8 rows for batches 1..5 (4 allocations, not 5; 1..64: 7).
    steps = grow(TokenBitmask(), 5)
    assert [r for _, r in steps] == [1, 2, 4, 4, 8]
    assert steps[2][0] == steps[3][0]  # batch 4 reuses batch 3's allocation
    assert len({r for _, r in grow(TokenBitmask(), 64)}) == 7
    # A batch past the capacity grows it: doubled (to at least the batch).
    bitmask = TokenBitmask(capacity=2)
    grow(bitmask, 3)
    assert [r for _, r in seen] == [2, 2, 4]


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ({"type": "nonsense"}, 'Unsupported type "nonsense"'),
        ({"type": "integer", "minimum": 5, "maximum": 1}, "minimum greater than maximum"),
        ({"$ref": "#/definitions/missing"}, "missing"),
    ],
)
def test_a_schema_that_cannot_compile_names_the_field(
    smollm2: LoadedModel, schema: dict[str, Any], message: str
) -> None:
    c = _core(smollm2)
    req = GenerationRequest("bad", [1, 2, 3], SamplingParams(guided=schema_spec(schema, "response_format")))
    with pytest.raises(ParamError) as exc:
        c.make_sequence(req)
    assert exc.value.param == "response_format"
    assert message in str(exc.value) and "/project/" not in str(exc.value)


# ------------------------------------------------------------------------------ forced tools

TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 30},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris for the next 3 days?"}]


@pytest.fixture(scope="module")
def sdk(smollm2: LoadedModel) -> Iterator[OpenAI]:
    tokenizer = copy.deepcopy(smollm2.tokenizer)
    tokenizer.chat_template = TOOL_TEMPLATE
    engine = Engine(
        dataclasses.replace(smollm2, tokenizer=tokenizer), EngineConfig(num_blocks=128, block_size=16)
    )
    engine.start()
    settings = ServerSettings()
    state = ServerState(settings=settings, keys=KeyStore(None, None))
    state.serving = Serving(engine, settings, state.metrics)
    state.set_phase(Phase.READY)
    try:
        with TestClient(create_app(state), raise_server_exceptions=False) as c:
            yield OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=c, max_retries=0)
    finally:
        engine.stop()


def test_a_named_tool_choice_gets_arguments_valid_for_its_schema(sdk: OpenAI) -> None:
    choice = {"type": "function", "function": {"name": "get_weather"}}
    resp = sdk.chat.completions.create(
        model="smollm2",
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice=choice,
        temperature=0.8,
        seed=1,
        max_tokens=60,
        n=3,
    )
    for c in resp.choices:
        assert c.finish_reason == "tool_calls" and c.message.content is None
        (call,) = c.message.tool_calls
        assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    stream = sdk.chat.completions.create(
        model="smollm2",
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice=choice,
        temperature=0.8,
        seed=2,
        max_tokens=60,
        stream=True,
    )
    calls = [tc for chunk in stream for ch in chunk.choices for tc in (ch.delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER["function"]["parameters"])


def test_required_tool_choice_calls_at_least_one_tool(sdk: OpenAI) -> None:
    # parallel_tool_calls=False: exactly one call (a tiny model would otherwise list calls until cut off)
    resp = sdk.chat.completions.create(
        parallel_tool_calls=False,
        model="smollm2",
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice="required",
        temperature=0.8,
        seed=3,
        max_tokens=80,
        n=3,
    )
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    for c in resp.choices:
        assert c.finish_reason == "tool_calls", c.message.content
        assert c.message.tool_calls and len(c.message.tool_calls) == 1
        for call in c.message.tool_calls:
            jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def test_tool_choice_naming_an_unknown_tool_is_a_400(sdk: OpenAI) -> None:
    import openai

    with pytest.raises(openai.BadRequestError) as exc:
        sdk.chat.completions.create(
            model="smollm2",
            messages=ASK,
            tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "nope"}},
            max_tokens=5,
        )
    assert isinstance(exc.value.body, dict) and exc.value.body["param"] == "tool_choice"


def test_an_oversized_schema_is_refused_before_compiling() -> None:
    from berth.server.engine.guided import MAX_SCHEMA_BYTES

    huge = {
        "type": "object",
        "properties": {f"p{i}": {"type": "string"} for i in range(MAX_SCHEMA_BYTES // 10)},
    }
    with pytest.raises(ParamError) as exc:
        schema_spec(huge, "response_format")
    assert exc.value.param == "response_format" and "at most 65536" in str(exc.value)
