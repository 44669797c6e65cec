"""The autoscaling decision over recorded load sequences, and one tick through a recording client."""

from __future__ import annotations

import copy
import itertools
import time
from datetime import UTC, datetime
from typing import Any

import pytest

from berth.controller import kube, metrics
from berth.controller.autoscaler import (
    Autoscaler,
    PodMetricsSource,
    Policy,
    State,
    decide,
    hpas_targeting,
    parse_in_flight,
)
from berth.controller.settings import OperatorSettings
from tests.metrics_stubs import Drip, Huge, Metrics, serve

from .conftest import RecordingKube, md_body

POLICY = Policy(min_capacity=1, max_capacity=8, target_per_instance=32, scale_down_delay=60, window=10)


def run(
    loads: list[float], start: int = 1, policy: Policy = POLICY, busy: int = 0, dt: float = 5.0
) -> list[int]:
    """Feed one total-in-flight sample every dt seconds; apply each decision; return the capacities."""
    state, current, out = State(), start, []
    for i, load in enumerate(loads):
        current = decide(current, busy, policy, state, i * dt, load).desired
        out.append(current)
    return out


def test_spike_scales_up_at_once_with_a_bounded_step() -> None:
    # 96 in flight over 32 per instance -> 3 (window average of 96, 96)
    assert run([96, 96]) == [3, 3]
    # a huge spike: at most max(4, current) more per decision -> 1 -> 5 -> 8 (max)
    assert run([1000, 1000, 1000]) == [5, 8, 8]


def test_min_capacity_wins_over_the_step_limit() -> None:
    high_floor = Policy(
        min_capacity=6, max_capacity=8, target_per_instance=32, scale_down_delay=60, window=10
    )
    d = decide(1, 0, high_floor, State(), 0.0, 0)
    assert (d.desired, d.reason) == (6, "capacity below minCapacity -> 6")
    assert run([1000, 1000], start=1, policy=high_floor) == [6, 8]


def test_reason_names_the_numbers() -> None:
    d = decide(1, 0, POLICY, State(), 0.0, 96)
    assert d.desired == 3
    assert d.reason == "in-flight 96 over target 32 per instance -> capacity 3"


def test_ramp_up_then_down_after_delay() -> None:
    loads = [32, 64, 96, 128] + [0] * 20
    caps = run(loads)
    assert caps[:4] == [1, 2, 3, 4]  # windows average 2 samples (10 s window, 5 s apart)
    # scale down only after the low load stayed for 60 s (12 samples)
    first_down = next(i for i, c in enumerate(caps) if i > 3 and c < 4)
    assert (first_down - 4) * 5 >= 60 - 5
    assert caps[-1] == 1  # minCapacity


def test_flapping_load_does_not_flap_capacity() -> None:
    caps = run([128, 0] * 20)  # the first sample alone says 4; then every window averages 64 -> 2
    changes = sum(1 for a, b in itertools.pairwise(caps) if a != b)
    assert caps[0] == 4 and caps[-1] == 2
    assert changes == 1  # one step down after the delay, no flapping


def test_bounds_and_zero() -> None:
    zero = Policy(min_capacity=0, max_capacity=3, target_per_instance=4, scale_down_delay=10, window=5)
    caps = run([0] * 6, start=2, policy=zero)
    assert caps[-1] == 0
    assert run([10_000] * 3, policy=zero) == [3, 3, 3]


def test_never_below_busy_instances() -> None:
    caps = run([1] * 30, start=4, busy=3)  # load says 1, but 3 instances still have requests in flight
    assert caps[-1] == 3


def test_capacity_above_max_is_brought_back() -> None:
    assert decide(12, 0, POLICY, State(), 0.0, 0).desired == 8


def test_parse_in_flight() -> None:
    text = (
        "# HELP berth_running_requests Requests being decoded\n# TYPE berth_running_requests gauge\n"
        "berth_running_requests 3.0\n"
        "# HELP berth_waiting_requests Requests waiting\n# TYPE berth_waiting_requests gauge\n"
        "berth_waiting_requests 2.0\n"
        "# HELP other_metric x\n# TYPE other_metric gauge\nother_metric 100.0\n"
    )
    assert parse_in_flight(text) == 5.0


class _Metrics(Metrics):
    body = b"berth_running_requests 4\nberth_waiting_requests 1\n"


def _pod(name: str, ip: str, ready: bool) -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


def test_pod_metrics_source_reads_only_ready_pods() -> None:
    server = serve(_Metrics)
    try:
        port = server.server_address[1]
        pods = [_pod("a", "127.0.0.1", True), _pod("b", "127.0.0.1", False), _pod("c", "127.0.0.9", True)]
        got = PodMetricsSource(timeout=0.5).in_flight(pods, port)
        assert got == {"a": 5.0}  # b is not ready; c does not answer
    finally:
        server.shutdown()


def _autoscaled(
    recording: RecordingKube,
    capacity: int,
    enabled: bool = True,
    target: int | None = 8,
    scale_down_delay: int | None = None,
) -> dict[str, Any]:
    """ModelDeployment team-a/chat of ``capacity``, autoscaled between 1 and 4 (``target`` in flight per
    instance): recorded as it is in the API and returned as the tick reads it."""
    autoscaling: dict[str, Any] = {"enabled": enabled, "minCapacity": 1, "maxCapacity": 4}
    if target is not None:
        autoscaling["targetInFlightPerInstance"] = target
    if scale_down_delay is not None:
        autoscaling["scaleDownDelaySeconds"] = scale_down_delay
    body = md_body(spec={"capacity": capacity, "autoscaling": autoscaling})
    recording.objects[("ModelDeployment", "team-a", "chat")] = copy.deepcopy(body)
    return body


def _ready_pods(recording: RecordingKube, *names: str) -> None:
    """Ready pods of team-a/chat on 127.0.0.1."""
    for name in names:
        recording.objects[("Pod", "team-a", name)] = {
            "metadata": {"name": name, "labels": {"berth.dev/model-deployment": "chat"}},
            "status": {"podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]},
        }


class FixedLoad:
    def __init__(self, per_pod: dict[str, float]) -> None:
        self.per_pod = per_pod

    def in_flight(self, pods: list[dict[str, Any]], port: int) -> dict[str, float]:
        return dict(self.per_pod)


@pytest.mark.parametrize("enabled", [True, False])
def test_tick_writes_scale_event_and_status_only_when_enabled(
    recording: RecordingKube, settings: OperatorSettings, enabled: bool
) -> None:
    body = _autoscaled(recording, 1, enabled=enabled)
    scaler = Autoscaler(recording, settings, FixedLoad({"p1": 24.0}))
    decision = scaler.tick(body, datetime(2026, 11, 23, 10, 0, tzinfo=UTC), 0.0)
    if not enabled:
        assert decision is None and recording.writes() == []
        return
    assert decision is not None and decision.desired == 3
    writes = recording.writes()
    assert ("patch_scale", "ModelDeployment", "chat", 3) in writes
    statuses = [w[3] for w in writes if w[0] == "patch_status"]
    assert statuses == [
        {"autoscaler": {"externalAutoscaler": None, "readPods": 1, "unreadablePods": []}},
        {"desiredCapacity": 3, "lastScaleTime": "2026-11-23T10:00:00Z"},
    ]
    event = next(w[3] for w in writes if w[0] == "create" and w[1] == "Event")
    assert event["reason"] == "Autoscaled"
    assert event["message"] == "in-flight 24 over target 8 per instance -> capacity 3"


def test_manual_scale_while_enabled_is_corrected(
    recording: RecordingKube, settings: OperatorSettings
) -> None:
    body = _autoscaled(recording, 4, scale_down_delay=0)
    scaler = Autoscaler(recording, settings, FixedLoad({"p1": 8.0}))
    decision = scaler.tick(body, datetime(2026, 11, 23, tzinfo=UTC), 0.0)
    assert decision is not None and decision.desired == 1  # the load wants 1; the autoscaler owns capacity


def test_unanswering_ready_pods_count_as_loaded(recording: RecordingKube, settings: OperatorSettings) -> None:
    body = _autoscaled(recording, 2, scale_down_delay=0)
    _ready_pods(recording, *("p1", "p2"))
    # neither ready pod answers (overloaded, slow /metrics): each counts as 8 in flight, so no scale-down
    scaler = Autoscaler(recording, settings, FixedLoad({}))
    decision = scaler.tick(body, datetime(2026, 11, 23, tzinfo=UTC), 100.0)
    assert decision is not None and decision.desired == 2
    assert decision.average_in_flight == 16.0
    # one answers idle: 0 + 8 -> one instance is enough
    scaler = Autoscaler(recording, settings, FixedLoad({"p1": 0.0}))
    decision = scaler.tick(body, datetime(2026, 11, 23, tzinfo=UTC), 100.0)
    assert decision is not None and decision.desired == 1


def test_unreadable_pods_are_named_in_status(recording: RecordingKube, settings: OperatorSettings) -> None:
    body = _autoscaled(recording, 2, target=None)
    _ready_pods(recording, *("p1", "p2", "p3"))
    scaler = Autoscaler(recording, settings, FixedLoad({"p2": 3.0}))
    scaler.tick(body, datetime(2026, 11, 23, tzinfo=UTC), 0.0)
    seen = recording.objects[("ModelDeployment", "team-a", "chat")]["status"]["autoscaler"]
    assert seen == {"externalAutoscaler": None, "readPods": 1, "unreadablePods": ["p1", "p3"]}
    assert metrics.UNREADABLE_PODS.labels("team-a", "chat")._value.get() == 2
    # the same sample again: nothing to write
    recording.clear()
    fresh = recording.get(kube.MODEL_DEPLOYMENT, "team-a", "chat")
    assert fresh is not None
    scaler.tick(fresh, datetime(2026, 11, 23, tzinfo=UTC), 1.0)
    assert [w for w in recording.writes() if w[0] == "patch_status" and "autoscaler" in w[3]] == []


def _hpa(
    name: str, target: str, kind: str = "ModelDeployment", api: str = "berth.dev/v1alpha1"
) -> dict[str, Any]:
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": name, "namespace": "team-a"},
        "spec": {"scaleTargetRef": {"apiVersion": api, "kind": kind, "name": target}, "maxReplicas": 3},
    }


def test_hpas_targeting_matches_kind_group_and_name() -> None:
    hpas = [
        _hpa("b-hpa", "chat"),
        _hpa("a-hpa", "chat", api="berth.dev/v1"),
        _hpa("other", "search"),
        _hpa("deploy", "chat", kind="Deployment", api="apps/v1"),
        _hpa("lookalike", "chat", api="example.com/v1"),
    ]
    assert hpas_targeting(hpas, "chat") == ["a-hpa", "b-hpa"]
    assert hpas_targeting([], "chat") == []


def test_an_hpa_on_the_model_deployment_makes_the_autoscaler_stand_aside(
    recording: RecordingKube, settings: OperatorSettings
) -> None:
    body = _autoscaled(recording, 1)
    recording.objects[("HorizontalPodAutoscaler", "team-a", "chat-hpa")] = _hpa("chat-hpa", "chat")
    scaler = Autoscaler(recording, settings, FixedLoad({"p1": 24.0}))  # the load alone would ask for 3
    assert scaler.tick(body, datetime(2026, 11, 23, tzinfo=UTC), 0.0) is None
    writes = recording.writes()
    assert not [w for w in writes if w[0] == "patch_scale"]
    status = recording.objects[("ModelDeployment", "team-a", "chat")]["status"]
    assert status["autoscaler"]["externalAutoscaler"] == "HorizontalPodAutoscaler/chat-hpa"
    assert "desiredCapacity" not in status
    (event,) = [w[3] for w in writes if w[0] == "create" and w[1] == "Event"]
    assert (event["type"], event["reason"]) == ("Warning", "ExternalAutoscaler")
    assert event["message"].startswith("HorizontalPodAutoscaler/chat-hpa targets this ModelDeployment")
    # next tick: still aside, no second event, no write
    recording.clear()
    fresh = recording.get(kube.MODEL_DEPLOYMENT, "team-a", "chat")
    assert fresh is not None
    assert scaler.tick(fresh, datetime(2026, 11, 23, tzinfo=UTC), 1.0) is None
    assert recording.writes() == []
    # the HPA goes: the built-in autoscaler takes over again and scales on the load
    del recording.objects[("HorizontalPodAutoscaler", "team-a", "chat-hpa")]
    decision = scaler.tick(fresh, datetime(2026, 11, 23, tzinfo=UTC), 2.0)
    assert decision is not None and decision.desired == 3
    status = recording.objects[("ModelDeployment", "team-a", "chat")]["status"]
    assert status["autoscaler"].get("externalAutoscaler") is None  # null in a merge patch removes it


@pytest.mark.parametrize(
    "text",
    [
        "berth_running_requests NaN\nberth_waiting_requests 0\n",
        "berth_running_requests -1\n",
        "berth_running_requests +Inf\n",
        "other_metric 3\n",  # absent: says nothing about load
    ],
)
def test_parse_in_flight_refuses_what_is_not_a_load(text: str) -> None:
    with pytest.raises(ValueError):
        parse_in_flight(text)


def test_a_dripping_and_a_huge_pod_cannot_stall_the_scrape() -> None:
    servers = {name: serve(h) for name, h in (("ok", _Metrics), ("drip", Drip), ("huge", Huge))}
    try:
        # every pod on its own port: in_flight takes one port, so read them one source call each
        source = PodMetricsSource(timeout=1.0, concurrency=4, max_bytes=1 << 20)
        before = {r: _failures(r) for r in ("deadline", "too_large")}
        t0 = time.monotonic()
        got = {
            name: source.in_flight([_pod(name, "127.0.0.1", True)], srv.server_address[1])
            for name, srv in servers.items()
        }
        elapsed = time.monotonic() - t0
        assert got == {"ok": {"ok": 5.0}, "drip": {}, "huge": {}}
        assert elapsed < 1.0 * 2 + 1.5  # the drip is cut at its 1 s deadline; the 10 MB body at 1 MiB
        assert _failures("deadline") == before["deadline"] + 1
        assert _failures("too_large") == before["too_large"] + 1
    finally:
        for srv in servers.values():
            srv.shutdown()


def test_pods_are_read_concurrently() -> None:
    slow = serve(_Slow)
    try:
        pods = [_pod(f"p{i}", "127.0.0.1", True) for i in range(8)]
        t0 = time.monotonic()
        got = PodMetricsSource(timeout=2.0, concurrency=8).in_flight(pods, slow.server_address[1])
        assert got == {f"p{i}": 5.0 for i in range(8)}
        assert time.monotonic() - t0 < 8 * 0.4 / 2  # 8 reads of 0.4 s each, far from one after another
    finally:
        slow.shutdown()


class _Slow(_Metrics):
    def do_GET(self) -> None:
        time.sleep(0.4)
        super().do_GET()


def _failures(reason: str) -> float:
    from berth.controller import metrics

    return metrics.SCRAPE_FAILURES.labels(reason)._value.get()
