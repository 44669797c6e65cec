"""Status from observation: a pure function of the resource, its Deployment and its pods, and the clock.

Phase: Pending -> Deploying -> Running; Updating while a rollout or scale is under way; Degraded when
fewer instances than asked are ready after a grace (or some crash / cannot pull while others serve);
Failed for an invalid spec or when no instance can run (crash loop, image pull, bad config); Idle at
capacity 0. Conditions Ready / Available / Progressing / Degraded carry the real cause: the scheduler's
own message for an unschedulable pod, the container's reason for an image-pull failure or a crash loop,
the attach/detach controller's Multi-Attach error for a volume another node still holds.

Never Failed while an instance is still on its way: creating its containers (image pull, volume mount),
downloading its model (the hf:// init container runs) or loading it inside the startup budget. The
Deployment's own ProgressDeadlineExceeded is a cause only when no pod is on its way any more.

Ready: every asked-for instance serves. Available: at least min(spec.rollout.minAvailable, capacity)
instances serve, so it stays True through a scale-up or a rollout. Autoscaling belongs to the
autoscaler (autoscaler.py); the reconcile keeps it while spec.autoscaling.enabled and drops it otherwise.

The status is a `berth.api.models.ModelDeploymentStatus`: the fields the reconcile writes, the keys it
compares and the phases it may set all come from that one model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from berth.api.models import (
    AutoscalerStatus,
    Condition,
    ConditionStatus,
    ConditionType,
    ModelDeployment,
    ModelDeploymentStatus,
    Phase,
)
from berth.controller import builders, names
from berth.controller.settings import OperatorSettings

IMAGE_PULL_REASONS = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"}
CONFIG_REASONS = {"CreateContainerConfigError", "CreateContainerError", "RunContainerError"}
# Waiting reasons of a container that is still being set up (image pull, volume mounts, init containers).
CREATING_REASONS = {"ContainerCreating", "PodInitializing"}
# Pod events that say why a pod stays in ContainerCreating (the attach/detach controller, the kubelet).
VOLUME_EVENT_REASONS = {"FailedAttachVolume", "FailedMount"}
MULTI_ATTACH = "MultiAttachError"
DOWNLOAD_CONTAINER = builders.DOWNLOAD_CONTAINER

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
    # Warning Events about the pods (FailedAttachVolume, FailedMount: why a pod stays ContainerCreating).
    pod_events: list[dict[str, Any]] = field(default_factory=list)


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


def creating(pod: dict[str, Any]) -> bool:
    """Scheduled and still setting its containers up: no container has run yet, the ones that report
    wait in ContainerCreating/PodInitializing (pulling the image, mounting volumes)."""
    if not (pod.get("spec") or {}).get("nodeName") or _pod_ready(pod):
        return False
    statuses = _container_statuses(pod)
    if any(
        (cs.get("state") or {}).get("running") or (cs.get("state") or {}).get("terminated") for cs in statuses
    ):
        return False
    waiting = [((cs.get("state") or {}).get("waiting") or {}).get("reason") for cs in statuses]
    return all(r in CREATING_REASONS for r in waiting)  # no status yet: the kubelet has not started


def downloading(pod: dict[str, Any]) -> bool:
    """The hf:// download init container is running."""
    for cs in (pod.get("status") or {}).get("initContainerStatuses") or []:
        if cs.get("name") == DOWNLOAD_CONTAINER and (cs.get("state") or {}).get("running") is not None:
            return True
    return False


def _volume_event(pod: dict[str, Any], events: list[dict[str, Any]]) -> Cause | None:
    """A pod stuck in ContainerCreating because a volume cannot be attached or mounted: the latest such
    Event about it. A ReadWriteOnce claim still attached to another node is MultiAttachError."""
    if not creating(pod):
        return None
    meta = pod.get("metadata") or {}
    about = [
        e
        for e in events
        if e.get("reason") in VOLUME_EVENT_REASONS
        and (e.get("involvedObject") or {}).get("kind") == "Pod"
        and (e.get("involvedObject") or {}).get("name") == meta.get("name")
        and (not meta.get("uid") or (e.get("involvedObject") or {}).get("uid") in (None, meta.get("uid")))
    ]
    if not about:
        return None
    latest = max(about, key=lambda e: str(e.get("lastTimestamp") or e.get("eventTime") or ""))
    message = str(latest.get("message") or latest.get("reason"))
    reason = MULTI_ATTACH if "Multi-Attach" in message else str(latest.get("reason"))
    return Cause(reason, f"pod {meta.get('name', '')}: {message}", False)


def diagnose(
    pods: list[dict[str, Any]], crash_loop_restarts: int, events: list[dict[str, Any]] | None = None
) -> Cause | None:
    """The most telling reason the pods are not all ready, or None.

    A crash loop tells most, then a bad container config, then an image pull, then a volume that cannot
    be attached or mounted (from the pods' Events), then the scheduler."""
    pods = live(pods)
    containers = [cs for pod in pods for cs in _container_statuses(pod)]
    return (
        _first(_crash_loop(cs, crash_loop_restarts) for cs in containers)
        or _first(_bad_config(cs) for cs in containers)
        or _first(_image_pull(cs) for cs in containers)
        or _first(_volume_event(pod, events or []) for pod in pods)
        or _first(_unschedulable(pod) for pod in pods)
    )


def pod_events_needed(pods: list[dict[str, Any]]) -> bool:
    """Some live pod is still creating its containers: its Events may say why (a volume)."""
    return any(creating(p) for p in live(pods))


def volume_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Warning Events about pods that say a volume cannot be attached or mounted."""
    return [
        e
        for e in events
        if e.get("type") == "Warning"
        and e.get("reason") in VOLUME_EVENT_REASONS
        and (e.get("involvedObject") or {}).get("kind") == "Pod"
    ]


def resolved_revision(pods: list[dict[str, Any]]) -> str | None:
    """The commit the newest pod's download init container reported (its termination message, JSON
    {"model": "<sha>", ...}); None when no pod has finished a download."""
    best: tuple[str, str] | None = None
    for pod in pods:
        for cs in (pod.get("status") or {}).get("initContainerStatuses") or []:
            if cs.get("name") != DOWNLOAD_CONTAINER:
                continue
            for state in (cs.get("state") or {}, cs.get("lastState") or {}):
                term = state.get("terminated") or {}
                if term.get("exitCode") != 0 or not term.get("message"):
                    continue
                try:
                    sha = json.loads(term["message"]).get("model")
                except (ValueError, AttributeError):
                    continue
                created = str((pod.get("metadata") or {}).get("creationTimestamp") or "")
                if isinstance(sha, str) and sha and (best is None or created > best[0]):
                    best = (created, sha)
    return best[1] if best else None


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
    creating: int = 0  # pods still creating their containers (image pull, volume mount)
    downloading: int = 0  # pods whose hf:// download init container runs
    min_available: int = 1

    @property
    def on_the_way(self) -> int:
        """Pods not ready yet for a reason that still ends well: creating, downloading, loading."""
        return self.creating + self.downloading + self.starting

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
    return diagnose(observed.pods, crash_loop_restarts, observed.pod_events) or deployment_cause(
        observed.deployment
    )


def _patient(cause: Cause | None, on_the_way: int) -> Cause | None:
    """The Deployment's progress deadline is its own clock, not a pod's: while any pod is still creating,
    downloading or loading inside its budget, ProgressDeadlineExceeded is no reason to give up."""
    if cause is not None and cause.reason == "ProgressDeadlineExceeded" and on_the_way:
        return None
    return cause


def _observe(
    md: ModelDeployment, observed: Observed, settings: OperatorSettings, now: datetime, prev: dict[str, Any]
) -> _View:
    scheduled = [p for p in live(observed.pods) if (p.get("spec") or {}).get("nodeName")]
    since = _since_not_ready(list(prev.get("conditions") or []), now)
    # a pod held up by a volume (Multi-Attach, a failed mount) is not on its way
    held = {id(p) for p in scheduled if _volume_event(p, observed.pod_events) is not None}
    pulling = [p for p in scheduled if creating(p) and id(p) not in held]
    fetching = [p for p in scheduled if downloading(p)]
    busy = held | {id(p) for p in pulling + fetching}
    # Scheduled pods still inside their startup budget (loading a model): not a reason for Degraded yet.
    starting = sum(1 for p in scheduled if id(p) not in busy and _starting(p, now, settings.startup_seconds))
    on_the_way = len(pulling) + len(fetching) + starting
    return _View(
        capacity=md.spec.capacity,
        rollout=_Rollout.of(observed.deployment),
        cause=_patient(_cause(md, observed, settings.crash_loop_restarts), on_the_way),
        ever_ready=bool(prev.get("readyAt")),
        scheduled=len(scheduled),
        starting=starting,
        not_ready_seconds=(now - since).total_seconds(),
        creating=len(pulling),
        downloading=len(fetching),
        min_available=md.spec.rollout.min_available,
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
    losing = ready < v.capacity and not v.on_the_way and v.not_ready_seconds >= degraded_grace_seconds
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
        return ("False", v.cause.reason, f"{v.ready_of}{_progress(v)}: {v.cause.message}")
    return ("False", "InstancesNotReady", f"{v.ready_of}{_progress(v)}")


def _progress(v: _View) -> str:
    """The progress detail of the Ready message, e.g. "; 1 creating containers, 1 starting ...", or ""."""
    parts = [
        f"{n} {what}"
        for n, what in (
            (v.creating, "creating containers (image pull, volumes)"),
            (v.downloading, "downloading the model"),
            (v.starting, "starting (loading the model)"),
        )
        if n
    ]
    return "; " + ", ".join(parts) if parts else ""


def _available_condition(v: _View) -> _Cond:
    """True while at least min(minAvailable, capacity) instances serve (and at least one)."""
    ready = v.rollout.ready
    if v.capacity == 0:
        return ("False", "ScaledToZero", "capacity is 0: no instance serves")
    need = max(1, min(v.min_available, v.capacity))
    if ready >= need:
        return ("True", "MinimumInstancesAvailable", f"{v.ready_of} (at least {need} must serve)")
    why = f": {v.cause.message}" if v.cause is not None else _progress(v)
    return ("False", "MinimumInstancesUnavailable", f"{v.ready_of}, {need} needed{why}")


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
    the ready count changes, and with ``interval`` > 0 also every interval. The default (0) writes
    nothing while nothing changes (1,000 idle ModelDeployments: no writes); the usage up to any
    moment is ``computeUnitHours + readyCapacity x computeUnitsPerInstance x (now - meteredAt)``,
    exact, since the ready count has not changed since ``meteredAt``."""
    cu_hours = float(prev.get("computeUnitHours") or 0.0)
    metered_at = parse_time(prev.get("meteredAt"))
    if metered_at is None:
        return cu_hours, format_time(now)
    prev_ready = int(prev.get("readyCapacity") or 0)
    if ready == prev_ready and (interval <= 0 or (now - metered_at).total_seconds() < interval):
        return cu_hours, str(prev["meteredAt"])
    hours = max((now - metered_at).total_seconds(), 0.0) / 3600.0
    return round(cu_hours + prev_ready * md.spec.compute_units_per_instance * hours, 6), format_time(now)


EXTERNAL_AUTOSCALER = "ExternalAutoscaler"


def autoscaling_condition(sample: dict[str, Any] | None) -> _Cond:
    """The Autoscaling condition from status.autoscaler (written by the autoscaler at each sample)."""
    if not sample:
        return ("Unknown", "NotSampled", "the autoscaler has not sampled this ModelDeployment yet")
    seen = AutoscalerStatus.model_validate(sample)
    if seen.external_autoscaler:
        return (
            "False",
            EXTERNAL_AUTOSCALER,
            f"{seen.external_autoscaler} targets this ModelDeployment: the built-in autoscaler stands "
            "aside (set spec.autoscaling.enabled: false to leave capacity to it, or delete it)",
        )
    if seen.unreadable_pods:
        n = len(seen.unreadable_pods)
        return (
            "True",
            "UnreadableInstances",
            f"{n} of {n + seen.read_pods} ready instances did not answer /metrics (in time, within the "
            f"size cap, with finite values): {', '.join(seen.unreadable_pods)}; each counts as loaded "
            "at the target",
        )
    return ("True", "Active", f"reading the load of {seen.read_pods} ready instances")


def _model_revision(md: ModelDeployment, observed: Observed, prev: dict[str, Any]) -> str | None:
    """hf:// models: the commit the newest finished download reported, else the one published before."""
    if md.spec.model.parsed_uri.scheme != "hf":
        return None
    found = resolved_revision(observed.pods)
    return found or prev.get("modelRevision")


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
        ("Available", _available_condition(view)),
        ("Progressing", _progressing_condition(view, phase, generation)),
        ("Degraded", _degraded_condition(view, phase)),
    ]
    if md.spec.autoscaling.enabled:
        conditions.append(("Autoscaling", autoscaling_condition(prev.get("autoscaler"))))
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
        model_revision=_model_revision(md, observed, prev),
        ready_at=ready_at,
        time_to_ready_seconds=time_to_ready,
        compute_unit_hours=cu_hours,
        metered_at=metered_at,
    )
    return status.patch(RECONCILED_FIELDS)


def _kept_available(previous: list[dict[str, Any]]) -> Condition | None:
    found = next((c for c in previous if c.get("type") == "Available"), None)
    return Condition.model_validate(found) if found else None


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
            # the children of the last valid spec keep running: whether they serve is as last observed
            _kept_available(prev_conditions)
            or _condition(prev_conditions, "Available", "False", reason, message, now_s, generation),
            _condition(prev_conditions, "Progressing", "False", reason, message, now_s, generation),
            _condition(prev_conditions, "Degraded", "True", reason, message, now_s, generation),
        ],
    )
    prev.update(failed.patch(_FAILED_FIELDS))
    return prev
