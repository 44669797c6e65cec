"""Least outstanding requests per endpoint; ties go round-robin so idle endpoints share the load."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from berth.gateway.registry import Endpoint


class Balancer:
    """Counts in-flight requests per endpoint. Used from the event loop only (no lock)."""

    def __init__(self) -> None:
        self._outstanding: dict[Endpoint, int] = {}
        self._tick = itertools.count()

    def outstanding(self, endpoint: Endpoint) -> int:
        return self._outstanding.get(endpoint, 0)

    def pick(self, endpoints: Iterable[Endpoint], exclude: Iterable[Endpoint] = ()) -> Endpoint | None:
        skip = set(exclude)
        candidates = [e for e in endpoints if e not in skip]
        if not candidates:
            return None
        low = min(self.outstanding(e) for e in candidates)
        best = [e for e in candidates if self.outstanding(e) == low]
        return best[next(self._tick) % len(best)]

    def acquire(self, endpoint: Endpoint) -> None:
        self._outstanding[endpoint] = self.outstanding(endpoint) + 1

    def release(self, endpoint: Endpoint) -> None:
        left = self.outstanding(endpoint) - 1
        if left > 0:
            self._outstanding[endpoint] = left
        else:
            self._outstanding.pop(endpoint, None)
