"""A deduplicating work queue of ModelDeployment keys with N worker threads (client-go's workqueue).

Watch events and the resync loop only `add` keys; workers take them one at a time. The rules:

- a key waiting in the queue is there once, however many times it was added (a burst of 50 pod
  events of one rollout is one reconcile, or two if it arrives while that one runs);
- a key is never processed by two workers at once: added while it is being processed, it is marked
  dirty and queued again when the worker is done, so it is processed at least once after its last add;
- a failed key comes back after its backoff delay (`add_after`), an explicit requeue after the delay
  the handler returned; an `add` in the meantime brings it forward.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)

# The handler: process one key; return None when done, or seconds after which to process it again.
Handler = Callable[[K], float | None]
# Called with the key and the exception when the handler raised; returns the retry delay (None: drop).
OnError = Callable[[K, Exception], float | None]


class WorkQueue(Generic[K]):
    def __init__(
        self,
        handler: Handler[K],
        on_error: OnError[K],
        workers: int = 4,
        name: str = "reconcile",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if workers < 1:
            raise ValueError("a work queue needs at least one worker")
        self.handler = handler
        self.on_error = on_error
        self.workers = workers
        self.name = name
        self._clock = clock
        self._queue: deque[K] = deque()
        self._dirty: set[K] = set()  # waiting to be processed (queued, or re-added while processing)
        self._processing: set[K] = set()
        self._delayed: list[tuple[float, int, K]] = []  # (due, seq, key), a heap
        self._due: dict[K, float] = {}  # the earliest due time per delayed key
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self._threads: list[threading.Thread] = []
        self.processed = 0  # handler calls, for tests and metrics

    # ---- adding --------------------------------------------------------------------------------

    def add(self, key: K) -> None:
        """Process `key` soon (once, however often it is added before a worker takes it)."""
        with self._cond:
            self._add_locked(key)

    def _add_locked(self, key: K) -> None:
        if self._stopped or key in self._dirty:
            return
        self._dirty.add(key)
        self._due.pop(key, None)  # an add now supersedes a later retry
        if key not in self._processing:
            self._queue.append(key)
            self._cond.notify()

    def add_after(self, key: K, delay: float) -> None:
        """Process `key` after `delay` seconds (an earlier add or add_after wins)."""
        if delay <= 0:
            self.add(key)
            return
        with self._cond:
            if self._stopped or key in self._dirty:
                return
            due = self._clock() + delay
            if key in self._due and self._due[key] <= due:
                return
            self._due[key] = due
            heapq.heappush(self._delayed, (due, next(self._seq), key))
            self._cond.notify_all()

    # ---- state ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        with self._cond:
            return len(self._queue)

    def pending(self) -> set[K]:
        """Keys queued or delayed (for tests)."""
        with self._cond:
            return set(self._dirty) | set(self._due)

    def idle(self) -> bool:
        with self._cond:
            return not self._queue and not self._processing

    # ---- workers -------------------------------------------------------------------------------

    def _promote_due_locked(self) -> float | None:
        """Move delayed keys that are due into the queue; seconds until the next one (None: none)."""
        now = self._clock()
        while self._delayed:
            due, _, key = self._delayed[0]
            if self._due.get(key) != due:  # superseded by an add or an earlier add_after
                heapq.heappop(self._delayed)
                continue
            if due > now:
                return due - now
            heapq.heappop(self._delayed)
            del self._due[key]
            self._add_locked(key)
        return None

    def get(self, timeout: float | None = None) -> K | None:
        """The next key to process (now marked processing), or None when stopped or timed out."""
        deadline = None if timeout is None else self._clock() + timeout
        with self._cond:
            while True:
                if self._stopped:
                    return None
                wait = self._promote_due_locked()
                if self._queue:
                    key = self._queue.popleft()
                    self._dirty.discard(key)
                    self._processing.add(key)
                    return key
                if deadline is not None:
                    left = deadline - self._clock()
                    if left <= 0:
                        return None
                    wait = left if wait is None else min(wait, left)
                self._cond.wait(wait)

    def done(self, key: K) -> None:
        """The worker finished `key`; re-queue it if it was added meanwhile."""
        with self._cond:
            self._processing.discard(key)
            if key in self._dirty:
                self._queue.append(key)
                self._cond.notify()

    def process_one(self, timeout: float | None = None) -> bool:
        """Take one key and run the handler on it (what each worker thread does in a loop)."""
        key = self.get(timeout)
        if key is None:
            return False
        try:
            self.processed += 1
            delay = self.handler(key)
        except Exception as e:
            try:
                delay = self.on_error(key, e)
            except Exception:  # the error path must not kill the worker
                log.exception("%s: error handler failed for %s", self.name, key)
                delay = None
        finally:
            self.done(key)
        if delay is not None:
            self.add_after(key, delay)
        return True

    def _work(self) -> None:
        while not self._stopped:
            self.process_one()

    def start(self) -> None:
        for i in range(self.workers):
            thread = threading.Thread(target=self._work, name=f"berth-{self.name}-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, join: float = 0.0) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if join:
            deadline = time.monotonic() + join
            for thread in self._threads:
                thread.join(max(0.0, deadline - time.monotonic()))
