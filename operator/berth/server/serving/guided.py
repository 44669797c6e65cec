"""Structured outputs at the protocol edge: OpenAI's ``response_format``, TGI's ``grammar`` and a
forced ``tool_choice`` turned into the engine's ``GuidedSpec`` (see ``engine/guided.py``).

A forced tool choice (``"required"`` or a named function) constrains the output to JSON that names
the tool(s) and carries arguments valid for their ``parameters`` schema, and the answer is read back
as ``tool_calls`` from that JSON (not from the chat template's call markers, which the grammar does
not produce): a named function's output is its arguments object; ``"required"`` produces a list of
``{"name": ..., "arguments": {...}}`` with at least one call.
"""

from __future__ import annotations

import json
from typing import Any

from berth.server.engine.guided import schema_spec
from berth.server.engine.types import GuidedSpec, ParamError
from berth.server.protocol import ResponseFormat, TGIGrammar
from berth.server.serving.errors import bad_param
from berth.server.tool_calls import ToolCall


def _spec(schema: Any, param: str) -> GuidedSpec:
    try:
        return schema_spec(schema, param)
    except ParamError as exc:
        raise bad_param(exc.param, str(exc)) from exc


def response_format_spec(rf: ResponseFormat | None) -> GuidedSpec | None:
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        return GuidedSpec("json_object", param="response_format")
    js = rf.json_schema
    if not isinstance(js, dict) or "schema" not in js:
        raise bad_param(
            "response_format.json_schema",
            "response_format json_schema needs json_schema.schema (the JSON schema the output follows)",
        )
    return _spec(js["schema"], "response_format")


def grammar_spec(g: TGIGrammar | None) -> GuidedSpec | None:
    if g is None:
        return None
    if g.type == "regex":
        if not isinstance(g.value, str) or not g.value:
            raise bad_param("grammar", "a regex grammar needs the pattern as a non-empty string value")
        return GuidedSpec("regex", g.value, param="grammar")
    if g.type == "json_object" or g.value in (None, {}, ""):
        return GuidedSpec("json_object", param="grammar")
    return _spec(g.value, "grammar")


def _functions(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad_param(f"tools[{i}]", "each tool needs function.name")
        params = fn.get("parameters")
        out[fn["name"]] = params if isinstance(params, dict) and params else {"type": "object"}
    return out


def forced_tool(
    tools: list[dict[str, Any]] | None, tool_choice: Any, parallel: bool | None = None
) -> tuple[GuidedSpec, str | None] | None:
    """The spec of a forced tool choice, and the forced function's name (None for ``required``).

    ``parallel`` is OpenAI's ``parallel_tool_calls``: False allows exactly one call."""
    if not tools or tool_choice in (None, "none", "auto"):
        return None
    functions = _functions(tools)
    if tool_choice == "required":
        calls = [
            {
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": params},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for name, params in functions.items()
        ]
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        if parallel is False:
            schema["maxItems"] = 1
        return _spec(schema, "tool_choice"), None
    name = None
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise bad_param(
            "tool_choice",
            "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}",
        )
    if name not in functions:
        raise bad_param("tool_choice", f"tool_choice names {name!r}, which is not among the tools")
    return _spec(functions[name], "tool_choice"), name


def forced_calls(text: str, name: str | None) -> list[ToolCall]:
    """The tool calls of a forced tool choice's output (empty if it was cut short: not valid JSON)."""
    try:
        value = json.loads(text)
    except ValueError:
        return []
    if name is not None:
        return [ToolCall(name, json.dumps(value, ensure_ascii=False))]
    if not isinstance(value, list):
        return []
    return [
        ToolCall(c["name"], json.dumps(c.get("arguments", {}), ensure_ascii=False))
        for c in value
        if isinstance(c, dict) and isinstance(c.get("name"), str)
    ]


class ForcedSplitter:
    """The streamed form of ``forced_calls``: holds the JSON back, then sends it as tool calls."""

    def __init__(self, name: str | None) -> None:
        self._name = name
        self._held = ""

    def feed(self, delta: str) -> str:
        self._held += delta
        return ""

    def finish(self) -> tuple[str, list[ToolCall]]:
        calls = forced_calls(self._held, self._name)
        return ("", calls) if calls else (self._held, [])
