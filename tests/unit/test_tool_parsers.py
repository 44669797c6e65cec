"""The tool-call formats and the reasoning split, pure Python: whole texts and streams in small deltas."""

from __future__ import annotations

import json

import pytest

from berth.server import reasoning, tool_parsers

WEATHER = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "days": {"type": "integer"},
                    "zip": {"type": "string"},
                },
            },
        },
    }
]

CASES = [
    pytest.param(
        "hermes",
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>',
        "Let me check.",
        [("get_weather", {"city": "Paris", "days": 2})],
        id="hermes",
    ),
    pytest.param(
        "glm45",
        "Checking.<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
        "<arg_key>days</arg_key>\n<arg_value>2</arg_value>\n<arg_key>zip</arg_key>\n<arg_value>75001</arg_value>\n"
        "</tool_call>",
        "Checking.",
        [("get_weather", {"city": "Paris", "days": 2, "zip": "75001"})],
        id="glm45-typed-by-schema",
    ),
    pytest.param(
        "glm45",
        "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n</tool_call>"
        "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Lyon</arg_value>\n</tool_call>",
        None,
        [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Lyon"})],
        id="glm45-two-calls",
    ),
    pytest.param(
        "llama3_json",
        '{"name": "get_weather", "parameters": {"city": "Paris"}}',
        None,
        [("get_weather", {"city": "Paris"})],
        id="llama3",
    ),
    pytest.param(
        "llama3_json",
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
        '{"name": "get_weather", "parameters": {"city": "Rome"}}',
        None,
        [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})],
        id="llama3-python-tag-two",
    ),
    pytest.param(
        "mistral",
        'Sure. [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]',
        "Sure.",
        [("get_weather", {"city": "Paris"})],
        id="mistral-v3",
    ),
    pytest.param(
        "mistral",
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo"}',
        None,
        [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Oslo"})],
        id="mistral-v11",
    ),
]


def _calls(calls: list[tool_parsers.ToolCall]) -> list[tuple[str, dict[str, object]]]:
    return [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.mark.parametrize(("fmt", "text", "content", "calls"), CASES)
def test_whole_text(
    fmt: str, text: str, content: str | None, calls: list[tuple[str, dict[str, object]]]
) -> None:
    got_content, got_calls = tool_parsers.FORMATS[fmt].parse(text, WEATHER)
    assert got_content == content
    assert _calls(got_calls) == calls


@pytest.mark.parametrize(("fmt", "text", "content", "calls"), CASES)
@pytest.mark.parametrize("size", [1, 3, 7])
def test_streamed_in_small_deltas(
    fmt: str, text: str, content: str | None, calls: list[tuple[str, dict[str, object]]], size: int
) -> None:
    splitter = tool_parsers.FORMATS[fmt].splitter(WEATHER)
    sent = "".join(splitter.feed(text[i : i + size]) for i in range(0, len(text), size))
    rest, got = splitter.finish()
    assert _calls(got) == calls
    assert (sent + rest).strip() == (content or "")  # no half call ever went out as content


@pytest.mark.parametrize("fmt", sorted(tool_parsers.FORMATS))
def test_plain_text_stays_content(fmt: str) -> None:
    text = "The weather in Paris is mild [today] {usually}."
    parser = tool_parsers.FORMATS[fmt]
    assert parser.parse(text) == (text, [])
    splitter = parser.splitter()
    sent = "".join(splitter.feed(text[i : i + 4]) for i in range(0, len(text), 4))
    rest, calls = splitter.finish()
    assert sent + rest == text and calls == []


def test_a_broken_call_is_kept_as_content() -> None:
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call>'
    assert tool_parsers.FORMATS["hermes"].parse(text) == (text, [])
    assert tool_parsers.FORMATS["glm45"].parse("<tool_call>\n</tool_call>") == (
        "<tool_call>\n</tool_call>",
        [],
    )


@pytest.mark.parametrize(
    ("template", "fmt"),
    [
        ("...<arg_key>{{ k }}</arg_key><tool_call>...", "glm45"),
        ("...[TOOL_CALLS]...", "mistral"),
        ("...<tool_call>...", "hermes"),
        ('...{"name": function name, "parameters": dictionary}...', "llama3_json"),
        (None, "hermes"),
    ],
)
def test_format_from_template(template: str | None, fmt: str) -> None:
    assert tool_parsers.for_template(template).name == fmt


@pytest.mark.parametrize(
    ("text", "opened", "want"),
    [
        ("<think>\nLet me think.\n</think>\n\nParis.", False, ("Let me think.", "Paris.")),
        ("Let me think.</think>Paris.", True, ("Let me think.", "Paris.")),
        ("<think></think>\nParis.", False, (None, "Paris.")),
        ("Paris.", False, (None, "Paris.")),
        ("<think>still thinking", False, ("still thinking", "")),
    ],
)
def test_reasoning_split(text: str, opened: bool, want: tuple[str | None, str]) -> None:
    assert reasoning.split(text, opened) == want
    splitter = reasoning.ReasoningSplitter(opened)
    parts = [splitter.feed(text[i : i + 2]) for i in range(0, len(text), 2)] + [splitter.finish()]
    got_reasoning = "".join(r for r, _ in parts).strip() or None
    got_content = "".join(c for _, c in parts).lstrip()
    assert (got_reasoning, got_content) == want
