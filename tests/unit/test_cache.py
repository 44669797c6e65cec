"""Watch caches and the queue wiring against in-memory fakes: reads from the cache (never a Secret),
relists after a watch expires, events only enqueue (a burst is one key), Events are aggregated."""

from __future__ import annotations

import contextlib
import copy
import queue
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from berth.controller import kube
from berth.controller.cache import (
    Caches,
    Informer,
    InformerSpec,
    Store,
    operator_specs,
    remembered_specs,
    strip_hpa,
    strip_pod,
)
from berth.controller.cached_kube import CachedKube
from berth.controller.context import OperatorContext
from berth.controller.events import EventRecorder, EventSpec
from berth.controller.hpas import HPA
from berth.controller.settings import OperatorSettings

from .conftest import RecordingKube, md_body

NOW = datetime(2026, 11, 23, 10, 5, 0, tzinfo=UTC)


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


class _Source:
    """The Informer's Source over two hooks: ``listed`` answers a LIST, ``events`` streams a WATCH."""

    def list_page(
        self,
        kind: kube.Kind,
        namespace: str,
        label_selector: str,
        metadata_only: bool = False,
        limit: int = 500,
    ) -> tuple[list[dict[str, Any]], str]:
        return self.listed(kind, namespace, label_selector)

    def watch(
        self,
        kind: kube.Kind,
        namespace: str,
        label_selector: str,
        resource_version: str,
        timeout_seconds: int,
        metadata_only: bool = False,
    ) -> Iterator[dict[str, Any]]:
        return self.events(kind, resource_version)

    def listed(
        self, kind: kube.Kind, namespace: str, label_selector: str
    ) -> tuple[list[dict[str, Any]], str]:
        raise NotImplementedError

    def events(self, kind: kube.Kind, resource_version: str) -> Iterator[dict[str, Any]]:
        raise NotImplementedError


class FakeSource(_Source):
    """Scripted LIST results and WATCH streams; a stream may end with an exception."""

    def __init__(self, lists: list[list[dict[str, Any]]], watches: list[list[Any]]) -> None:
        self.lists = lists
        self.watches = watches
        self.calls: list[tuple[str, str]] = []

    def listed(
        self, kind: kube.Kind, namespace: str, label_selector: str
    ) -> tuple[list[dict[str, Any]], str]:
        items = self.lists.pop(0)
        self.calls.append(("list", ""))
        return copy.deepcopy(items), str(100 + len(self.calls))

    def events(self, kind: kube.Kind, resource_version: str) -> Iterator[dict[str, Any]]:
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


def test_the_cache_reads_are_memory_and_secrets_are_never_read() -> None:
    client = RecordingKube()
    caches = Caches(operator_specs(), remembered_specs())
    reader = CachedKube(client, caches)
    for store in caches.stores.values():
        store.synced.set()  # as after start_watches
    client.objects[("Secret", "team-a", "team-keys")] = {
        "metadata": {"name": "team-keys", "namespace": "team-a"}
    }
    assert reader.get(kube.SECRET, "team-a", "team-keys") is None  # not known: never a GET
    assert reader.get(kube.SERVICE, "team-a", "chat") is None
    assert reader.list(kube.POD, "team-a", "berth.dev/model-deployment=chat") == []
    assert reader.list(kube.MODEL_DEPLOYMENT, "", "") == []  # all namespaces: from the store too
    assert client.calls == []
    reader.remember(
        kube.SECRET, {"metadata": {"name": "team-keys", "namespace": "team-a"}, "data": {"k": "eA=="}}
    )
    assert reader.get(kube.SECRET, "team-a", "team-keys") == {
        "metadata": {"name": "team-keys", "namespace": "team-a"}
    }
    assert reader.fetch(kube.SERVICE, "team-a", "chat") is None and client.calls == [
        ("get", "Service", "chat", None)
    ]


def test_a_store_whose_first_list_is_not_in_leaves_the_answer_to_the_api() -> None:
    """A miss in an unsynced store (a LIST that failed, a namespace still listing) is not "absent":
    the API answers (e.g. an HPA the autoscaler must not fight), until every namespace has listed."""
    client = RecordingKube()
    hpa = {
        "metadata": {"name": "chat-hpa", "namespace": "team-b"},
        "spec": {"scaleTargetRef": {"name": "chat"}},
    }
    client.objects[("HorizontalPodAutoscaler", "team-b", "chat-hpa")] = hpa
    caches = Caches(operator_specs(), remembered_specs())
    store = caches.stores["HorizontalPodAutoscaler"]
    store.expect(["team-a", "team-b"])
    reader = CachedKube(client, caches)
    assert [o["metadata"]["name"] for o in reader.list(HPA, "team-b", "")] == ["chat-hpa"]
    assert client.calls == [("list", "HorizontalPodAutoscaler", "", None)]
    store.mark_synced("team-a")  # one namespace listed: not yet the last word
    assert not store.synced.is_set()
    store.mark_synced("team-b")
    assert store.synced.is_set()
    client.clear()
    assert reader.list(HPA, "team-b", "") == [] and client.calls == []  # from the (empty) store now


def test_an_hpa_keeps_only_its_target() -> None:
    hpa = obj(
        "chat-hpa",
        "7",
        "",
        spec={"scaleTargetRef": {"kind": "ModelDeployment", "name": "chat"}, "minReplicas": 1},
    )
    hpa["status"] = {"currentReplicas": 3}
    assert strip_hpa(hpa) == {
        "metadata": {k: v for k, v in hpa["metadata"].items() if k != "managedFields"},
        "spec": {"scaleTargetRef": {"kind": "ModelDeployment", "name": "chat"}},
    }


def test_a_pod_keeps_what_status_and_the_autoscaler_read() -> None:
    pod = obj(
        "chat-1",
        "3",
        "chat",
        spec={"nodeName": "n1", "containers": [{"name": "server", "env": [{"name": "X", "value": "y"}]}]},
        status={"podIP": "10.0.0.1", "phase": "Running"},
    )
    assert strip_pod(pod) == {
        "metadata": {k: v for k, v in pod["metadata"].items() if k != "managedFields"},
        "spec": {"nodeName": "n1"},
        "status": {"podIP": "10.0.0.1", "phase": "Running"},
    }


def _md(rv: str, generation: int = 1, status: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "metadata": {"name": "chat", "namespace": "team-a", "resourceVersion": rv, "generation": generation},
        "spec": {"capacity": 1},
        "status": status or {},
    }


def test_events_only_enqueue_and_a_burst_of_pod_events_is_one_key(settings: OperatorSettings) -> None:
    ctx = OperatorContext.create(settings, client=RecordingKube())
    assert ctx.queue is not None
    on_pod = ctx.on_change(kube.POD)
    for i in range(50):
        on_pod(obj("chat-1", str(i), "chat"), obj("chat-1", str(i + 1), "chat"))
    assert ctx.queue.pending() == {("team-a", "chat")} and len(ctx.queue) == 0  # delayed, once
    on_md = ctx.on_change(kube.MODEL_DEPLOYMENT)
    on_md(_md("1"), _md("2", status={"phase": "Running"}))  # its own status write: nothing to do
    assert len(ctx.queue) == 0
    on_md(_md("2"), _md("3", generation=2))  # a spec change: at once (and supersedes the delayed add)
    assert len(ctx.queue) == 1 and ctx.queue.pending() == {("team-a", "chat")}
    assert ctx.take_trigger(("team-a", "chat")) == "pod"  # the first reason it was queued for


def test_a_deleted_model_deployment_is_forgotten(settings: OperatorSettings) -> None:
    ctx = OperatorContext.create(settings, client=RecordingKube())
    ctx.client.remember(
        kube.SECRET,
        {
            "metadata": {
                "name": "chat-api-keys",
                "namespace": "team-a",
                "labels": {"berth.dev/model-deployment": "chat"},
            }
        },
    )
    ctx.backoff.failure(("team-a", "chat"))
    ctx.on_change(kube.MODEL_DEPLOYMENT)(_md("4"), None)
    assert ctx.client.get(kube.SECRET, "team-a", "chat-api-keys") is None
    assert ctx.backoff.failures(("team-a", "chat")) == 0


def test_the_event_recorder_sends_an_identical_event_once_per_window() -> None:
    t = [0.0]
    recorder = EventRecorder(repeat_seconds=600, clock=lambda: t[0])
    client = RecordingKube()
    body = md_body()
    for _ in range(5):
        recorder.emit(client, body, [EventSpec("Warning", "Forbidden", "quota")], NOW)
    recorder.emit(client, body, [EventSpec("Warning", "Forbidden", "another message")], NOW)
    t[0] = 601.0
    recorder.emit(client, body, [EventSpec("Warning", "Forbidden", "quota")], NOW)
    sent = [c[3]["message"] for c in client.writes() if c[:2] == ("create", "Event")]
    assert sent == ["quota", "another message", "quota"] and recorder.suppressed == 4


class LiveApi(_Source, RecordingKube):
    """A RecordingKube that also serves LIST and WATCH: every write becomes a watch event."""

    def __init__(self, forbidden: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.version = 0
        self.streams: dict[str, list[queue.Queue[dict[str, Any] | None]]] = {}
        self.forbidden = forbidden  # kinds whose WATCH the RBAC refuses (403)

    def _event(self, kind: str, type_: str, obj: dict[str, Any]) -> None:
        self.version += 1
        obj["metadata"]["resourceVersion"] = str(self.version)
        for q in self.streams.get(kind, []):
            q.put({"type": type_, "object": copy.deepcopy(obj)})

    def _modified(self, kind: kube.Kind, namespace: str, name: str) -> dict[str, Any]:
        obj = self.objects[(kind.kind, namespace, name)]
        self._event(kind.kind, "MODIFIED", obj)
        return copy.deepcopy(obj)

    def create(
        self, kind: kube.Kind, namespace: str, body: dict[str, Any], dry_run: bool = False
    ) -> dict[str, Any] | None:
        created = super().create(kind, namespace, body, dry_run)
        if created is not None and not dry_run:
            obj = self.objects[(kind.kind, namespace, created["metadata"]["name"])]
            obj["metadata"]["namespace"] = namespace
            self._event(kind.kind, "ADDED", obj)
            return copy.deepcopy(obj)
        return created

    def patch(self, kind: kube.Kind, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        super().patch(kind, namespace, name, body)
        return self._modified(kind, namespace, name)

    def patch_status(
        self, kind: kube.Kind, namespace: str, name: str, status: dict[str, Any]
    ) -> dict[str, Any]:
        super().patch_status(kind, namespace, name, status)
        return self._modified(kind, namespace, name)

    def listed(
        self, kind: kube.Kind, namespace: str, label_selector: str
    ) -> tuple[list[dict[str, Any]], str]:
        return self.list(kind, namespace, label_selector), str(self.version)

    def events(self, kind: kube.Kind, resource_version: str) -> Iterator[dict[str, Any]]:
        if kind.kind in self.forbidden:
            raise kube.Forbidden(403, "Forbidden", f"cannot watch resource {kind.plural!r}")
        q: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.streams.setdefault(kind.kind, []).append(q)
        while True:
            try:
                event = q.get(timeout=0.2)
            except queue.Empty:
                continue
            if event is None:
                return
            yield event

    def close(self) -> None:
        """Ends every open watch stream."""
        for streams in self.streams.values():
            for q in streams:
                q.put(None)


@contextlib.contextmanager
def watching(api: LiveApi, settings: OperatorSettings) -> Iterator[OperatorContext]:
    """An operator context whose informers list and watch ``api``; stopped (streams ended) on exit."""
    ctx = OperatorContext.create(settings, client=api)
    ctx.source_factory = lambda: api
    try:
        yield ctx
    finally:
        ctx.stop()
        api.close()


def test_end_to_end_in_process_a_new_model_deployment_is_reconciled_once_its_event_arrives(
    settings: OperatorSettings,
) -> None:
    """The real threads (informers, queue, workers) over an in-memory API: an ADDED ModelDeployment
    gets its children and a status; afterwards the steady state makes no request."""
    import time

    api = LiveApi()
    with watching(api, settings.model_copy(update={"workers": 2})) as ctx:
        ctx.child_event_delay = 0.05
        assert ctx.queue is not None
        assert ctx.start_watches(sync_timeout=5)
        ctx.queue.start()
        body = md_body(spec={"capacity": 1})
        api.objects[("ModelDeployment", "team-a", "chat")] = body
        api._event("ModelDeployment", "ADDED", body)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (
            ("Deployment", "team-a", "chat") in api.objects
            and api.objects[("ModelDeployment", "team-a", "chat")].get("status", {}).get("phase")
        ):
            time.sleep(0.02)
        assert ("Service", "team-a", "chat") in api.objects and (
            "Secret",
            "team-a",
            "chat-api-keys",
        ) in api.objects
        assert api.objects[("ModelDeployment", "team-a", "chat")]["status"]["phase"] == "Pending"
        time.sleep(0.5)  # the children's own events come back through the watches
        while not ctx.queue.idle():
            time.sleep(0.02)
        api.clear()
        ctx.enqueue("team-a", "chat", "timer")  # a resync: from the caches, no request
        time.sleep(0.3)
        while not ctx.queue.idle():
            time.sleep(0.02)
        assert api.calls == []


def test_inference_pools_are_watched_where_the_cluster_serves_them(settings: OperatorSettings) -> None:
    api = LiveApi()
    api.objects[("APIResourceList", "", "")] = {"resources": [{"name": "inferencepools"}]}  # the CRD
    with watching(api, settings) as ctx:
        assert ctx.start_watches(sync_timeout=5)
        assert "InferencePool" in ctx.caches.specs
        api.clear()
        assert ctx.client.get(kube.INFERENCE_POOL, "team-a", "chat") is None and api.calls == []


HPA_ON_CHAT = {
    "apiVersion": "autoscaling/v2",
    "kind": "HorizontalPodAutoscaler",
    "metadata": {"name": "chat-hpa", "namespace": "team-a"},
    "spec": {
        "scaleTargetRef": {"apiVersion": "berth.dev/v1alpha1", "kind": "ModelDeployment", "name": "chat"},
        "maxReplicas": 3,
    },
}


def _autoscaled_with_an_hpa(api: LiveApi) -> dict[str, Any]:
    body = md_body(spec={"capacity": 1, "autoscaling": {"enabled": True, "minCapacity": 1, "maxCapacity": 4}})
    api.objects[("ModelDeployment", "team-a", "chat")] = copy.deepcopy(body)
    api.objects[("HorizontalPodAutoscaler", "team-a", "chat-hpa")] = copy.deepcopy(HPA_ON_CHAT)
    return body


def test_an_autoscaler_tick_reads_the_hpas_from_the_watch_cache(settings: OperatorSettings) -> None:
    """No LIST of HorizontalPodAutoscalers per tick: the watch brings them, and their deletion."""
    import time

    api = LiveApi()
    body = _autoscaled_with_an_hpa(api)
    with watching(api, settings) as ctx:
        assert ctx.start_watches(sync_timeout=5)
        api.clear()
        for t in range(3):
            assert ctx.autoscaler.tick(body, NOW, float(t)) is None  # stands aside for chat-hpa
        status = api.objects[("ModelDeployment", "team-a", "chat")]["status"]["autoscaler"]
        assert status["externalAutoscaler"] == "HorizontalPodAutoscaler/chat-hpa"
        # the HPA goes: its DELETED event empties the cache, and the autoscaler decides again
        gone = api.objects.pop(("HorizontalPodAutoscaler", "team-a", "chat-hpa"))
        api._event("HorizontalPodAutoscaler", "DELETED", gone)
        hpas = ctx.caches.stores["HorizontalPodAutoscaler"]
        deadline = time.monotonic() + 5
        while len(hpas) and time.monotonic() < deadline:
            time.sleep(0.01)
        decision = ctx.autoscaler.tick(body, NOW, 3.0)
        assert decision is not None and decision.desired == 1
        assert [c for c in api.calls if c[0] in ("get", "list")] == []  # every read from the caches


def test_where_the_rbac_refuses_the_hpa_watch_the_tick_lists_them(settings: OperatorSettings) -> None:
    """An older chart (HPAs: list, no watch): the caches still sync, and HPAs are read from the API."""
    api = LiveApi(forbidden=("HorizontalPodAutoscaler",))
    body = _autoscaled_with_an_hpa(api)
    with watching(api, settings) as ctx:
        assert ctx.start_watches(sync_timeout=5)
        hpas = ctx.caches.stores["HorizontalPodAutoscaler"]
        deadline = time.monotonic() + 5  # the LIST is allowed: the watch after it gets the 403
        while not hpas.forbidden and time.monotonic() < deadline:
            time.sleep(0.01)
        assert hpas.forbidden
        api.clear()
        assert ctx.autoscaler.tick(body, NOW, 0.0) is None  # still stands aside for chat-hpa
        assert [c[:2] for c in api.calls if c[0] in ("get", "list")] == [("list", "HorizontalPodAutoscaler")]
