"""The work queue: one entry per key, never two workers on a key, processed after its last add, retries."""

from __future__ import annotations

import threading
import time

import pytest

from berth.controller.backoff import Backoff, TokenBucket
from berth.controller.workqueue import WorkQueue


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _never(key: str, e: Exception) -> float | None:
    raise AssertionError(f"{key}: {e}")


def test_adds_of_a_waiting_key_are_one_entry() -> None:
    seen: list[str] = []
    q: WorkQueue[str] = WorkQueue(lambda k: seen.append(k) or None, _never, workers=1)
    for _ in range(50):
        q.add("a")
    q.add("b")
    q.add("a")
    assert len(q) == 2
    while q.process_one(timeout=0):
        pass
    assert seen == ["a", "b"]


def test_a_key_added_while_processing_runs_again_after_and_never_in_parallel() -> None:
    running: set[str] = set()
    overlaps: list[str] = []
    calls: list[str] = []
    release = threading.Event()
    entered = threading.Event()
    guard = threading.Lock()

    def handle(key: str) -> float | None:
        with guard:
            if key in running:
                overlaps.append(key)
            running.add(key)
        calls.append(key)
        if len(calls) == 1:
            entered.set()
            release.wait(5)
        with guard:
            running.discard(key)
        return None

    q: WorkQueue[str] = WorkQueue(handle, _never, workers=4)
    q.start()
    try:
        q.add("a")
        assert entered.wait(5)
        for _ in range(20):  # events while the first reconcile runs: the key is dirty, not re-queued now
            q.add("a")
        time.sleep(0.1)
        assert calls == ["a"]  # no second worker took it
        release.set()
        deadline = time.monotonic() + 5
        while (len(calls) < 2 or not q.idle()) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        q.stop(join=2)
    assert calls == ["a", "a"]  # once more after its last add, and only once
    assert overlaps == []


def test_failures_come_back_after_the_error_handlers_delay_and_an_add_brings_them_forward() -> None:
    clock = Clock()
    attempts: list[str] = []

    def handle(key: str) -> float | None:
        attempts.append(key)
        raise RuntimeError("429")

    delays: list[float] = []

    def on_error(key: str, e: Exception) -> float | None:
        delays.append(10.0)
        return 10.0

    q: WorkQueue[str] = WorkQueue(handle, on_error, workers=1, clock=clock)
    q.add("a")
    assert q.process_one(timeout=0)
    assert attempts == ["a"] and q.pending() == {"a"}
    assert not q.process_one(timeout=0)  # not due yet
    clock.now += 10
    assert q.process_one(timeout=0)
    assert attempts == ["a", "a"]
    q.add("a")  # an event now supersedes the retry in 10 s
    assert q.process_one(timeout=0)
    assert attempts == ["a", "a", "a"]


def test_add_after_keeps_the_earliest_and_a_requeue_delay_from_the_handler() -> None:
    clock = Clock()
    seen: list[str] = []
    q: WorkQueue[str] = WorkQueue(lambda k: seen.append(k) or None, _never, workers=1, clock=clock)
    q.add_after("a", 5)
    q.add_after("a", 1)
    q.add_after("a", 9)
    clock.now += 1
    assert q.process_one(timeout=0) and seen == ["a"]
    clock.now += 10
    assert not q.process_one(timeout=0)  # the later add_afters were superseded: one run

    again: WorkQueue[str] = WorkQueue(lambda k: 3.0, _never, workers=1, clock=clock)
    again.add("b")
    assert again.process_one(timeout=0)
    assert again.pending() == {"b"}
    clock.now += 3
    assert again.process_one(timeout=0)


def test_a_failing_error_handler_does_not_kill_the_worker() -> None:
    def boom(key: str, e: Exception) -> float | None:
        raise ValueError("handler bug")

    def fail(key: str) -> float | None:
        raise RuntimeError("x")

    q: WorkQueue[str] = WorkQueue(fail, boom, workers=1)
    q.add("a")
    assert q.process_one(timeout=0)
    assert q.idle() and q.pending() == set()


def test_backoff_doubles_with_jitter_up_to_the_cap_and_honours_retry_after() -> None:
    b = Backoff(base=1, cap=8, jitter=0.2, rand=lambda: 0.5)  # factor 1.0
    assert [b.failure("k") for _ in range(5)] == [1, 2, 4, 8, 8]
    assert b.failure("other") == 1  # per key
    b.success("k")
    assert b.failure("k") == 1
    assert b.failure("k", retry_after=30) == 30  # the server's Retry-After is a floor
    low = Backoff(base=10, cap=100, jitter=0.2, rand=lambda: 0.0)
    high = Backoff(base=10, cap=100, jitter=0.2, rand=lambda: 1.0)
    assert low.failure("k") == pytest.approx(8) and high.failure("k") == pytest.approx(12)
    with pytest.raises(ValueError):
        Backoff(base=0)


def test_token_bucket_allows_a_burst_then_qps() -> None:
    clock = Clock()
    slept: list[float] = []
    bucket = TokenBucket(qps=10, burst=3, clock=clock, sleep=slept.append)
    assert [bucket.acquire() for _ in range(3)] == [0, 0, 0]
    assert bucket.acquire() == pytest.approx(0.1)
    assert bucket.acquire() == pytest.approx(0.2)
    clock.now += 10  # refilled, but never above the burst
    assert [bucket.reserve() for _ in range(3)] == [0, 0, 0]
    assert bucket.reserve() > 0
    unlimited = TokenBucket(qps=0, burst=1, clock=clock, sleep=slept.append)
    assert all(unlimited.acquire() == 0 for _ in range(100))
