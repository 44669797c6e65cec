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
    st = time.perf_counter()
    r.start_time = st
    last_content: float | None = None
    last_choice: float | None = None
    n_chunks = 0
    usage_tokens: int | None = None
    text_parts: list[str] = []
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
                data = json.loads(data_str)
                if "error" in data and not data.get("choices"):
                    err = data["error"]
                    r.error = f"stream error: {err.get('message') if isinstance(err, dict) else err}"
                    return r
                has_choice, text, finish = _chunk_text(data, endpoint)
                if has_choice:
                    last_choice = now
                    if finish is not None:
                        r.finish_reason = finish
                    if text:
                        if last_content is None:
                            r.ttft = now - st
                        else:
                            r.itl.append(now - last_content)
                        last_content = now
                        n_chunks += 1
                        text_parts.append(text)
                usage = data.get("usage")
                if isinstance(usage, dict):
                    if isinstance(usage.get("completion_tokens"), int):
                        usage_tokens = usage["completion_tokens"]
                    if isinstance(usage.get("prompt_tokens"), int):
                        r.prompt_len = usage["prompt_tokens"]
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as e:
        r.error = f"{type(e).__name__}: {e}"
        return r
    if last_choice is None:
        r.error = "the stream ended without a single choice chunk"
        return r
    if last_content is None:  # an empty completion: the first token time is the finishing chunk
        r.ttft = last_choice - st
    r.latency = last_choice - st
    r.generated_text = "".join(text_parts)
    if usage_tokens is not None:
        r.output_tokens, r.output_tokens_source = usage_tokens, "usage"
    else:
        r.output_tokens, r.output_tokens_source = n_chunks, "chunks"
    r.success = True
    return r


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
