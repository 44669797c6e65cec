"""Per-key quotas at the gateway: requests per minute, tokens per minute, concurrent requests.

Each gateway replica enforces ``limit / replicas`` (its share; documented in docs/gateway.md), with
one-minute sliding windows. Tokens are the real ones from the upstream ``usage``, charged when a
request finishes; a key over its TPM share is refused until enough of the window has slid by.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from berth.gateway.registry import Key

WINDOW_SECONDS = 60.0


@dataclass
class _State:
    requests: deque[float] = field(default_factory=deque)
    tokens: deque[tuple[float, int]] = field(default_factory=deque)
    token_sum: int = 0
    in_flight: int = 0


@dataclass(frozen=True)
class Refusal:
    limit: str  # requests_per_minute | tokens_per_minute | max_concurrent_requests
    retry_after: int
    message: str


def share(limit: int | None, replicas: int) -> int | None:
    if limit is None:
        return None
    return max(1, limit // max(1, replicas))


class Quotas:
    def __init__(self, replicas: int = 1, clock: Callable[[], float] = time.monotonic) -> None:
        self.replicas = max(1, replicas)
        self._clock = clock
        self._state: dict[str, _State] = {}

    def _get(self, key_id: str) -> _State:
        state = self._state.get(key_id)
        if state is None:
            state = self._state[key_id] = _State()
        return state

    def _slide(self, state: _State, now: float) -> None:
        while state.requests and state.requests[0] <= now - WINDOW_SECONDS:
            state.requests.popleft()
        while state.tokens and state.tokens[0][0] <= now - WINDOW_SECONDS:
            state.token_sum -= state.tokens.popleft()[1]

    def admit(self, key: Key) -> Refusal | None:
        """Admit one request (counting it) or say which limit refuses it and for how long."""
        now = self._clock()
        state = self._get(key.key_id)
        self._slide(state, now)
        limits = key.limits
        conc = share(limits.max_concurrent_requests, self.replicas)
        if conc is not None and state.in_flight >= conc:
            return Refusal(
                "max_concurrent_requests",
                1,
                f"Too many concurrent requests for this key (limit {conc} per gateway replica).",
            )
        rpm = share(limits.requests_per_minute, self.replicas)
        if rpm is not None and len(state.requests) >= rpm:
            wait = state.requests[len(state.requests) - rpm] + WINDOW_SECONDS - now
            return Refusal(
                "requests_per_minute",
                max(1, math.ceil(wait)),
                f"Rate limit reached for requests per minute (limit {rpm} per gateway replica).",
            )
        tpm = share(limits.tokens_per_minute, self.replicas)
        if tpm is not None and state.token_sum >= tpm:
            excess, wait = state.token_sum - tpm, WINDOW_SECONDS
            for ts, n in state.tokens:
                excess -= n
                if excess < 0:
                    wait = ts + WINDOW_SECONDS - now
                    break
            return Refusal(
                "tokens_per_minute",
                max(1, math.ceil(wait)),
                f"Rate limit reached for tokens per minute (limit {tpm} per gateway replica).",
            )
        state.requests.append(now)
        state.in_flight += 1
        return None

    def finish(self, key_id: str, tokens: int) -> None:
        state = self._get(key_id)
        state.in_flight = max(0, state.in_flight - 1)
        if tokens > 0:
            state.tokens.append((self._clock(), tokens))
            state.token_sum += tokens

    def in_flight(self, key_id: str) -> int:
        return self._get(key_id).in_flight
