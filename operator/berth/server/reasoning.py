"""Reasoning text (``<think>...</think>``, GLM-4.5 and Qwen3) returned apart as ``reasoning_content``.

When a chat template teaches ``<think>``, the answer's text before ``</think>`` is reasoning and the rest
is content, as vLLM returns it. The reasoning may start in the prompt (a template that ends its
generation prompt with ``<think>``) or in the answer (``<think>`` first). ``split`` does it for a whole
text; ``ReasoningSplitter`` for a stream, holding back a tail that may still become a tag.
"""

from __future__ import annotations

OPEN = "<think>"
CLOSE = "</think>"


def teaches_thinking(template: str | None) -> bool:
    return bool(template) and CLOSE in str(template)


def starts_open(prompt: str) -> bool:
    """True when the prompt itself opened the reasoning (its generation prompt ends with ``<think>``)."""
    tail = prompt.rstrip()
    return tail.endswith(OPEN)


def split(text: str, opened: bool) -> tuple[str | None, str]:
    """(reasoning or None, content) of a finished answer."""
    body = text
    if not opened:
        stripped = body.lstrip()
        if not stripped.startswith(OPEN):
            return None, text
        body = stripped[len(OPEN) :]
    end = body.find(CLOSE)
    if end < 0:  # cut off while reasoning: all of it is reasoning
        return body.strip() or None, ""
    return body[:end].strip() or None, body[end + len(CLOSE) :].lstrip()


class ReasoningSplitter:
    """Feed text deltas; get (reasoning delta, content delta) pairs, safe to send now."""

    def __init__(self, opened: bool) -> None:
        self._state = "reasoning" if opened else "start"
        self._held = ""

    def _tail_that_may_be(self, text: str, tag: str) -> int:
        return next((k for k in range(min(len(tag) - 1, len(text)), 0, -1) if tag.startswith(text[-k:])), 0)

    def feed(self, delta: str) -> tuple[str, str]:
        text = self._held + delta
        self._held = ""
        if self._state == "start":
            stripped = text.lstrip()
            if not stripped:
                self._held = text
                return "", ""
            if stripped.startswith(OPEN):
                self._state = "reasoning"
                text = stripped[len(OPEN) :]
            elif OPEN.startswith(stripped):
                self._held = text
                return "", ""
            else:
                self._state = "content"
                return "", text
        if self._state in ("content", "after"):
            return "", text
        at = text.find(CLOSE)
        if at >= 0:
            self._state = "after"
            return text[:at], text[at + len(CLOSE) :].lstrip()
        keep = self._tail_that_may_be(text, CLOSE)
        if keep:
            self._held = text[-keep:]
            text = text[:-keep]
        return text, ""

    def finish(self) -> tuple[str, str]:
        held, self._held = self._held, ""
        return (held, "") if self._state == "reasoning" else ("", held)

    @property
    def in_content(self) -> bool:
        return self._state in ("content", "after")
