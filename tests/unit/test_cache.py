"""Watch caches and the queue-driven handlers against in-memory fakes: reads from the cache, writes to
the API, relists after a watch expires, 429 backs off, 403 becomes a condition."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest

from berth.controller import handlers, kube
from berth.controller.cache import (
    CachedKube,
    Caches,
    Informer,
    InformerSpec,
    Store,
    operator_specs,
    remembered_specs,
)
from berth.controller.context import OperatorContext
from berth.controller.settings import OperatorSettings

from .conftest import RecordingKube


def obj(name: str, rv: str, owner: str | None = None, ns: str = "team-a", **extra: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": ns, "resourceVersion": rv, "managedFields": [{"x": 1}]}
    if owner:
        meta["labels"] = {"berth.dev/model-deployment": owner}
        meta["ownerReferences"] = [{"kind": "ModelDeployment", "name": owner, "controller": True}]
    return {"metadata": meta, **extra}


def test_store_indexes_by_owner_strips_managed_fields_and_keeps_the_newer_copy() -> None:
    store = Store(kube.POD)
    store.upsert(obj("chat-1", "5", "chat"))
    store.upsert(obj("chat-2", "6", "chat"))
    store.upsert(obj("other-1", "7", "other"))
    assert [o["metadata"]["name"] for o in store.owned("team-a", "chat")] == ["chat-1", "chat-2"]
    assert "managedFields" not in store.get("team-a", "chat-1")["metadata"]  # type: ignore[index]
    old, new = store.upsert(obj("chat-1", "4", "chat", status={"phase": "stale"}))
    assert new is old and "status" not in new  # an older copy (a late write response) is ignored
    store.delete("team-a", "chat-2")
    assert [o["metadata"]["name"] for o in store.owned("team-a", "chat")] == ["chat-1"]
    changes = store.replace("team-a", [obj("chat-1", "5", "chat"), obj("chat-3", "9", "chat")])
    # other-1 vanished while the watch was away; chat-1 is unchanged; chat-3 is new
    assert sorted(
        (o or {}).get("metadata", {}).get("name", "") + ("+" if n else "-") for o, n in changes
    ) == [
        "+",
        "other-1-",
    ]
    assert [o["metadata"]["name"] for o in store.owned("team-a", "chat")] == ["chat-1", "chat-3"]


class FakeSource:
    """Scripted LIST results and WATCH streams; a stream may end with an exception."""

    def __init__(self, lists: list[list[dict[str, Any]]], watches: list[list[Any]]) -> None:
        self.lists = lists
        self.watches = watches
        self.calls: list[tuple[str, str]] = []

    def list_page(
        self,
        kind: kube.Kind,
        namespace: str,
        label_selector: str,
        metadata_only: bool = False,
        limit: int = 500,
    ) -> tuple[list[dict[str, Any]], str]:
        items = self.lists.pop(0)
        self.calls.append(("list", ""))
        return copy.deepcopy(items), str(100 + len(self.calls))

    def watch(
        self,
        kind: kube.Kind,
        namespace: str,
        label_selector: str,
        resource_version: str,
        timeout_seconds: int,
        metadata_only: bool = False,
    ) -> Iterator[dict[str, Any]]:
        self.calls.append(("watch", resource_version))
        for event in self.watches.pop(0):
            if isinstance(event, Exception):
                raise event
            yield event


def test_informer_lists_watches_resumes_and_relists_after_410() -> None:
    source = FakeSource(
        lists=[[obj("a", "1", "m")], [obj("b", "20", "m")]],
        watches=[
            [
                {"type": "ADDED", "object": obj("b", "10", "m")},
                {"type": "MODIFIED", "object": obj("a", "11", "m")},
                {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "12"}}},
            ],
            [kube.Gone(410, "Expired", "too old resource version")],
            [],
        ],
    )
    store = Store(kube.DEPLOYMENT)
    changes: list[tuple[str | None, str | None]] = []

    def on_change(old: dict[str, Any] | None, new: dict[str, Any] | None) -> None:
        name = lambda o: None if o is None else o["metadata"]["name"]  # noqa: E731
        changes.append((name(old), name(new)))

    informer = Informer(source, InformerSpec(kube.DEPLOYMENT), store, "team-a", on_change)  # type: ignore[arg-type]
    informer.run_once()
    assert source.calls == [("list", ""), ("watch", "101")]
    assert informer.resource_version == "12"  # from the bookmark: the next watch resumes there
    assert changes == [(None, "a"), (None, "b"), ("a", "a")]
    with pytest.raises(kube.Gone):
        informer.run_once()
    assert source.calls[-1] == ("watch", "12")  # resumed, no LIST
    informer.resource_version = ""  # what run() does on 410
    changes.clear()
    informer.run_once()
    assert source.calls[-2:] == [("list", ""), ("watch", "104")]
    assert changes == [("a", None), ("b", "b")]  # a was deleted while the watch was away
    assert store.synced.is_set() and informer.lists == 2


def _context(settings: OperatorSettings, client: RecordingKube) -> OperatorContext:
    ctx = OperatorContext.create(settings, client=client)
    handlers.make_runtime(ctx)
    assert ctx.caches is not None
    for store in ctx.caches.stores.values():
        store.synced.set()
    return ctx


def _feed(ctx: OperatorContext, client: RecordingKube) -> None:
    """What the watches would deliver: every object the fake API holds, into its store."""
    assert ctx.caches is not None
    for (kind, _, _), o in client.objects.items():
        store = ctx.caches.stores.get(kind)
        if store is not None and kind != "Secret":
            store.upsert(copy.deepcopy(o))


def test_a_referenced_secret_is_looked_up_until_found(settings: OperatorSettings) -> None:
    client = RecordingKube()
    caches = Caches(operator_specs(), remembered_specs())
    reader = CachedKube(client, caches, lambda k, ns, n: k.kind != "Secret")
    assert reader.get(kube.SECRET, "team-a", "team-keys") is None
    client.objects[("Secret", "team-a", "team-keys")] = {
        "metadata": {"name": "team-keys", "namespace": "team-a"}
    }
    assert reader.get(kube.SECRET, "team-a", "team-keys") is not None
    client.clear()
    assert reader.get(kube.SECRET, "team-a", "team-keys") == {
        "metadata": {"name": "team-keys", "namespace": "team-a"}
    }
    assert client.calls == []  # remembered, metadata only


class Throttled(RecordingKube):
    def __init__(self, error: kube.ApiError) -> None:
        super().__init__()
        self.error = error
        self.failures = 1

    def create(self, kind: kube.Kind, namespace: str, body: dict[str, Any]) -> dict[str, Any] | None:
        if kind.kind == "Deployment" and self.failures:
            self.failures -= 1
            raise self.error
        return super().create(kind, namespace, body)
