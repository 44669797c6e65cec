"""Status from observation: a pure function of the resource, its Deployment and its pods, and the clock.

Phase: Pending -> Deploying -> Running; Updating while a rollout or scale is under way; Degraded when
fewer instances than asked are ready after a grace (or some crash / cannot pull while others serve);
Failed for an invalid spec or when no instance can run (crash loop, image pull, bad config); Idle at
capacity 0. Conditions Ready / Progressing / Degraded carry the real cause: the scheduler's own
message for an unschedulable pod, the container's reason for an image-pull failure or a crash loop.

The status is a `berth.api.models.ModelDeploymentStatus`: the fields the reconcile writes, the keys it
compares and the phases it may set all come from that one model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from berth.api.models import (
    Condition,
    ConditionStatus,
    ConditionType,
    ModelDeployment,
    ModelDeploymentStatus,
    Phase,
)
from berth.controller import names
from berth.controller.settings import OperatorSettings

IMAGE_PULL_REASONS = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"}
CONFIG_REASONS = {"CreateContainerConfigError", "CreateContainerError", "RunContainerError"}

# The status fields the reconcile writes (the autoscaler's are left to it), and their stored keys:
# anything else under status is left as it is.
RECONCILED_FIELDS = ModelDeploymentStatus.reconciled_fields()
MANAGED_STATUS_KEYS = ModelDeploymentStatus.wire_names(RECONCILED_FIELDS)
CHILD_CONFLICT = "ChildConflict"
_FAILED_FIELDS = frozenset({"phase", "observed_generation", "conditions"})

# (status, reason, message) of one condition
_Cond = tuple[ConditionStatus, str, str]


@dataclass
class Observed:
    """What the API server says about a ModelDeployment's children."""

    deployment: dict[str, Any] | None = None
    pods: list[dict[str, Any]] = field(default_factory=list)
    # A Secret named in spec.auth.apiKeySecretRef that does not exist.
    missing_secret: str | None = None
    # "Kind/name" of children that exist without this ModelDeployment's controller reference.
    conflicts: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Cause:
    """Why instances are not ready: a condition reason and a human message."""

    reason: str
    message: str
    fatal: bool  # nothing will get better without a change (image, config, crash loop)


def format_time(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(s: str | None) -> datetime | None:
    if not s:
        return None
    return datetime.fromisoformat(s.replace("Z", "+00:00"))


def managed_status(status: dict[str, Any]) -> dict[str, Any]:
    """The part of a stored status the reconcile owns (what decides whether a write is needed)."""
    return {k: status.get(k) for k in MANAGED_STATUS_KEYS}


def _container_statuses(pod: dict[str, Any]) -> list[dict[str, Any]]:
    st = pod.get("status") or {}
    return list(st.get("initContainerStatuses") or []) + list(st.get("containerStatuses") or [])


def live(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pods that count: not being deleted, not finished (an evicted or completed pod is history)."""
    return [
        p
        for p in pods
        if not (p.get("metadata") or {}).get("deletionTimestamp")
        and (p.get("status") or {}).get("phase") not in ("Failed", "Succeeded")
    ]


def deployment_cause(deployment: dict[str, Any] | None) -> Cause | None:
    """What the Deployment itself reports: pods it cannot create (quota, admission), or a stalled rollout."""
    for cond in ((deployment or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == "ReplicaFailure" and cond.get("status") == "True":
            return Cause(
                cond.get("reason") or "ReplicaFailure", cond.get("message") or "cannot create pods", True
            )
        if cond.get("type") == "Progressing" and cond.get("reason") == "ProgressDeadlineExceeded":
            return Cause("ProgressDeadlineExceeded", cond.get("message") or "the rollout stalled", True)
    return None


def _unschedulable(pod: dict[str, Any]) -> Cause | None:
    for cond in (pod.get("status") or {}).get("conditions") or []:
        not_scheduled = cond.get("type") == "PodScheduled" and cond.get("status") == "False"
        if not_scheduled and cond.get("reason") == "Unschedulable":
            return Cause("Unschedulable", cond.get("message") or "pod cannot be scheduled", False)
    return None


def _crash_loop(cs: dict[str, Any], crash_loop_restarts: int) -> Cause | None:
    """A container in CrashLoopBackOff after enough restarts, with its last exit."""
    reason = ((cs.get("state") or {}).get("waiting") or {}).get("reason") or ""
    restarts = int(cs.get("restartCount") or 0)
    if reason != "CrashLoopBackOff" or restarts < crash_loop_restarts:
        return None
    term = (cs.get("lastState") or {}).get("terminated") or {}
    detail = f"exit code {term.get('exitCode')}" if term else "restarting"
    if term.get("reason"):
        detail += f" ({term['reason']})"
    if term.get("message"):
        detail += f": {str(term['message']).strip()[:300]}"
    name = cs.get("name", "server")
    return Cause(
        "CrashLoopBackOff", f"container {name} crash-looping after {restarts} restarts, last {detail}", True
    )


def _waiting(cs: dict[str, Any], reasons: set[str]) -> tuple[str, dict[str, Any]] | None:
    """(reason, waiting state) when the container waits for one of `reasons`."""
    waiting = (cs.get("state") or {}).get("waiting") or {}
    reason = waiting.get("reason") or ""
    return (reason, waiting) if reason in reasons else None


def _image_pull(cs: dict[str, Any]) -> Cause | None:
    found = _waiting(cs, IMAGE_PULL_REASONS)
    if found is None:
        return None
    reason, waiting = found
    msg = waiting.get("message") or f"cannot pull image {cs.get('image', '')}"
    return Cause(reason, f"container {cs.get('name', 'server')}: {reason}: {msg}", True)


def _bad_config(cs: dict[str, Any]) -> Cause | None:
    found = _waiting(cs, CONFIG_REASONS)
    if found is None:
        return None
    reason, waiting = found
    message = f"container {cs.get('name', 'server')}: {reason}: {waiting.get('message', '')}"
    return Cause(reason, message.rstrip(": "), True)


def _first(causes: Any) -> Cause | None:
    return next((c for c in causes if c is not None), None)


def diagnose(pods: list[dict[str, Any]], crash_loop_restarts: int) -> Cause | None:
    """The most telling reason the pods are not all ready, or None.

    A crash loop tells most, then a bad container config, then an image pull, then the scheduler."""
    pods = live(pods)
    containers = [cs for pod in pods for cs in _container_statuses(pod)]
    return (
        _first(_crash_loop(cs, crash_loop_restarts) for cs in containers)
        or _first(_bad_config(cs) for cs in containers)
        or _first(_image_pull(cs) for cs in containers)
        or _first(_unschedulable(pod) for pod in pods)
    )


def _condition(
    previous: list[dict[str, Any]],
    type_: ConditionType,
    status: ConditionStatus,
    reason: str,
    message: str,
    now: str,
    generation: int,
) -> Condition:
    """A condition; its lastTransitionTime stays while its status does."""
    last = next((c for c in previous if c.get("type") == type_), None)
    transition = last.get("lastTransitionTime") if last and last.get("status") == status else None
    return Condition(
        type=type_,
        status=status,
        reason=reason,
        message=message,
        last_transition_time=transition or now,
        observed_generation=generation,
    )


def _pod_ready(pod: dict[str, Any]) -> bool:
    conds = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conds)


def _starting(pod: dict[str, Any], now: datetime, budget: float) -> bool:
    """Not ready and still loading its model, within the startup budget.

    The startup probe is /health/ready, so a container's `started` turns true once its model is loaded
    and resets when the container restarts: a pod that served and then lost readiness (started) or
    whose container exited and waits to restart is not starting. The budget runs from the container's
    last start (from the pod's creation while no container runs yet: image pull, volume mount)."""
    if _pod_ready(pod):
        return False
    began = parse_time((pod.get("metadata") or {}).get("creationTimestamp"))
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        running = (cs.get("state") or {}).get("running")
        if cs.get("started") is True or (running is None and int(cs.get("restartCount") or 0) > 0):
            return False
        t = parse_time((running or {}).get("startedAt"))
        if t is not None and (began is None or t > began):
            began = t
    return began is not None and (now - began).total_seconds() < budget


def _since_not_ready(previous: list[dict[str, Any]], now: datetime) -> datetime:
    """When Ready last turned False (now if it is True or unknown)."""
    ready = next((c for c in previous if c.get("type") == "Ready"), None)
    if ready and ready.get("status") == "False":
        return parse_time(ready.get("lastTransitionTime")) or now
    return now


@dataclass(frozen=True)
class _Rollout:
    """The Deployment's counts that the phase depends on."""

    replicas: int = 0
    ready: int = 0
    updated: int = 0
    spec_replicas: int = 0
    current: bool = False  # the Deployment controller has acted on the Deployment's latest spec

    @classmethod
    def of(cls, deployment: dict[str, Any] | None) -> _Rollout:
        if deployment is None:
            return cls()
        status = deployment.get("status") or {}
        generation = int((deployment.get("metadata") or {}).get("generation") or 0)
        return cls(
            replicas=int(status.get("replicas") or 0),
            ready=int(status.get("readyReplicas") or 0),
            updated=int(status.get("updatedReplicas") or 0),
            spec_replicas=int((deployment.get("spec") or {}).get("replicas") or 0),
            current=int(status.get("observedGeneration") or 0) >= generation,
        )

    def rolled_out(self, capacity: int) -> bool:
        return (
            self.current
            and self.spec_replicas == capacity
            and self.updated >= capacity
            and self.replicas == capacity
        )

    def progress_reason(self, capacity: int) -> str:
        scaling = self.replicas != capacity or self.spec_replicas != capacity
        return "Scaling" if scaling else "RollingOut"


@dataclass(frozen=True)
class _View:
    """Everything the phase and the conditions are decided from."""

    capacity: int
    rollout: _Rollout
    cause: Cause | None
    ever_ready: bool
    scheduled: int  # live pods bound to a node
    starting: int  # of those, pods still loading their model within the startup budget
    not_ready_seconds: float  # since Ready last turned False (0 while it is True)

    @property
    def fatal(self) -> bool:
        return self.cause is not None and self.cause.fatal

    @property
    def conflict(self) -> bool:
        return self.cause is not None and self.cause.reason == CHILD_CONFLICT

    @property
    def ready_of(self) -> str:
        return f"{self.rollout.ready}/{self.capacity} instances ready"


def conflict_cause(conflicts: list[str]) -> Cause:
    """ChildConflict: objects named like this ModelDeployment's children that it does not control."""
    them = ", ".join(conflicts)
    verb = "exists and is" if len(conflicts) == 1 else "exist and are"
    return Cause(
        CHILD_CONFLICT,
        f"{them} {verb} not controlled by this ModelDeployment: Berth leaves it unchanged "
        "(delete or rename it, or rename the ModelDeployment)",
        True,
    )


def _cause(md: ModelDeployment, observed: Observed, crash_loop_restarts: int) -> Cause | None:
    if observed.conflicts:
        return conflict_cause(observed.conflicts)
    if observed.missing_secret:
        return Cause(
            "APIKeySecretNotFound",
            f"spec.auth.apiKeySecretRef: Secret {observed.missing_secret!r} not found in namespace {md.namespace}",
            True,
        )
    return diagnose(observed.pods, crash_loop_restarts) or deployment_cause(observed.deployment)


def _observe(
    md: ModelDeployment, observed: Observed, settings: OperatorSettings, now: datetime, prev: dict[str, Any]
) -> _View:
    scheduled = [p for p in live(observed.pods) if (p.get("spec") or {}).get("nodeName")]
    since = _since_not_ready(list(prev.get("conditions") or []), now)
    return _View(
        capacity=md.spec.capacity,
        rollout=_Rollout.of(observed.deployment),
        cause=_cause(md, observed, settings.crash_loop_restarts),
        ever_ready=bool(prev.get("readyAt")),
        scheduled=len(scheduled),
        # Scheduled pods still inside their startup budget (loading a model): not a reason for Degraded yet.
        starting=sum(1 for p in scheduled if _starting(p, now, settings.startup_seconds)),
        not_ready_seconds=(now - since).total_seconds(),
    )


def _phase(v: _View, degraded_grace_seconds: float) -> Phase:
    ready = v.rollout.ready
    if v.conflict:
        return "Failed" if ready == 0 else "Degraded"
    if v.capacity == 0:
        return "Idle" if v.rollout.replicas == 0 else "Updating"
    if ready >= v.capacity and v.rollout.rolled_out(v.capacity):
        return "Running"
    if v.fatal and ready == 0:
        return "Failed"
    if not v.ever_ready:
        return "Pending" if not v.scheduled or (v.cause is not None and ready == 0) else "Deploying"
    losing = ready < v.capacity and not v.starting and v.not_ready_seconds >= degraded_grace_seconds
    return "Degraded" if v.fatal or losing else "Updating"


def _ready_condition(v: _View, phase: Phase) -> _Cond:
    if v.conflict and v.cause is not None:
        return ("False", v.cause.reason, v.cause.message)
    if v.capacity > 0 and v.rollout.ready >= v.capacity and phase in ("Running", "Updating"):
        # all asked-for capacity serves, also while a rollout or a scale-down is still under way
        return ("True", "AllInstancesReady", v.ready_of)
    if phase == "Idle" or v.capacity == 0:
        stopping = f"; {v.rollout.replicas} instances stopping" if v.rollout.replicas else ""
        return ("False", "ScaledToZero", f"capacity is 0: no instance serves{stopping}; the endpoint stays")
    if v.cause is not None:
        return ("False", v.cause.reason, f"{v.ready_of}: {v.cause.message}")
    detail = f"; {v.starting} starting (loading the model)" if v.starting else ""
    return ("False", "InstancesNotReady", f"{v.ready_of}{detail}")


def _progressing_condition(v: _View, phase: Phase, generation: int) -> _Cond:
    r = v.rollout
    if phase in ("Running", "Idle"):
        return ("False", "Complete", f"{r.replicas} instances at generation {generation}")
    if phase == "Failed":
        return ("False", "Stalled", v.cause.message if v.cause else "instances cannot start")
    if phase in ("Pending", "Deploying"):
        return ("True", phase, v.ready_of)
    return (
        "True",
        r.progress_reason(v.capacity),
        f"{r.replicas} instances, {r.updated} updated, {r.ready} ready, {v.capacity} asked",
    )


def _degraded_condition(v: _View, phase: Phase) -> _Cond:
    if phase not in ("Degraded", "Failed"):
        return ("False", "AsExpected", "")
    if v.cause is not None:
        return ("True", v.cause.reason, v.cause.message)
    return ("True", "InstancesNotReady", f"only {v.rollout.ready}/{v.capacity} instances ready")


def _first_ready(
    md: ModelDeployment, prev: dict[str, Any], phase: Phase, now: datetime
) -> tuple[str | None, float | None]:
    """(readyAt, timeToReadySeconds): recorded once, when the instance first becomes Running."""
    ready_at, time_to_ready = prev.get("readyAt"), prev.get("timeToReadySeconds")
    if phase != "Running" or ready_at:
        return ready_at, time_to_ready
    created = parse_time(md.metadata.get("creationTimestamp"))
    if created is not None:
        time_to_ready = round((now - created).total_seconds(), 3)
    return format_time(now), time_to_ready


def _meter(
    md: ModelDeployment, prev: dict[str, Any], ready: int, now: datetime, interval: float
) -> tuple[float, str]:
    """(computeUnitHours, meteredAt): ready instances x compute units x hours, brought up to date when
    readiness changes or every metering interval (so an unchanged resource is not written on every resync)."""
    cu_hours = float(prev.get("computeUnitHours") or 0.0)
    metered_at = parse_time(prev.get("meteredAt"))
    if metered_at is None:
        return cu_hours, format_time(now)
    prev_ready = int(prev.get("readyCapacity") or 0)
    if ready == prev_ready and (now - metered_at).total_seconds() < interval:
        return cu_hours, str(prev["meteredAt"])
    hours = max((now - metered_at).total_seconds(), 0.0) / 3600.0
    return round(cu_hours + prev_ready * md.spec.compute_units_per_instance * hours, 6), format_time(now)


def compute_status(
    md: ModelDeployment,
    observed: Observed,
    settings: OperatorSettings,
    now: datetime,
    previous: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The status the reconcile wants on the resource: a merge patch of RECONCILED_FIELDS (camelCase).

    desiredCapacity and lastScaleTime belong to the autoscaler: the patch leaves them."""
    prev = previous or {}
    prev_conditions: list[dict[str, Any]] = list(prev.get("conditions") or [])
    generation = int(md.metadata.get("generation") or 0)
    now_s = format_time(now)
    view = _observe(md, observed, settings, now, prev)
    phase = _phase(view, settings.degraded_grace_seconds)
    ready_at, time_to_ready = _first_ready(md, prev, phase, now)
    cu_hours, metered_at = _meter(md, prev, view.rollout.ready, now, settings.metering_interval_seconds)
    conditions: list[tuple[ConditionType, _Cond]] = [
        ("Ready", _ready_condition(view, phase)),
        ("Progressing", _progressing_condition(view, phase, generation)),
        ("Degraded", _degraded_condition(view, phase)),
    ]
    status = ModelDeploymentStatus(
        phase=phase,
        capacity=view.capacity,
        ready_capacity=view.rollout.ready,
        replicas=view.rollout.replicas,
        selector=names.selector_string(md),
        endpoint=names.endpoint(md, settings),
        served_model_name=md.served_name,
        api_key_secret=names.api_key_secret_name(md),
        conditions=[_condition(prev_conditions, t, *c, now_s, generation) for t, c in conditions],
        observed_generation=generation,
        ready_at=ready_at,
        time_to_ready_seconds=time_to_ready,
        compute_unit_hours=cu_hours,
        metered_at=metered_at,
    )
    return status.patch(RECONCILED_FIELDS)


def failed_status(
    md_body: dict[str, Any],
    message: str,
    now: datetime,
    previous: dict[str, Any] | None = None,
    reason: str = "InvalidSpec",
) -> dict[str, Any]:
    """Status for a spec the operator cannot act on: phase Failed, Ready False with the field named.

    Everything else in the previous status stays (the children of the last valid spec keep running).
    """
    prev = dict(previous or {})
    generation = int((md_body.get("metadata") or {}).get("generation") or 0)
    now_s = format_time(now)
    prev_conditions = list(prev.get("conditions") or [])
    failed = ModelDeploymentStatus(
        phase="Failed",
        observed_generation=generation,
        conditions=[
            _condition(prev_conditions, "Ready", "False", reason, message, now_s, generation),
            _condition(prev_conditions, "Progressing", "False", reason, message, now_s, generation),
            _condition(prev_conditions, "Degraded", "True", reason, message, now_s, generation),
        ],
    )
    prev.update(failed.patch(_FAILED_FIELDS))
    return prev
