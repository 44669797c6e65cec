"""SamplingParams validate once, when made, naming the field (pure Python)."""

from __future__ import annotations

import dataclasses

import pytest

from berth.server.engine.types import GuidedSpec, ParamError, SamplingParams


@pytest.mark.parametrize(
    ("fields", "param", "message"),
    [
        pytest.param({"max_tokens": 0}, "max_tokens", "max_tokens must be >= 1, got 0", id="max_tokens"),
        pytest.param({"temperature": -1.0}, "temperature", "temperature must be >= 0", id="temperature"),
        pytest.param({"top_p": 0.0}, "top_p", "top_p must be in (0, 1]", id="top_p"),
        pytest.param({"top_k": -1}, "top_k", "top_k must be >= 0", id="top_k"),
        pytest.param({"repetition_penalty": 0.0}, "repetition_penalty", "must be > 0", id="repetition"),
        pytest.param({"logprobs": 21}, "logprobs", "between 0 and 20", id="logprobs"),
    ],
)
def test_out_of_range_fields_are_named(fields: dict[str, object], param: str, message: str) -> None:
    with pytest.raises(ParamError) as exc:
        SamplingParams(**fields)  # type: ignore[arg-type]
    assert exc.value.param == param and message in str(exc.value)


def test_valid_params_and_replace() -> None:
    p = SamplingParams(max_tokens=4, temperature=0.0, seed=1)
    assert p.greedy
    assert dataclasses.replace(p, seed=2).seed == 2
    with pytest.raises(ParamError):
        dataclasses.replace(p, max_tokens=0)


def test_guided_spec_kind_is_checked_and_names_its_field() -> None:
    with pytest.raises(ParamError) as exc:
        GuidedSpec("yaml", "{}", param="grammar")
    assert exc.value.param == "grammar" and "unknown structured output kind 'yaml'" in str(exc.value)
    spec = GuidedSpec("json_schema", '{"type":"object"}')
    assert spec.param == "response_format" and spec.describe() == "JSON schema"
    assert SamplingParams(guided=spec).guided == spec  # hashable, frozen: the compile cache's key
