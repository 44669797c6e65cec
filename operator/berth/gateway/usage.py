"""Usage per key, kept as deltas since the last successful flush to ``ApiKey.status.usage``.

The flusher takes the pending deltas, adds them to the status it read (optimistic concurrency on
``resourceVersion``), and on a conflict puts them back to be retried: never counted twice, and a
crash loses at most one flush interval.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import UTC, datetime


@dataclass
class Delta:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    last_used: datetime | None = None

    def add(self, other: Delta) -> None:
        self.requests += other.requests
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        if other.last_used is not None and (self.last_used is None or other.last_used > self.last_used):
            self.last_used = other.last_used

    def apply(self, usage: dict[str, object]) -> dict[str, object]:
        """The status ``usage`` object after adding this delta."""

        def num(name: str) -> int:
            value = usage.get(name, 0)
            return (
                int(value) if isinstance(value, int | float | str) and str(value).lstrip("-").isdigit() else 0
            )

        out: dict[str, object] = {
            "requests": num("requests") + self.requests,
            "promptTokens": num("promptTokens") + self.prompt_tokens,
            "completionTokens": num("completionTokens") + self.completion_tokens,
        }
        prev = usage.get("lastUsed")
        last = self.last_used.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if self.last_used else None
        # the later of the two: another replica may have flushed a more recent use first
        if isinstance(prev, str) and (last is None or prev > last):
            last = prev
        if last is not None:
            out["lastUsed"] = last
        return out


class UsageBook:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, str], Delta] = {}

    def record(self, namespace: str, name: str, delta: Delta) -> None:
        with self._lock:
            self._pending.setdefault((namespace, name), Delta()).add(delta)

    def take(self) -> dict[tuple[str, str], Delta]:
        with self._lock:
            pending, self._pending = self._pending, {}
        return pending

    def take_peek(self) -> bool:
        """Whether deltas are pending (without taking them)."""
        with self._lock:
            return bool(self._pending)

    def put_back(self, namespace: str, name: str, delta: Delta) -> None:
        self.record(namespace, name, delta)
