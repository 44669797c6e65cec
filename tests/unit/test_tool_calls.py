"""Hermes-format tool calls: parsed from finished text and split out of a stream, nothing lost."""

from __future__ import annotations

import json

import pytest

from berth.server import tool_calls

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_parse_one_call_and_content_before_it() -> None:
    content, calls = tool_calls.parse("Let me check.\n" + CALL)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]
    oa = calls[0].openai(0)
    assert oa["type"] == "function" and oa["index"] == 0 and oa["id"].startswith("call_")
    assert json.loads(oa["function"]["arguments"]) == {"city": "Paris"}


def test_parse_several_calls_unterminated_last_and_string_arguments() -> None:
    text = CALL + '\n<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}'
    content, calls = tool_calls.parse(text)
    assert content is None and [c.name for c in calls] == ["get_weather", "f"]
    assert json.loads(calls[1].arguments) == {"x": 1}


@pytest.mark.parametrize(
    "text",
    [
        "no call here",
        "<tool_call>{not json}</tool_call>",
        '<tool_call>{"arguments": {}}</tool_call>',  # no name
        CALL + " and then some prose",  # text after the call: keep it all as content
    ],
)
def test_text_that_is_no_clean_call_stays_content(text: str) -> None:
    assert tool_calls.parse(text) == (text, [])


def _stream(pieces: list[str]) -> tuple[str, list[tool_calls.ToolCall], str]:
    sp = tool_calls.StreamSplitter()
    sent = "".join(sp.feed(p) for p in pieces)
    rest, calls = sp.finish()
    return sent, calls, rest


def test_stream_holds_back_the_call_even_when_split_mid_tag() -> None:
    text = "Checking. " + CALL
    pieces = [text[i : i + 3] for i in range(0, len(text), 3)]  # "<to", "ol_", ... : the tag arrives in bits
    sent, calls, rest = _stream(pieces)
    assert sent == "Checking. " and rest == ""
    assert [c.name for c in calls] == ["get_weather"]


def test_stream_without_a_call_loses_nothing() -> None:
    for text in ("plain answer", "a < b and <tool is not a tag", "ends with <tool_c"):
        pieces = [text[i : i + 2] for i in range(0, len(text), 2)]
        sent, calls, rest = _stream(pieces)
        assert calls == [] and sent + rest == text


def test_stream_with_a_broken_call_gives_it_back_as_content() -> None:
    text = "x <tool_call>{oops"
    sent, calls, rest = _stream([text[:4], text[4:]])
    assert calls == [] and sent + rest == text


def test_arguments_for_template_turns_json_text_into_objects() -> None:
    history = [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]
    assert tool_calls.arguments_for_template(history)[0]["function"]["arguments"] == {"a": 1}
    assert history[0]["function"]["arguments"] == '{"a": 1}'  # the request is not modified
