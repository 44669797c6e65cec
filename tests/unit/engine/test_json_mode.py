"""JSON mode's character-level prefix checker (pure Python)."""

from __future__ import annotations

import json

import pytest

from berth.server.engine import json_mode


@pytest.mark.parametrize(
    "text",
    ['{"a": [1, -2.5e3, true, null, {"b": "x\\"y\\u00e9"}], "c": {}}', ' {"k":"v"}', "{}", '{"a":[]}'],
)
def test_json_checker_accepts_valid_objects(text: str) -> None:
    st = json_mode.advance(json_mode.INITIAL, text)
    assert st is not None and json_mode.is_done(st)
    json.loads(text)


@pytest.mark.parametrize(
    "text", ["[1]", '"s"', '{"a":01}', '{"a" 1}', '{"a":1,}', "{}{}", '{"a":nul}', '{"a":1.}']
)
def test_json_checker_rejects_invalid(text: str) -> None:
    st = json_mode.advance(json_mode.INITIAL, text)
    assert st is None or not json_mode.is_done(st)


@pytest.mark.parametrize(
    "prefix", ["", "{", '{"ab', '{"a":', '{"a":-', '{"a":[1,', '{"a":"\\u12', '{"a":tr', '{"a":1,']
)
def test_json_completion_closes_any_prefix(prefix: str) -> None:
    st = json_mode.advance(json_mode.INITIAL, prefix)
    assert st is not None
    assert isinstance(json.loads(prefix + json_mode.completion(st)), dict)


def test_json_budget_refuses_tokens_that_cannot_be_closed() -> None:
    st = json_mode.advance(json_mode.INITIAL, '{"a":')
    assert st is not None
    assert json_mode.allowed(st, "[[", tokens_left_after=2) is None  # needs "0]]}" = 4 more tokens
    assert json_mode.allowed(st, "[[", tokens_left_after=4) is not None
    assert json_mode.allowed(st, "1}", tokens_left_after=0) is not None  # completes the object
