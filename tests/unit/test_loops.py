"""The operator-wide loops: one pass handles every live ModelDeployment; one Lease elects the replica that runs them."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

from berth.controller import kube
from berth.controller.leader import LeaseElector
from berth.controller.loops import Loop

from .conftest import RecordingKube, md_body

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def test_once_handles_every_live_object_and_survives_a_failure(recording: RecordingKube) -> None:
    for name in ("a", "b", "c"):
        recording.objects[("ModelDeployment", "ns1", name)] = md_body(name=name, namespace="ns1")
    gone = md_body(name="d", namespace="ns1", deletionTimestamp="2026-11-23T11:00:00Z")
    recording.objects[("ModelDeployment", "ns1", "d")] = gone
    seen: list[str] = []

    def handle(body: dict[str, Any]) -> None:
        seen.append(body["metadata"]["name"])
        if body["metadata"]["name"] == "a":
            raise RuntimeError("boom")

    assert Loop("resync", 1, recording, ["ns1"], handle).once() == 3
    assert seen == ["a", "b", "c"]


class LeaseStore(RecordingKube):
    """RecordingKube with resourceVersions: a patch naming a stale one is a 409, as the API server answers."""

    def __init__(self) -> None:
        super().__init__()
        self.version = 0

    def _bump(self, key: tuple[str, str, str]) -> None:
        self.version += 1
        self.objects[key]["metadata"]["resourceVersion"] = str(self.version)

    def create(self, kind: kube.Kind, namespace: str, body: dict[str, Any]) -> dict[str, Any] | None:
        if super().create(kind, namespace, body) is None:
            return None
        key = (kind.kind, namespace, body["metadata"]["name"])
        self._bump(key)
        return copy.deepcopy(self.objects[key])

    def patch(self, kind: kube.Kind, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        key = (kind.kind, namespace, name)
        wanted = (body.get("metadata") or {}).get("resourceVersion")
        if wanted is not None and wanted != self.objects[key]["metadata"]["resourceVersion"]:
            raise kube.Conflict(409, "Conflict", "the object has been modified")
        super().patch(kind, namespace, name, body)
        self._bump(key)
        return copy.deepcopy(self.objects[key])


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _elector(store: LeaseStore, clock: Clock, identity: str) -> LeaseElector:
    return LeaseElector(
        store,
        "berth-system",
        "berth-operator",
        identity,
        lease_seconds=15,
        renew_deadline=10,
        retry=2,
        monotonic=clock,
        wall=lambda: 1_700_000_000 + clock.t,
    )


def test_one_holder_and_a_takeover_only_after_the_lease_lapsed() -> None:
    store, clock = LeaseStore(), Clock()
    a, b = _elector(store, clock, "a"), _elector(store, clock, "b")
    assert a.try_acquire_or_renew() and a.is_leader()
    assert not b.try_acquire_or_renew() and not b.is_leader()
    for _ in range(10):  # a renews every 2 s: b never gets it
        clock.t += 2
        assert a.try_acquire_or_renew()
        assert not b.try_acquire_or_renew()
    lease = store.objects[("Lease", "berth-system", "berth-operator")]
    assert lease["spec"]["holderIdentity"] == "a" and lease["spec"]["leaseDurationSeconds"] == 15
    # a stops renewing (hung, partitioned): it gives the loops up after its renew deadline ...
    clock.t += 10
    assert not a.is_leader()
    # ... and b, which saw the same record for a whole lease duration, takes over
    assert not b.try_acquire_or_renew()  # 10 s of an unchanged record: not yet
    clock.t += 5
    assert b.try_acquire_or_renew() and b.is_leader()
    lease = store.objects[("Lease", "berth-system", "berth-operator")]
    assert lease["spec"]["holderIdentity"] == "b" and lease["spec"]["leaseTransitions"] == 1
    assert not a.try_acquire_or_renew()  # a comes back: b's lease is fresh
    gets = [c for c in store.calls if c[0] == "get"]
    before = len(gets)
    clock.t += 3
    assert b.try_acquire_or_renew()  # the holder renews with one PATCH on top of its last write, no GET
    assert len([c for c in store.calls if c[0] == "get"]) == before


def test_racing_for_an_expired_lease_one_wins() -> None:
    store, clock = LeaseStore(), Clock()
    old = _elector(store, clock, "old")
    assert old.try_acquire_or_renew()
    a, b = _elector(store, clock, "a"), _elector(store, clock, "b")
    assert not a.try_acquire_or_renew() and not b.try_acquire_or_renew()  # both observe the record
    clock.t += 16
    stale = copy.deepcopy(store.objects[("Lease", "berth-system", "berth-operator")])

    class Stale(LeaseStore):  # b read the lease before a wrote it
        def get(self, kind: kube.Kind, namespace: str, name: str) -> dict[str, Any] | None:
            return copy.deepcopy(stale)

    assert a.try_acquire_or_renew()
    stale_view = Stale()
    stale_view.objects, stale_view.version = store.objects, store.version
    b.client = stale_view
    assert not b.try_acquire_or_renew()  # its write names the old resourceVersion: 409
    assert store.objects[("Lease", "berth-system", "berth-operator")]["spec"]["holderIdentity"] == "a"


def test_release_hands_over_at_once() -> None:
    store, clock = LeaseStore(), Clock()
    a, b = _elector(store, clock, "a"), _elector(store, clock, "b")
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()
    a.release()
    assert not a.is_leader()
    assert b.try_acquire_or_renew()  # a free lease needs no waiting


def test_the_resync_runs_at_once_when_the_lease_is_won_and_then_every_interval() -> None:
    import threading
    import time

    leader = threading.Event()
    passes: list[float] = []
    api = RecordingKube()
    api.objects[("ModelDeployment", "ns1", "a")] = md_body(name="a", namespace="ns1")
    loop = Loop(
        "resync",
        3600,
        api,
        ["ns1"],
        lambda body: passes.append(time.monotonic()),
        leader.is_set,
        eager=True,
        poll=0.01,
    )
    loop.start()
    try:
        time.sleep(0.1)
        assert passes == []  # not the leader: nothing
        leader.set()
        deadline = time.monotonic() + 5
        while not passes and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(passes) == 1  # won the lease: one pass at once, not after the hour
        time.sleep(0.1)
        assert len(passes) == 1
    finally:
        loop.stop()


def test_a_replica_that_is_not_the_leader_reconciles_nothing(settings: Any) -> None:
    from berth.controller.context import OperatorContext

    from .conftest import reconcile_key

    api = RecordingKube()
    api.objects[("ModelDeployment", "team-a", "chat")] = md_body()
    ctx = OperatorContext.create(settings, client=api)
    ctx.elector = _elector(LeaseStore(), Clock(), "standby")  # never acquired
    assert reconcile_key(ctx, api) is None
    assert api.writes() == []
