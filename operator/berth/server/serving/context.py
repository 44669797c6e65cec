"""Per-request facts that the HTTP layer, auth and serving fill in: metrics and the access log."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RequestContext:
    """Per-request facts for metrics and the access log (never the key itself)."""

    route: str
    key_id: str = "-"
    request_id: str = ""
    model: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    arrival: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    finish_reasons: list[str] = field(default_factory=list)
    prompt_text: str | None = None
    completion_text: str | None = None
    error: str | None = None
    images: int = 0  # images in the prompt (chat)

    @property
    def is_warmup(self) -> bool:
        return self.route == "warmup"

    def log_fields(self, log_content: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "request_id": self.request_id or None,
            "key_id": self.key_id,
            "model": self.model,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
        }
        if self.first_token_at is not None:
            out["ttft_ms"] = round((self.first_token_at - self.arrival) * 1000, 1)
        if self.finish_reasons:
            out["finish_reason"] = ",".join(self.finish_reasons)
        if self.error:
            out["error"] = self.error
        if log_content:
            out["prompt"] = self.prompt_text
            out["completion"] = self.completion_text
        return out
