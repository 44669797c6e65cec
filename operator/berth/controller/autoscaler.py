"""Autoscaling on load through spec.capacity (the scale subresource), HPA-style.

Signal: in-flight requests (running + waiting) of each *ready* instance, read from its /metrics
(`PodMetricsSource`; the `MetricsSource` protocol lets Prometheus take its place later), summed and
averaged over a window; a ready instance that does not answer counts as loaded at the target. Decision (`decide`, pure): desired = ceil(in-flight / target per instance),
clamped to [minCapacity, maxCapacity]; up at once by a bounded step (like the HPA's default policy:
at most max(4 instances, 100%) per decision); down only to the highest recommendation of the last
`scaleDownDelaySeconds`, and never below the instances that still have requests in flight.
Action (`Autoscaler.tick`): write through the scale subresource, emit an Event with the reason,
record status.desiredCapacity / status.lastScaleTime, export desired vs actual capacity.
"""

from __future__ import annotations

import logging
import math
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from prometheus_client.parser import text_string_to_metric_families

from berth.api.models import ModelDeployment, ModelDeploymentStatus
from berth.controller import kube, metrics, names
from berth.controller.events import EventSpec, emit
from berth.controller.settings import OperatorSettings
from berth.controller.status import format_time

log = logging.getLogger(__name__)

# Server gauges that make up "in flight" (operator/berth/server/metrics.py).
IN_FLIGHT_METRICS = ("berth_running_requests", "berth_waiting_requests")


@dataclass(frozen=True)
class Policy:
    min_capacity: int
    max_capacity: int
    target_per_instance: int
    scale_down_delay: float
    window: float = 30.0  # seconds of samples averaged into one signal
    max_step_up: int = 4  # scale up by at most max(max_step_up, current) per decision

    @classmethod
    def from_spec(cls, md: ModelDeployment, window: float = 30.0) -> Policy:
        a = md.spec.autoscaling
        return cls(
            a.min_capacity,
            a.max_capacity,
            a.target_in_flight_per_instance,
            a.scale_down_delay_seconds,
            window,
        )


@dataclass
class State:
    """What one ModelDeployment's autoscaler remembers between ticks."""

    samples: deque[tuple[float, float]] = field(default_factory=deque)  # (t, total in-flight over ready pods)
    recommendations: deque[tuple[float, int]] = field(default_factory=deque)  # (t, raw recommendation)
    started: float | None = None


@dataclass(frozen=True)
class Decision:
    desired: int
    reason: str
    average_in_flight: float


def decide(
    current: int, busy: int, policy: Policy, state: State, now: float, total_in_flight: float
) -> Decision:
    """The capacity to ask for, given a new sample of total in-flight requests over ready instances.

    `current` is spec.capacity; `busy` the ready instances that have requests in flight right now.
    Pure apart from updating `state` (the sample window and the recommendation history).
    """
    if state.started is None:
        state.started = now
    state.samples.append((now, total_in_flight))
    while state.samples and state.samples[0][0] <= now - policy.window:
        state.samples.popleft()
    average = sum(v for _, v in state.samples) / len(state.samples)

    raw = math.ceil(average / policy.target_per_instance - 1e-9) if average > 0 else 0
    raw = min(max(raw, policy.min_capacity), policy.max_capacity)
    state.recommendations.append((now, raw))
    while state.recommendations and state.recommendations[0][0] < now - policy.scale_down_delay:
        state.recommendations.popleft()
    what = f"in-flight {average:g} over target {policy.target_per_instance} per instance"

    if current < policy.min_capacity:  # the bounds win over the step limit, as in the HPA
        desired = max(min(raw, current + max(policy.max_step_up, current)), policy.min_capacity)
        return Decision(desired, f"capacity below minCapacity -> {desired}", average)
    if raw > current:
        step = max(policy.max_step_up, current)
        desired = min(raw, current + step)
        return Decision(desired, f"{what} -> capacity {desired}", average)
    if current > policy.max_capacity:
        return Decision(policy.max_capacity, f"capacity above maxCapacity -> {policy.max_capacity}", average)
    if raw < current:
        if now - state.started < policy.scale_down_delay:
            return Decision(
                current, f"{what}; holding {current} until the load stayed low long enough", average
            )
        stable = max(r for _, r in state.recommendations)
        floor = min(max(busy, policy.min_capacity), current)
        desired = max(stable, floor)
        if desired < current:
            return Decision(
                desired,
                f"{what} for {policy.scale_down_delay:g}s -> capacity {desired}",
                average,
            )
        return Decision(current, f"{what}; holding {current}", average)
    return Decision(current, f"{what}; steady at {current}", average)


class MetricsSource(Protocol):
    def in_flight(self, pods: list[dict[str, Any]], port: int) -> dict[str, float]:
        """In-flight requests per ready pod name (pods that cannot be read are left out)."""
        ...


def _ready(pod: dict[str, Any]) -> bool:
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    conds = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conds)


def parse_in_flight(text: str) -> float:
    """Sum of the in-flight gauges in a Prometheus exposition."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name in IN_FLIGHT_METRICS:
            total += sum(s.value for s in family.samples if s.name == family.name)
    return total


class PodMetricsSource:
    """Reads each ready pod's /metrics directly (pod IP and the server port)."""

    def __init__(self, timeout: float = 2.0) -> None:
        self.timeout = timeout

    def in_flight(self, pods: list[dict[str, Any]], port: int) -> dict[str, float]:
        out: dict[str, float] = {}
        for pod in pods:
            ip = (pod.get("status") or {}).get("podIP")
            name = (pod.get("metadata") or {}).get("name", "")
            if not ip or not _ready(pod):
                continue
            url = f"http://{ip}:{port}/metrics"
            try:
                with urllib.request.urlopen(url, timeout=self.timeout) as resp:
                    out[name] = parse_in_flight(resp.read().decode())
            except (OSError, ValueError) as e:
                log.debug("no metrics from %s (%s): %s", name, url, e)
        return out


class Autoscaler:
    """Per-operator autoscaling loop body: one `tick` per ModelDeployment per interval."""

    def __init__(
        self, client: kube.Kube, settings: OperatorSettings, source: MetricsSource | None = None
    ) -> None:
        self.client = client
        self.settings = settings
        self.source = source or PodMetricsSource()
        self.states: dict[tuple[str, str], State] = {}

    def forget(self, namespace: str, name: str) -> None:
        self.states.pop((namespace, name), None)

    def tick(self, body: dict[str, Any], now: datetime, monotonic: float) -> Decision | None:
        md = ModelDeployment.model_validate(
            {k: body.get(k) for k in ("metadata", "spec") if body.get(k) is not None}
        )
        key = (md.namespace, md.name)
        if not md.spec.autoscaling.enabled:
            self.forget(*key)
            return None
        state = self.states.setdefault(key, State())
        pods = self.client.list(kube.POD, md.namespace, names.selector_string(md))
        per_pod = self.source.in_flight(pods, self.settings.server_port)
        policy = Policy.from_spec(md, window=max(self.settings.autoscale_interval_seconds * 2, 1.0))
        # A ready pod whose /metrics did not answer counts as loaded at the target (as the HPA assumes
        # 100% for missing pods when scaling down): an overloaded server answering slowly must not
        # read as idle.
        unread = sum(1 for p in pods if _ready(p) and (p.get("metadata") or {}).get("name") not in per_pod)
        total = sum(per_pod.values()) + unread * policy.target_per_instance
        busy = sum(1 for v in per_pod.values() if v > 0) + unread
        current = md.spec.capacity
        decision = decide(current, busy, policy, state, monotonic, total)

        metrics.DESIRED_CAPACITY.labels(md.namespace, md.name).set(decision.desired)
        metrics.ACTUAL_CAPACITY.labels(md.namespace, md.name).set(current)
        metrics.IN_FLIGHT.labels(md.namespace, md.name).set(decision.average_in_flight)
        status = body.get("status") or {}
        if decision.desired != current:
            self.client.patch_scale(kube.MODEL_DEPLOYMENT, md.namespace, md.name, decision.desired)
            scaled = ModelDeploymentStatus(
                desired_capacity=decision.desired, last_scale_time=format_time(now)
            )
            self.client.patch_status(
                kube.MODEL_DEPLOYMENT,
                md.namespace,
                md.name,
                scaled.patch(ModelDeploymentStatus.AUTOSCALER_FIELDS),
            )
            emit(self.client, body, [EventSpec("Normal", "Autoscaled", decision.reason)], now)
            log.info("%s/%s: %s", md.namespace, md.name, decision.reason)
        elif status.get("desiredCapacity") != decision.desired:
            desired = ModelDeploymentStatus(desired_capacity=decision.desired)
            self.client.patch_status(
                kube.MODEL_DEPLOYMENT, md.namespace, md.name, desired.patch({"desired_capacity"})
            )
        return decision
