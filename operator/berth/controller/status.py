"""Status from observation: a pure function of the resource, its Deployment and its pods, and the clock.

Phase: Pending -> Deploying -> Running; Updating while a rollout or scale is under way; Degraded when
fewer instances than asked are ready after a grace (or some crash / cannot pull while others serve);
Failed for an invalid spec or when no instance can run (crash loop, image pull, bad config); Idle at
capacity 0. Conditions Ready / Progressing / Degraded carry the real cause: the scheduler's own
message for an unschedulable pod, the container's reason for an image-pull failure or a crash loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from berth.api.models import ModelDeployment
from berth.controller import builders
from berth.controller.settings import OperatorSettings

IMAGE_PULL_REASONS = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"}
CONFIG_REASONS = {"CreateContainerConfigError", "CreateContainerError", "RunContainerError"}


@dataclass
class Observed:
    """What the API server says about a ModelDeployment's children."""

    deployment: dict[str, Any] | None = None
    pods: list[dict[str, Any]] = field(default_factory=list)
    # A Secret named in spec.auth.apiKeySecretRef that does not exist.
    missing_secret: str | None = None


@dataclass(frozen=True)
class Cause:
    """Why instances are not ready: a condition reason and a human message."""

    reason: str
    message: str
    fatal: bool  # nothing will get better without a change (image, config, crash loop)


@dataclass(frozen=True)
class EventSpec:
    type: str  # Normal | Warning
    reason: str
    message: str


def format_time(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(s: str | None) -> datetime | None:
    if not s:
        return None
    return datetime.fromisoformat(s.replace("Z", "+00:00"))


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


def diagnose(pods: list[dict[str, Any]], crash_loop_restarts: int) -> Cause | None:
    """The most telling reason the pods are not all ready, or None."""
    crash: Cause | None = None
    pull: Cause | None = None
    config: Cause | None = None
    unschedulable: Cause | None = None
    for pod in live(pods):
        for cond in (pod.get("status") or {}).get("conditions") or []:
            scheduled = cond.get("type") == "PodScheduled" and cond.get("status") == "False"
            if scheduled and cond.get("reason") == "Unschedulable" and unschedulable is None:
                unschedulable = Cause(
                    "Unschedulable", cond.get("message") or "pod cannot be scheduled", False
                )
        for cs in _container_statuses(pod):
            waiting = (cs.get("state") or {}).get("waiting") or {}
            reason = waiting.get("reason") or ""
            name = cs.get("name", "server")
            if reason in IMAGE_PULL_REASONS and pull is None:
                msg = waiting.get("message") or f"cannot pull image {cs.get('image', '')}"
                pull = Cause(reason, f"container {name}: {reason}: {msg}", True)
            elif reason in CONFIG_REASONS and config is None:
                config = Cause(
                    reason, f"container {name}: {reason}: {waiting.get('message', '')}".rstrip(": "), True
                )
            restarts = int(cs.get("restartCount") or 0)
            looping = reason == "CrashLoopBackOff" and restarts >= crash_loop_restarts
            if crash is None and looping:
                term = (cs.get("lastState") or {}).get("terminated") or {}
                detail = f"exit code {term.get('exitCode')}" if term else "restarting"
                if term.get("reason"):
                    detail += f" ({term['reason']})"
                if term.get("message"):
                    detail += f": {str(term['message']).strip()[:300]}"
                crash = Cause(
                    "CrashLoopBackOff",
                    f"container {name} crash-looping after {restarts} restarts, last {detail}",
                    True,
                )
    return crash or config or pull or unschedulable


def _condition(
    previous: list[dict[str, Any]],
    type_: str,
    status: str,
    reason: str,
    message: str,
    now: str,
    generation: int,
) -> dict[str, Any]:
    last = next((c for c in previous if c.get("type") == type_), None)
    transition = last.get("lastTransitionTime") if last and last.get("status") == status else None
    return {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": transition or now,
        "observedGeneration": generation,
    }


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


def compute_status(
    md: ModelDeployment,
    observed: Observed,
    settings: OperatorSettings,
    now: datetime,
    previous: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The whole status the operator wants on the resource (camelCase, as stored)."""
    prev = previous or {}
    prev_conditions: list[dict[str, Any]] = list(prev.get("conditions") or [])
    generation = int(md.metadata.get("generation") or 0)
    capacity = md.spec.capacity
    now_s = format_time(now)

    dep_status = (observed.deployment or {}).get("status") or {}
    dep_meta = (observed.deployment or {}).get("metadata") or {}
    replicas = int(dep_status.get("replicas") or 0)
    ready = int(dep_status.get("readyReplicas") or 0)
    updated = int(dep_status.get("updatedReplicas") or 0)
    dep_current = observed.deployment is not None and int(dep_status.get("observedGeneration") or 0) >= int(
        dep_meta.get("generation") or 0
    )
    dep_replicas_spec = int(((observed.deployment or {}).get("spec") or {}).get("replicas") or 0)
    rolled_out = (
        dep_current and dep_replicas_spec == capacity and updated >= capacity and replicas == capacity
    )

    cause = diagnose(observed.pods, settings.crash_loop_restarts) or deployment_cause(observed.deployment)
    if observed.missing_secret:
        cause = Cause(
            "APIKeySecretNotFound",
            f"spec.auth.apiKeySecretRef: Secret {observed.missing_secret!r} not found in namespace {md.namespace}",
            True,
        )
    ever_ready = bool(prev.get("readyAt"))
    scheduled = [p for p in live(observed.pods) if (p.get("spec") or {}).get("nodeName")]
    # Scheduled pods still inside their startup budget (loading a model): not a reason for Degraded yet.
    starting = [p for p in scheduled if _starting(p, now, settings.startup_seconds)]

    progress_reason = "Scaling" if replicas != capacity or dep_replicas_spec != capacity else "RollingOut"
    if capacity == 0:
        phase = "Idle" if replicas == 0 else "Updating"
    elif ready >= capacity and rolled_out:
        phase = "Running"
    elif cause is not None and cause.fatal and ready == 0:
        phase = "Failed"
    elif not ever_ready:
        phase = "Pending" if not scheduled or (cause is not None and ready == 0) else "Deploying"
    elif (cause is not None and cause.fatal) or (
        ready < capacity
        and not starting
        and (now - _since_not_ready(prev_conditions, now)).total_seconds() >= settings.degraded_grace_seconds
    ):
        phase = "Degraded"
    else:
        phase = "Updating"

    # Ready
    if capacity > 0 and ready >= capacity and phase in ("Running", "Updating"):
        # all asked-for capacity serves, also while a rollout or a scale-down is still under way
        ready_cond = ("True", "AllInstancesReady", f"{ready}/{capacity} instances ready")
    elif phase == "Idle" or capacity == 0:
        stopping = f"; {replicas} instances stopping" if replicas else ""
        ready_cond = (
            "False",
            "ScaledToZero",
            f"capacity is 0: no instance serves{stopping}; the endpoint stays",
        )
    elif cause is not None:
        ready_cond = ("False", cause.reason, f"{ready}/{capacity} instances ready: {cause.message}")
    else:
        detail = f"; {len(starting)} starting (loading the model)" if starting else ""
        ready_cond = ("False", "InstancesNotReady", f"{ready}/{capacity} instances ready{detail}")
    # Progressing
    if phase in ("Running", "Idle"):
        prog_cond = ("False", "Complete", f"{replicas} instances at generation {generation}")
    elif phase == "Failed":
        prog_cond = ("False", "Stalled", cause.message if cause else "instances cannot start")
    elif phase in ("Pending", "Deploying"):
        prog_cond = ("True", phase, f"{ready}/{capacity} instances ready")
    else:
        prog_cond = (
            "True",
            progress_reason,
            f"{replicas} instances, {updated} updated, {ready} ready, {capacity} asked",
        )
    # Degraded
    if phase in ("Degraded", "Failed"):
        reason = cause.reason if cause else "InstancesNotReady"
        message = cause.message if cause else f"only {ready}/{capacity} instances ready"
        deg_cond = ("True", reason, message)
    else:
        deg_cond = ("False", "AsExpected", "")

    conditions = [
        _condition(prev_conditions, "Ready", *ready_cond, now_s, generation),
        _condition(prev_conditions, "Progressing", *prog_cond, now_s, generation),
        _condition(prev_conditions, "Degraded", *deg_cond, now_s, generation),
    ]

    ready_at = prev.get("readyAt")
    time_to_ready = prev.get("timeToReadySeconds")
    if phase == "Running" and not ready_at:
        ready_at = now_s
        created = parse_time(md.metadata.get("creationTimestamp"))
        if created is not None:
            time_to_ready = round((now - created).total_seconds(), 3)

    # Metering: ready instances x compute units x hours, brought up to date when readiness changes
    # or every metering interval (so an unchanged resource is not written on every resync).
    cu_hours = float(prev.get("computeUnitHours") or 0.0)
    metered_at = parse_time(prev.get("meteredAt"))
    prev_ready = int(prev.get("readyCapacity") or 0)
    metered_s = prev.get("meteredAt")
    if metered_at is None:
        metered_s = now_s
    elif ready != prev_ready or (now - metered_at).total_seconds() >= settings.metering_interval_seconds:
        hours = max((now - metered_at).total_seconds(), 0.0) / 3600.0
        cu_hours = round(cu_hours + prev_ready * md.spec.compute_units_per_instance * hours, 6)
        metered_s = now_s

    status: dict[str, Any] = {
        "phase": phase,
        "capacity": capacity,
        "readyCapacity": ready,
        "replicas": replicas,
        "selector": builders.selector_string(md),
        "endpoint": builders.endpoint(md, settings),
        "servedModelName": md.served_name,
        "apiKeySecret": builders.api_key_secret_name(md),
        "conditions": conditions,
        "observedGeneration": generation,
        "readyAt": ready_at,
        "timeToReadySeconds": time_to_ready,
        "computeUnitHours": cu_hours,
        "meteredAt": metered_s,
    }
    return status  # desiredCapacity and lastScaleTime belong to the autoscaler: a merge patch leaves them


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
    prev.update(
        {
            "phase": "Failed",
            "observedGeneration": generation,
            "conditions": [
                _condition(prev_conditions, "Ready", "False", reason, message, now_s, generation),
                _condition(prev_conditions, "Progressing", "False", reason, message, now_s, generation),
                _condition(prev_conditions, "Degraded", "True", reason, message, now_s, generation),
            ],
        }
    )
    return prev


def status_events(previous: dict[str, Any], new: dict[str, Any]) -> list[EventSpec]:
    """Events for what changed: ready, scaled, degraded, failed (deployed comes from reconcile)."""
    events: list[EventSpec] = []
    old_phase, phase = previous.get("phase"), new.get("phase")
    conds = {c["type"]: c for c in new.get("conditions") or []}
    old_ready: dict[str, Any] = next(
        (c for c in previous.get("conditions") or [] if c.get("type") == "Ready"), {}
    )
    new_ready = conds.get("Ready", {})
    if new_ready.get("reason") == "Unschedulable" and old_ready.get("reason") != "Unschedulable":
        events.append(EventSpec("Warning", "Unschedulable", new_ready.get("message", "")))
    if previous.get("capacity") is not None and previous.get("capacity") != new.get("capacity"):
        events.append(
            EventSpec("Normal", "Scaled", f"capacity {previous.get('capacity')} -> {new.get('capacity')}")
        )
    if phase == old_phase:
        return events
    if phase == "Running":
        events.append(
            EventSpec(
                "Normal",
                "Ready",
                f"{new.get('readyCapacity')}/{new.get('capacity')} instances ready; endpoint {new.get('endpoint')}",
            )
        )
    elif phase == "Degraded":
        events.append(EventSpec("Warning", "Degraded", conds.get("Degraded", {}).get("message", "")))
    elif phase == "Failed":
        events.append(EventSpec("Warning", "Failed", conds.get("Ready", {}).get("message", "")))
    elif phase == "Idle":
        events.append(EventSpec("Normal", "Idle", "scaled to zero"))
    return events
