"""One streamed request against an OpenAI-compatible endpoint, timed on the client.

The request asks for ``stream_options.include_usage`` so the final chunk carries the server's
token counts; when a server does not send ``usage``, the output length is the number of
content chunks (one token per chunk is what OpenAI-style servers send).

A *content chunk* is an SSE event whose first choice carries non-empty generated text
(``delta.content`` for chat, ``text`` for completions). A role-only opening chunk (Berth and
others send ``{"role": "assistant", "content": ""}`` before generating) is not the first
token, so it does not end TTFT.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Literal

import httpx

from berth.bench.metrics import RequestResult

Endpoint = Literal["chat", "completions"]
ENDPOINT_PATHS: dict[str, str] = {"chat": "/chat/completions", "completions": "/completions"}


@dataclass(frozen=True)
class RequestSpec:
    prompt: str
    prompt_len: int
    output_len: int


def api_url(base_url: str, endpoint: Endpoint) -> str:
    """``base_url`` with or without the trailing /v1."""
    base = base_url.rstrip("/")
    if not base.endswith("/v1"):
        base += "/v1"
    return base + ENDPOINT_PATHS[endpoint]


def build_payload(
    endpoint: Endpoint,
    model: str,
    spec: RequestSpec,
    *,
    ignore_eos: bool,
    temperature: float | None,
    extra_body: dict[str, Any] | None = None,
) -> dict[str, Any]:
    payload: dict[str, Any] = {"model": model, "stream": True, "stream_options": {"include_usage": True}}
    if endpoint == "chat":
        payload["messages"] = [{"role": "user", "content": spec.prompt}]
        payload["max_completion_tokens"] = spec.output_len
        payload["max_tokens"] = spec.output_len  # servers that predate max_completion_tokens
    else:
        payload["prompt"] = spec.prompt
        payload["max_tokens"] = spec.output_len
    if ignore_eos:
        payload["ignore_eos"] = True
    if temperature is not None:
        payload["temperature"] = temperature
    if extra_body:
        payload.update(extra_body)
    return payload


def _chunk_text(data: dict[str, Any], endpoint: Endpoint) -> tuple[bool, str, str | None]:
    """(has choices, text, finish_reason) of one SSE event."""
    choices = data.get("choices") or []
    if not choices:
        return False, "", None
    c = choices[0]
    text = ((c.get("delta") or {}).get("content") if endpoint == "chat" else c.get("text")) or ""
    return True, text, c.get("finish_reason")


class _Stream:
    """The chunks of one stream so far, timed; ``finish`` turns them into the request's result."""

    def __init__(self, result: RequestResult, endpoint: Endpoint) -> None:
        self.r = result
        self.endpoint = endpoint
        self.last_content: float | None = None
        self.last_choice: float | None = None
        self.n_chunks = 0
        self.usage_tokens: int | None = None
        self.text_parts: list[str] = []

    def event(self, data: dict[str, Any], now: float) -> bool:
        """Take one SSE event that arrived at ``now``; False (and the error recorded) for an error event."""
        if "error" in data and not data.get("choices"):
            err = data["error"]
            self.r.error = f"stream error: {err.get('message') if isinstance(err, dict) else err}"
            return False
        has_choice, text, finish = _chunk_text(data, self.endpoint)
        if has_choice:
            self.last_choice = now
            if finish is not None:
                self.r.finish_reason = finish
            if text:
                self._content(text, now)
        usage = data.get("usage")
        if isinstance(usage, dict):
            self._usage(usage)
        return True

    def _content(self, text: str, now: float) -> None:
        if self.last_content is None:
            self.r.ttft = now - self.r.start_time
        else:
            self.r.itl.append(now - self.last_content)
        self.last_content = now
        self.n_chunks += 1
        self.text_parts.append(text)

    def _usage(self, usage: dict[str, Any]) -> None:
        if isinstance(usage.get("completion_tokens"), int):
            self.usage_tokens = usage["completion_tokens"]
        if isinstance(usage.get("prompt_tokens"), int):
            self.r.prompt_len = usage["prompt_tokens"]

    def finish(self) -> RequestResult:
        r, st = self.r, self.r.start_time
        if self.last_choice is None:
            r.error = "the stream ended without a single choice chunk"
            return r
        if self.last_content is None:  # an empty completion: the first token time is the finishing chunk
            r.ttft = self.last_choice - st
        r.latency = self.last_choice - st
        r.generated_text = "".join(self.text_parts)
        if self.usage_tokens is not None:
            r.output_tokens, r.output_tokens_source = self.usage_tokens, "usage"
        else:
            r.output_tokens, r.output_tokens_source = self.n_chunks, "chunks"
        r.success = True
        return r


async def send_request(
    client: httpx.AsyncClient,
    url: str,
    payload: dict[str, Any],
    endpoint: Endpoint,
    spec: RequestSpec,
    headers: dict[str, str],
) -> RequestResult:
    """Send one streaming request and time its chunks; never raises (errors land in the result)."""
    r = RequestResult(prompt_len=spec.prompt_len)
    r.start_time = time.perf_counter()
    stream = _Stream(r, endpoint)
    try:
        async with client.stream("POST", url, json=payload, headers=headers) as resp:
            r.status_code = resp.status_code
            if resp.status_code != 200:
                body = (await resp.aread()).decode("utf-8", "replace")
                r.error = f"HTTP {resp.status_code}: {_error_message(body)}"
                return r
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, comments (": ping"), event:/id: fields
                data_str = line[5:].strip()
                if data_str == "[DONE]":
                    break
                now = time.perf_counter()
                if not stream.event(json.loads(data_str), now):
                    return r
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as e:
        r.error = f"{type(e).__name__}: {e}"
        return r
    return stream.finish()


def _error_message(body: str) -> str:
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        return body[:500]
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict) and "message" in err:
        return str(err["message"])[:500]
    if isinstance(err, str):
        return err[:500]
    return body[:500]
