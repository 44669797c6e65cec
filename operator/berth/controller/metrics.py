"""The operator's Prometheus metrics (prometheus-client), names prefixed `berth_operator_`."""

from __future__ import annotations

import threading

from prometheus_client import Counter, Gauge, Histogram

from berth.api.models import PHASES

RECONCILES = Counter(
    "berth_operator_reconciles_total",
    "Reconciles of ModelDeployments, by trigger and result.",
    ["trigger", "result"],
)
RECONCILE_SECONDS = Histogram(
    "berth_operator_reconcile_duration_seconds",
    "Time one reconcile took.",
    ["trigger"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
API_REQUESTS = Counter(
    "berth_operator_api_requests_total",
    "Requests the operator made to the Kubernetes API, by HTTP verb and status code.",
    ["verb", "code"],
)
BY_PHASE = Gauge(
    "berth_operator_modeldeployments",
    "ModelDeployments by phase, as last written by this operator.",
    ["phase"],
)
DESIRED_CAPACITY = Gauge(
    "berth_operator_desired_capacity",
    "Capacity the autoscaler wants, per ModelDeployment.",
    ["namespace", "name"],
)
ACTUAL_CAPACITY = Gauge(
    "berth_operator_capacity",
    "spec.capacity per ModelDeployment, as the autoscaler last read it.",
    ["namespace", "name"],
)
IN_FLIGHT = Gauge(
    "berth_operator_in_flight_requests",
    "In-flight requests (running + waiting) over ready instances, averaged over the autoscaling window.",
    ["namespace", "name"],
)

UNREADABLE_PODS = Gauge(
    "berth_operator_unreadable_pods",
    "Ready instances whose /metrics the autoscaler could not read at its last tick (counted as loaded at the target).",
    ["namespace", "name"],
)
SCRAPE_FAILURES = Counter(
    "berth_operator_metrics_scrape_failures_total",
    "Failed reads of instances' /metrics by the autoscaler, by reason (connect, deadline, too_large, bad_response, unreadable).",
    ["reason"],
)

LEADER = Gauge(
    "berth_operator_leader",
    "1 while this replica holds the leader Lease and runs the resync and autoscaling loops, else 0.",
)

_phases: dict[tuple[str, str], str] = {}
_counts: dict[str, int] = {}
_lock = threading.Lock()


def record_phase(namespace: str, name: str, phase: str | None) -> None:
    """Keep BY_PHASE equal to the count of ModelDeployments in each phase (None: the resource is gone).
    Constant time: called on every reconcile of every ModelDeployment."""
    key = (namespace, name)
    with _lock:
        old = _phases.get(key)
        if old == phase:
            return
        if phase is None:
            del _phases[key]
        else:
            _phases[key] = phase
        for p, delta in ((old, -1), (phase, 1)):
            if p is not None:
                _counts[p] = _counts.get(p, 0) + delta
        for p in PHASES:
            BY_PHASE.labels(phase=p).set(_counts.get(p, 0))
