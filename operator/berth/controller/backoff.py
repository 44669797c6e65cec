"""Backoff and rate limits that respect the API server: pure, thread-safe, no Kubernetes client.

- `Backoff`: per-key exponential delay with jitter (1 s, 2 s, 4 s, ... up to a cap), reset on success;
  a server's Retry-After is a floor under it.
- `TokenBucket`: the operator's own client-side QPS/burst limit (client-go's token bucket).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Hashable


class Backoff:
    """Per-key exponential backoff with jitter: the n-th failure in a row waits base * 2**(n-1), at
    most `cap`, multiplied by a random factor in [1 - jitter, 1 + jitter] (so keys that failed
    together do not retry together)."""

    def __init__(
        self,
        base: float = 1.0,
        cap: float = 300.0,
        jitter: float = 0.2,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if base <= 0 or cap < base or not 0 <= jitter < 1:
            raise ValueError("backoff needs 0 < base <= cap and 0 <= jitter < 1")
        self.base = base
        self.cap = cap
        self.jitter = jitter
        self._rand = rand
        self._failures: dict[Hashable, int] = {}
        self._lock = threading.Lock()

    def failures(self, key: Hashable) -> int:
        with self._lock:
            return self._failures.get(key, 0)

    def failure(self, key: Hashable, retry_after: float | None = None) -> float:
        """Record a failure of `key`; the delay before its next try (never below `retry_after`)."""
        with self._lock:
            n = self._failures.get(key, 0) + 1
            self._failures[key] = n
        delay = float(min(self.cap, self.base * 2.0 ** min(n - 1, 62)))
        delay *= 1 + self.jitter * (2 * self._rand() - 1)
        if retry_after is not None:
            delay = max(delay, retry_after)
        return delay

    def success(self, key: Hashable) -> None:
        """`key` worked: its next failure starts from `base` again."""
        with self._lock:
            self._failures.pop(key, None)


class TokenBucket:
    """At most `qps` acquisitions per second on average, `burst` at once; `qps <= 0` means no limit."""

    def __init__(
        self,
        qps: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.qps = qps
        self.burst = max(1, burst)
        self._clock = clock
        self._sleep = sleep
        self._tokens = float(self.burst)
        self._last = clock()
        self._lock = threading.Lock()

    def reserve(self) -> float:
        """Take a token; the seconds to wait before using it (0: now)."""
        if self.qps <= 0:
            return 0.0
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.qps)
            self._last = now
            self._tokens -= 1
            return 0.0 if self._tokens >= 0 else -self._tokens / self.qps

    def acquire(self) -> float:
        """Wait for a token; returns the seconds waited."""
        wait = self.reserve()
        if wait > 0:
            self._sleep(wait)
        return wait
