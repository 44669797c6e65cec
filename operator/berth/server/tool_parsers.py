"""The tool-call formats of the model families Berth serves, chosen from the model's chat template.

- ``hermes`` (Qwen2.5/Qwen3, Hermes, many fine-tunes): ``<tool_call>{"name", "arguments"}</tool_call>``
  (``tool_calls.py``);
- ``glm45`` (GLM-4.5/4.6): ``<tool_call>NAME\\n<arg_key>K</arg_key>\\n<arg_value>V</arg_value>...</tool_call>``,
  values as text (strings) or JSON (everything else);
- ``llama3_json`` (Llama 3.1+): the whole answer is ``{"name", "parameters"}`` (or several joined by
  ``;``), optionally after ``<|python_tag|>``;
- ``mistral``: ``[TOOL_CALLS][{"name", "arguments"}, ...]`` or, in newer tokenizers,
  ``[TOOL_CALLS]NAME[ARGS]{...}`` per call.

Each format has ``parse(text, tools)`` -> (content, calls) and a ``splitter()`` for streams that
releases content at once and holds back what may be a call. Text that looks like a call but does not
parse stays content: nothing is lost. Formats whose markers are special tokens say so
(``keeps_special_tokens``), so the engine does not drop them from the text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Protocol

from berth.server import tool_calls
from berth.server.tool_calls import ToolCall

Tools = list[dict[str, Any]] | None


class Splitter(Protocol):
    def feed(self, delta: str) -> str: ...

    def finish(self) -> tuple[str, list[ToolCall]]: ...


class ToolFormat(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def keeps_special_tokens(self) -> bool: ...

    def parse(self, text: str, tools: Tools = None) -> tuple[str | None, list[ToolCall]]: ...

    def splitter(self, tools: Tools = None) -> Splitter: ...


class MarkerSplitter:
    """Release text up to the first ``marker``; from there hold everything; parse it at the end."""

    def __init__(self, fmt: ToolFormat, marker: str, tools: Tools, at_start_only: bool = False) -> None:
        self._fmt = fmt
        self._marker = marker
        self._tools = tools
        self._start_only = at_start_only
        self._pending = ""
        self._in_call = False
        self._content = ""

    def _could_start(self, text: str) -> bool:
        stripped = text.lstrip()
        return bool(stripped) and (stripped.startswith(self._marker) or self._marker.startswith(stripped))

    def feed(self, delta: str) -> str:
        if self._in_call:
            self._pending += delta
            return ""
        text = self._pending + delta
        if self._start_only:
            if not self._content and (self._could_start(text) or not text.strip()):
                self._in_call = text.lstrip().startswith(self._marker)
                self._pending = text
                return ""
            self._pending = ""
            self._content += text
            return text
        at = text.find(self._marker)
        if at >= 0:
            self._in_call = True
            self._pending = text[at:]
            out = text[:at]
        else:
            keep = next(
                (
                    k
                    for k in range(min(len(self._marker) - 1, len(text)), 0, -1)
                    if self._marker.startswith(text[-k:])
                ),
                0,
            )
            out, self._pending = (text[:-keep], text[-keep:]) if keep else (text, "")
        self._content += out
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        held, self._pending = self._pending, ""
        if not self._in_call:
            return held, []
        _, calls = self._fmt.parse(self._content + held, self._tools)
        return ("", calls) if calls else (held, [])


@dataclass(frozen=True)
class Hermes:
    name: str = "hermes"
    keeps_special_tokens: bool = False

    def parse(self, text: str, tools: Tools = None) -> tuple[str | None, list[ToolCall]]:
        return tool_calls.parse(text)

    def splitter(self, tools: Tools = None) -> Splitter:
        return tool_calls.StreamSplitter()


def _param_types(tools: Tools, name: str) -> dict[str, Any]:
    for tool in tools or []:
        fn = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(fn, dict) and fn.get("name") == name:
            props = (fn.get("parameters") or {}).get("properties") or {}
            return {k: (v or {}).get("type") for k, v in props.items() if isinstance(v, dict)}
    return {}


_GLM_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_GLM_ARG = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.DOTALL)


@dataclass(frozen=True)
class Glm45:
    name: str = "glm45"
    keeps_special_tokens: bool = True

    def _call(self, body: str, tools: Tools) -> ToolCall | None:
        fname, _, rest = body.strip().partition("\n") if "<arg_key>" in body else (body.strip(), "", "")
        fname = fname.strip()
        if not fname or "<" in fname:
            return None
        types = _param_types(tools, fname)
        args: dict[str, Any] = {}
        for key, raw in _GLM_ARG.findall(rest):
            key = key.strip()
            if types.get(key) == "string":
                args[key] = raw
                continue
            try:
                args[key] = json.loads(raw)
            except ValueError:
                args[key] = raw
        if _GLM_ARG.sub("", rest).strip():
            return None
        return ToolCall(fname, json.dumps(args, ensure_ascii=False))

    def parse(self, text: str, tools: Tools = None) -> tuple[str | None, list[ToolCall]]:
        start = text.find("<tool_call>")
        if start < 0:
            return text, []
        calls = []
        for m in _GLM_CALL.finditer(text, start):
            call = self._call(m.group(1), tools)
            if call is None:
                return text, []
            calls.append(call)
        if not calls or _GLM_CALL.sub("", text[start:]).strip():
            return text, []
        return text[:start].strip() or None, calls

    def splitter(self, tools: Tools = None) -> Splitter:
        return MarkerSplitter(self, "<tool_call>", tools)


def _json_calls(raw: str, key: str) -> list[ToolCall] | None:
    """Calls from a JSON object or list of ``{"name", key}``; None when it is not that."""
    try:
        obj = json.loads(raw)
    except ValueError:
        return None
    items = obj if isinstance(obj, list) else [obj]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
            return None
        args = item.get(key, item.get("arguments", item.get("parameters", {})))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                return None
        if not isinstance(args, dict):
            return None
        calls.append(ToolCall(item["name"], json.dumps(args, ensure_ascii=False)))
    return calls


@dataclass(frozen=True)
class Llama3Json:
    name: str = "llama3_json"
    keeps_special_tokens: bool = True
    tag: str = "<|python_tag|>"

    def parse(self, text: str, tools: Tools = None) -> tuple[str | None, list[ToolCall]]:
        body = text.strip().removeprefix(self.tag).strip()
        if not body.startswith("{"):
            return text, []
        calls: list[ToolCall] = []
        decoder = json.JSONDecoder()
        pos = 0
        while pos < len(body):
            try:
                obj, pos = decoder.raw_decode(body, pos)
            except ValueError:
                return text, []
            found = _json_calls(json.dumps(obj), "parameters")
            if found is None:
                return text, []
            calls += found
            rest = body[pos:].lstrip()
            if rest and not rest.startswith(";"):
                return text, []
            pos = len(body) - len(rest.removeprefix(";").lstrip())
        return None, calls

    def splitter(self, tools: Tools = None) -> Splitter:
        return _AnyStart(self, ("{", self.tag), tools)


class _AnyStart(MarkerSplitter):
    """Llama 3: a call is the whole answer, starting with ``{`` or the python tag."""

    def __init__(self, fmt: ToolFormat, starts: tuple[str, ...], tools: Tools) -> None:
        super().__init__(fmt, starts[0], tools, at_start_only=True)
        self._starts = starts

    def _could_start(self, text: str) -> bool:
        stripped = text.lstrip()
        return bool(stripped) and any(s.startswith(stripped) or stripped.startswith(s) for s in self._starts)

    def feed(self, delta: str) -> str:
        out = super().feed(delta)
        if (
            not self._in_call
            and self._pending
            and any(self._pending.lstrip().startswith(s) for s in self._starts)
        ):
            self._in_call = True
        return out


_MISTRAL_ARGS = re.compile(r"\[TOOL_CALLS\]\s*([^\[\]{}\s]+)\s*\[ARGS\]\s*", re.DOTALL)


@dataclass(frozen=True)
class Mistral:
    name: str = "mistral"
    keeps_special_tokens: bool = True
    marker: str = "[TOOL_CALLS]"

    def parse(self, text: str, tools: Tools = None) -> tuple[str | None, list[ToolCall]]:
        start = text.find(self.marker)
        if start < 0:
            return text, []
        rest = text[start:]
        if "[ARGS]" in rest:  # [TOOL_CALLS]name[ARGS]{...} per call
            calls = self._named(rest)
        else:
            calls = _json_calls(rest.removeprefix(self.marker).strip(), "arguments")
        if not calls:
            return text, []
        return text[:start].strip() or None, calls

    def _named(self, rest: str) -> list[ToolCall] | None:
        calls: list[ToolCall] = []
        decoder = json.JSONDecoder()
        pos = 0
        while pos < len(rest):
            m = _MISTRAL_ARGS.match(rest, pos)
            if m is None:
                return None
            try:
                args, end = decoder.raw_decode(rest, m.end())
            except ValueError:
                return None
            if not isinstance(args, dict):
                return None
            calls.append(ToolCall(m.group(1), json.dumps(args, ensure_ascii=False)))
            pos = end
            while pos < len(rest) and rest[pos].isspace():
                pos += 1
        return calls

    def splitter(self, tools: Tools = None) -> Splitter:
        return MarkerSplitter(self, self.marker, tools)


FORMATS: dict[str, ToolFormat] = {f.name: f for f in (Hermes(), Glm45(), Llama3Json(), Mistral())}
# Markers in a chat template, most specific first: the format the model was taught.
_TEMPLATE_MARKERS: tuple[tuple[str, str], ...] = (
    ("<arg_key>", "glm45"),
    ("[TOOL_CALLS]", "mistral"),
    ("<tool_call>", "hermes"),
    ("<|python_tag|>", "llama3_json"),
    ('"parameters"', "llama3_json"),
)


def for_template(template: str | None) -> ToolFormat:
    """The format a chat template teaches its model (Hermes when it names none)."""
    for marker, name in _TEMPLATE_MARKERS:
        if template and marker in template:
            return FORMATS[name]
    return FORMATS["hermes"]
