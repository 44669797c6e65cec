"""Tool calls in generated text, in the Hermes format that Qwen2.5/Qwen3, Hermes and others use.

Their chat templates tell the model to answer a call as::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

``parse`` splits a finished text into content and calls; ``StreamSplitter`` does the same while
text streams in: it releases content at once and holds back everything from the first
``<tool_call>`` on (and a tail that may still become one), so a client never sees a half call as
content. Text that looks like a call but does not parse stays content: nothing is lost.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

OPEN = "<tool_call>"
CLOSE = "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"(.*?)(?:" + re.escape(CLOSE) + r"|\Z)", re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text (what OpenAI's function.arguments holds)
    id: str = field(default_factory=lambda: "call_" + secrets.token_hex(12))

    def openai(self, index: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        if index is not None:
            out["index"] = index
        return out


def _call(raw: str) -> ToolCall | None:
    try:
        obj = json.loads(raw.strip())
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def parse(text: str) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a finished text; ``(text, [])`` when it holds no well-formed call."""
    start = text.find(OPEN)
    if start < 0:
        return text, []
    calls: list[ToolCall] = []
    for m in _BLOCK.finditer(text, start):
        call = _call(m.group(1))
        if call is None:
            return text, []
        calls.append(call)
    rest = _BLOCK.sub("", text[start:]).strip()
    if rest:  # text after or between the calls that is not a call: keep the whole text as content
        return text, []
    content = text[:start].strip()
    return content or None, calls


def arguments_for_template(tool_calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Earlier assistant tool calls as chat templates expect them: ``arguments`` as an object."""
    out: list[dict[str, Any]] = []
    for call in tool_calls:
        fn = call.get("function")
        if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
            try:
                args = json.loads(fn["arguments"])
            except ValueError:
                args = None
            if isinstance(args, dict):
                call = {**call, "function": {**fn, "arguments": args}}
        out.append(call)
    return out


class StreamSplitter:
    """Feed text deltas; get back the content that is safe to send now; ``finish`` gives the rest."""

    def __init__(self) -> None:
        self._pending = ""
        self._in_call = False
        self._content = ""

    def feed(self, delta: str) -> str:
        if self._in_call:
            self._pending += delta
            return ""
        text = self._pending + delta
        at = text.find(OPEN)
        if at >= 0:
            self._in_call = True
            self._pending = text[at:]
            out = text[:at]
        else:
            keep = next(
                (k for k in range(min(len(OPEN) - 1, len(text)), 0, -1) if OPEN.startswith(text[-k:])), 0
            )
            out, self._pending = (text[:-keep], text[-keep:]) if keep else (text, "")
        self._content += out
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(content still to send, calls). When the held-back text is no valid call, it is content."""
        held, self._pending = self._pending, ""
        if not self._in_call:
            return held, []
        _, calls = parse(self._content + held)  # the content before the first call went out already
        return ("", calls) if calls else (held, [])
