"""Usage flushes from several gateway replicas: optimistic concurrency, nothing counted twice or lost."""

from __future__ import annotations

import copy
import threading
from datetime import UTC, datetime
from typing import Any

from kubernetes.client.exceptions import ApiException

from berth.gateway.kube import flush_usage
from berth.gateway.usage import Delta, UsageBook


class FakeCustom:
    """An ApiKey store with the API server's resourceVersion precondition on status patches."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.obj: dict[str, Any] = {"metadata": {"name": "ci", "resourceVersion": "1"}, "status": {}}
        self.conflicts = 0
        self.before_patch: Any = None

    def get_namespaced_custom_object_status(self, *args: Any) -> dict[str, Any]:
        with self.lock:
            return copy.deepcopy(self.obj)

    def patch_namespaced_custom_object_status(
        self, g: str, v: str, ns: str, plural: str, name: str, body: dict[str, Any]
    ) -> None:
        if self.before_patch is not None:
            hook, self.before_patch = self.before_patch, None
            hook()
        with self.lock:
            if name not in ("ci",):
                raise ApiException(status=404)
            if body["metadata"]["resourceVersion"] != self.obj["metadata"]["resourceVersion"]:
                self.conflicts += 1
                raise ApiException(status=409)
            self.obj["status"].update(body["status"])
            self.obj["metadata"]["resourceVersion"] = str(int(self.obj["metadata"]["resourceVersion"]) + 1)


def test_a_conflict_puts_the_delta_back_and_the_next_flush_lands_it() -> None:
    custom = FakeCustom()
    a, b = UsageBook(), UsageBook()
    a.record("ns", "ci", Delta(2, 20, 10, datetime(2026, 1, 1, tzinfo=UTC)))
    b.record("ns", "ci", Delta(3, 30, 15, datetime(2026, 1, 2, tzinfo=UTC)))
    # replica b writes between replica a's read and its patch
    custom.before_patch = lambda: flush_usage(None, b, custom)
    assert flush_usage(None, a, custom) == 0 and custom.conflicts == 1
    assert flush_usage(None, a, custom) == 1
    assert custom.obj["status"]["usage"] == {
        "requests": 5,
        "promptTokens": 50,
        "completionTokens": 25,
        "lastUsed": "2026-01-02T00:00:00Z",
    }
    assert a.take() == {} and b.take() == {}


def test_many_replicas_flushing_at_once_sum_exactly() -> None:
    custom = FakeCustom()
    books = [UsageBook() for _ in range(4)]
    for i, book in enumerate(books):
        for _ in range(25):
            book.record("ns", "ci", Delta(1, i + 1, 2))

    def run(book: UsageBook) -> None:
        for _ in range(50):
            flush_usage(None, book, custom)
            if not book.take_peek():
                return

    threads = [threading.Thread(target=run, args=(b,)) for b in books]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    usage = custom.obj["status"]["usage"]
    assert usage["requests"] == 100
    assert usage["promptTokens"] == 25 * (1 + 2 + 3 + 4)
    assert usage["completionTokens"] == 200


def test_a_deleted_key_drops_its_usage() -> None:
    custom = FakeCustom()
    book = UsageBook()
    book.record("ns", "gone", Delta(1, 1, 1))
    assert flush_usage(None, book, custom) == 0
    assert book.take() == {}
