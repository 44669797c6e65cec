"""Autoscaling on load through spec.capacity (the scale subresource), HPA-style.

Signal: in-flight requests (running + waiting) of each *ready* instance, read from its /metrics
(`PodMetricsSource`; the `MetricsSource` protocol lets Prometheus take its place later), plus the
requests the gateway holds for the ModelDeployment while it scales up (`GatewayWaiting`), summed and
averaged over a window; a ready instance that does not answer (in time, within the size cap, with
finite values) counts as loaded at the target and in `berth_operator_unreadable_pods`. Decision (`decide`, pure): desired = ceil(in-flight / target per instance),
clamped to [minCapacity, maxCapacity]; up at once by a bounded step (like the HPA's default policy:
at most max(4 instances, 100%) per decision); down only to the highest recommendation of the last
`scaleDownDelaySeconds`, and never below the instances that still have requests in flight.
Action (`Autoscaler.tick`): write through the scale subresource, emit an Event with the reason,
record status.desiredCapacity / status.lastScaleTime, export desired vs actual capacity.

An autoscaling/v2 HorizontalPodAutoscaler whose scaleTargetRef is the ModelDeployment takes precedence:
the autoscaler then makes no decision at all (two controllers writing spec.capacity would fight), emits a
Warning Event `ExternalAutoscaler` naming the HPA once, and records it in status.autoscaler. What each
sample saw (the HPA, the pods read and the ones that could not be) goes to status.autoscaler, written
only when it changes; the reconcile shows it as the Autoscaling condition (status.py).
"""

from __future__ import annotations

import logging
import math
import socket
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from prometheus_client.parser import text_string_to_metric_families

from berth.api.models import AutoscalerStatus, ModelDeployment, ModelDeploymentStatus
from berth.controller import kube, metrics, names
from berth.controller.events import EventSpec, emit
from berth.controller.hpas import HPA, hpas_targeting
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
    """Sum of the in-flight gauges in a Prometheus exposition.

    ValueError when neither gauge is there or a value is not a finite number >= 0: a pod that says
    NaN (or nothing) about its load is unreadable, never "idle"."""
    total = 0.0
    seen = False
    for family in text_string_to_metric_families(text):
        if family.name in IN_FLIGHT_METRICS:
            for sample in family.samples:
                if sample.name != family.name:
                    continue
                if not math.isfinite(sample.value) or sample.value < 0:
                    raise ValueError(f"{family.name} is {sample.value}")
                total += sample.value
                seen = True
    if not seen:
        raise ValueError(f"none of {', '.join(IN_FLIGHT_METRICS)} in the exposition")
    return total


class ScrapeError(OSError):
    """A /metrics read that did not finish well: ``reason`` labels the failure metric."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def fetch_metrics(ip: str, port: int, deadline_s: float, max_bytes: int) -> str:
    """GET http://ip:port/metrics with a deadline for the whole exchange and a cap on the body.

    Plain HTTP/1.0 over a socket whose timeout is set to what is left of the deadline before every
    read, so a pod that drips bytes cannot hold the loop past the deadline, and one that sends more
    than ``max_bytes`` is cut off without the operator holding it in memory."""
    deadline = time.monotonic() + deadline_s

    def left() -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ScrapeError("deadline", f"no complete answer within {deadline_s:g}s")
        return remaining

    host = f"[{ip}]" if ":" in ip else ip
    with socket.create_connection((ip, port), timeout=left()) as sock:
        sock.sendall(f"GET /metrics HTTP/1.0\r\nHost: {host}:{port}\r\nAccept: text/plain\r\n\r\n".encode())
        buf = bytearray()
        while True:
            sock.settimeout(left())
            try:
                chunk = sock.recv(65536)
            except TimeoutError as exc:
                raise ScrapeError("deadline", f"no complete answer within {deadline_s:g}s") from exc
            if not chunk:
                break
            buf += chunk
            if len(buf) > max_bytes + 16384:  # the body's cap plus room for the headers
                raise ScrapeError("too_large", f"/metrics is larger than {max_bytes} bytes")
    head, sep, body = bytes(buf).partition(b"\r\n\r\n")
    if not sep:
        raise ScrapeError("bad_response", "no HTTP response headers")
    status = head.split(b"\r\n", 1)[0].split()
    if len(status) < 2 or status[1] != b"200":
        raise ScrapeError("bad_response", f"status {status[1:2] or '?'}")
    if len(body) > max_bytes:
        raise ScrapeError("too_large", f"/metrics is larger than {max_bytes} bytes")
    return body.decode("utf-8", errors="replace")


def _failure_reason(e: BaseException) -> str:
    if isinstance(e, ScrapeError):
        return e.reason
    if isinstance(e, FutureTimeout):
        return "deadline"
    return "unreadable" if isinstance(e, ValueError) else "connect"


class PodMetricsSource:
    """Reads each ready pod's /metrics directly (pod IP and the server port), concurrently.

    At most ``concurrency`` pods are read at once (a bounded pool shared by all ModelDeployments),
    each within ``timeout`` seconds in all and ``max_bytes`` of body; a pod that fails any of that,
    or reports no finite in-flight value, is left out (the caller counts it as unreadable) and
    counted in ``berth_operator_metrics_scrape_failures_total`` by reason."""

    def __init__(self, timeout: float = 2.0, concurrency: int = 16, max_bytes: int = 1 << 20) -> None:
        self.timeout = timeout
        self.max_bytes = max_bytes
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="berth-scrape")

    def _read(self, ip: str, port: int) -> float:
        return parse_in_flight(fetch_metrics(ip, port, self.timeout, self.max_bytes))

    def in_flight(self, pods: list[dict[str, Any]], port: int) -> dict[str, float]:
        jobs: dict[str, Future[float]] = {}
        for pod in pods:
            ip = (pod.get("status") or {}).get("podIP")
            name = (pod.get("metadata") or {}).get("name", "")
            if ip and _ready(pod):
                jobs[name] = self._pool.submit(self._read, ip, port)
        out: dict[str, float] = {}
        for name, job in jobs.items():
            try:
                # each read ends by its own deadline; the margin covers a pool that was full
                out[name] = job.result(timeout=self.timeout * 2 + 1)
            except (OSError, ValueError, FutureTimeout) as e:
                metrics.SCRAPE_FAILURES.labels(_failure_reason(e)).inc()
                log.debug("no metrics from pod %s: %s", name, e)
        return out


# The gateway's gauge of requests held while a ModelDeployment scales up (berth/gateway/metrics.py),
# and the label the chart puts on the gateway's pods.
GATEWAY_WAITING_METRIC = "berth_gateway_waiting_requests"
GATEWAY_POD_SELECTOR = "berth.dev/gateway=true"


def parse_gateway_waiting(text: str) -> dict[tuple[str, str], float]:
    """(namespace, ModelDeployment) -> requests held, from one gateway replica's exposition."""
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != GATEWAY_WAITING_METRIC:
            continue
        for sample in family.samples:
            ns, md = sample.labels.get("namespace"), sample.labels.get("modeldeployment")
            if sample.name != family.name or not ns or not md:
                continue
            if math.isfinite(sample.value) and sample.value > 0:
                out[(ns, md)] = out.get((ns, md), 0.0) + sample.value
    return out


class GatewayWaiting:
    """The requests every gateway replica holds per ModelDeployment, read from their /metrics (the
    ready pods labelled berth.dev/gateway=true in the gateway namespace) at most once per
    ``max_age`` seconds for all ModelDeployments. A replica that cannot be read adds nothing."""

    def __init__(
        self,
        client: kube.Kube,
        settings: OperatorSettings,
        max_age: float | None = None,
        clock: Any = time.monotonic,
    ) -> None:
        self.client = client
        self.settings = settings
        self.max_age = settings.autoscale_interval_seconds / 2 if max_age is None else max_age
        self.clock = clock
        self._read_at: float | None = None
        self._held: dict[tuple[str, str], float] = {}

    def _read(self, ip: str) -> dict[tuple[str, str], float]:
        s = self.settings
        text = fetch_metrics(
            ip, s.gateway_metrics_port, s.metrics_scrape_timeout_seconds, s.metrics_scrape_max_bytes
        )
        return parse_gateway_waiting(text)

    def refresh(self) -> None:
        held: dict[tuple[str, str], float] = {}
        try:
            pods = self.client.list(kube.POD, self.settings.gateway_ns(), GATEWAY_POD_SELECTOR)
        except Exception as e:  # e.g. no RBAC for pods in the gateway namespace (namespaced install)
            log.debug("cannot list the gateway pods: %s", e)
            pods = []
        for pod in pods:
            ip = (pod.get("status") or {}).get("podIP")
            if not ip or not _ready(pod):
                continue
            try:
                for key, value in self._read(ip).items():
                    held[key] = held.get(key, 0.0) + value
            except (OSError, ValueError) as e:
                metrics.SCRAPE_FAILURES.labels(_failure_reason(e)).inc()
                log.debug("no metrics from gateway pod %s: %s", (pod.get("metadata") or {}).get("name"), e)
        self._held = held
        self._read_at = self.clock()

    def waiting(self, namespace: str, name: str) -> float:
        if self._read_at is None or self.clock() - self._read_at >= self.max_age:
            self.refresh()
        return self._held.get((namespace, name), 0.0)


class Autoscaler:
    """Per-operator autoscaling loop body: one `tick` per ModelDeployment per interval."""

    def __init__(
        self, client: kube.Kube, settings: OperatorSettings, source: MetricsSource | None = None
    ) -> None:
        self.client = client
        self.settings = settings
        self.source = source or PodMetricsSource(
            settings.metrics_scrape_timeout_seconds,
            settings.metrics_scrape_concurrency,
            settings.metrics_scrape_max_bytes,
        )
        self.states: dict[tuple[str, str], State] = {}
        self.gateway = GatewayWaiting(client, settings) if settings.gateway_metrics_port else None
        self._hpa_forbidden_logged = False

    def gateway_waiting(self, md: ModelDeployment) -> float:
        """Requests the gateway holds for `md` (waiting for it to scale up): load with no pod to show it."""
        return self.gateway.waiting(md.namespace, md.name) if self.gateway is not None else 0.0

    def forget(self, namespace: str, name: str) -> None:
        self.states.pop((namespace, name), None)

    def _external(self, md: ModelDeployment) -> str | None:
        """The "HorizontalPodAutoscaler/<name>" of each HPA that targets this ModelDeployment, or None.

        The operator's client reads HPAs from its watch cache; only where the RBAC does not allow the
        watch does this LIST them from the API."""
        try:
            hpas = self.client.list(HPA, md.namespace, "")
        except kube.Forbidden as e:  # an RBAC without the rule (older chart): scale, but say so once
            if not self._hpa_forbidden_logged:
                log.warning("cannot list HorizontalPodAutoscalers (%s): HPA detection is off", e.message)
                self._hpa_forbidden_logged = True
            return None
        found = hpas_targeting(hpas, md.name)
        return ", ".join(f"{HPA.kind}/{n}" for n in found) if found else None

    def _record(self, body: dict[str, Any], md: ModelDeployment, seen: AutoscalerStatus) -> None:
        """status.autoscaler, only when it changed."""
        before = (body.get("status") or {}).get("autoscaler")
        if before is not None and AutoscalerStatus.model_validate(before) == seen:
            return
        patch = ModelDeploymentStatus(autoscaler=seen).patch({"autoscaler"})
        self.client.patch_status(kube.MODEL_DEPLOYMENT, md.namespace, md.name, patch)

    def tick(self, body: dict[str, Any], now: datetime, monotonic: float) -> Decision | None:
        md = ModelDeployment.model_validate(
            {k: body.get(k) for k in ("metadata", "spec") if body.get(k) is not None}
        )
        key = (md.namespace, md.name)
        if not md.spec.autoscaling.enabled:
            self.forget(*key)
            return None
        external = self._external(md)
        if external is not None:
            # someone else scales this ModelDeployment: no decision, no sample window kept
            self.forget(*key)
            metrics.UNREADABLE_PODS.labels(md.namespace, md.name).set(0)
            before = ((body.get("status") or {}).get("autoscaler") or {}).get("externalAutoscaler")
            self._record(body, md, AutoscalerStatus(external_autoscaler=external))
            if before != external:
                message = (
                    f"{external} targets this ModelDeployment: the built-in autoscaler (spec.autoscaling) "
                    "stands aside while it exists"
                )
                emit(self.client, body, [EventSpec("Warning", "ExternalAutoscaler", message)], now)
                log.warning("%s/%s: %s", md.namespace, md.name, message)
            return None
        state = self.states.setdefault(key, State())
        pods = self.client.list(kube.POD, md.namespace, names.selector_string(md))
        per_pod = self.source.in_flight(pods, self.settings.server_port)
        policy = Policy.from_spec(md, window=max(self.settings.autoscale_interval_seconds * 2, 1.0))
        # A ready pod whose /metrics did not answer counts as loaded at the target (as the HPA assumes
        # 100% for missing pods when scaling down): an overloaded server answering slowly must not
        # read as idle.
        unreadable = sorted(
            str((p.get("metadata") or {}).get("name"))
            for p in pods
            if _ready(p) and (p.get("metadata") or {}).get("name") not in per_pod
        )
        unread = len(unreadable)
        metrics.UNREADABLE_PODS.labels(md.namespace, md.name).set(unread)
        self._record(body, md, AutoscalerStatus(read_pods=len(per_pod), unreadable_pods=unreadable))
        total = sum(per_pod.values()) + unread * policy.target_per_instance + self.gateway_waiting(md)
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
                scaled.patch({"desired_capacity", "last_scale_time"}),
            )
            emit(self.client, body, [EventSpec("Normal", "Autoscaled", decision.reason)], now)
            log.info("%s/%s: %s", md.namespace, md.name, decision.reason)
        elif status.get("desiredCapacity") != decision.desired:
            desired = ModelDeploymentStatus(desired_capacity=decision.desired)
            self.client.patch_status(
                kube.MODEL_DEPLOYMENT, md.namespace, md.name, desired.patch({"desired_capacity"})
            )
        return decision
