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

Three modules, one job each: diagnosis.py reads why pods are not ready (a `Cause`); conditions.py
decides the phase and the conditions from a `View`; this module observes (the `View`), stamps the
condition times, meters compute units and writes the `ModelDeploymentStatus` patch.

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
from berth.controller.conditions import (
    Cond,
    DeploymentCounts,
    View,
    autoscaling_condition,
    available_condition,
    decide_phase,
    degraded_condition,
    progressing_condition,
    ready_condition,
)
from berth.controller.diagnosis import (
    Cause,
    conflict_cause,
    creating,
    deployment_cause,
    diagnose,
    downloading,
    live,
    pod_ready,
    resolved_revision,
    volume_event,
)
from berth.controller.settings import OperatorSettings

# The status fields the reconcile writes (the autoscaler's are left to it), and their stored keys:
# anything else under status is left as it is.
RECONCILED_FIELDS = ModelDeploymentStatus.reconciled_fields()
MANAGED_STATUS_KEYS = ModelDeploymentStatus.wire_names(RECONCILED_FIELDS)
_FAILED_FIELDS = frozenset({"phase", "observed_generation", "conditions"})


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


def format_time(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(s: str | None) -> datetime | None:
    if not s:
        return None
    return datetime.fromisoformat(s.replace("Z", "+00:00"))


def managed_status(status: dict[str, Any]) -> dict[str, Any]:
    """The part of a stored status the reconcile owns (what decides whether a write is needed)."""
    return {k: status.get(k) for k in MANAGED_STATUS_KEYS}


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


def _starting(pod: dict[str, Any], now: datetime, budget: float) -> bool:
    """Not ready and still loading its model, within the startup budget.

    The startup probe is /health/ready, so a container's `started` turns true once its model is loaded
    and resets when the container restarts: a pod that served and then lost readiness (started) or
    whose container exited and waits to restart is not starting. The budget runs from the container's
    last start (from the pod's creation while no container runs yet: image pull, volume mount)."""
    if pod_ready(pod):
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
) -> View:
    scheduled = [p for p in live(observed.pods) if (p.get("spec") or {}).get("nodeName")]
    since = _since_not_ready(list(prev.get("conditions") or []), now)
    # a pod held up by a volume (Multi-Attach, a failed mount) is not on its way
    held = {id(p) for p in scheduled if volume_event(p, observed.pod_events) is not None}
    pulling = [p for p in scheduled if creating(p) and id(p) not in held]
    fetching = [p for p in scheduled if downloading(p)]
    busy = held | {id(p) for p in pulling + fetching}
    # Scheduled pods still inside their startup budget (loading a model): not a reason for Degraded yet.
    starting = sum(1 for p in scheduled if id(p) not in busy and _starting(p, now, settings.startup_seconds))
    on_the_way = len(pulling) + len(fetching) + starting
    return View(
        capacity=md.spec.capacity,
        rollout=DeploymentCounts.of(observed.deployment),
        cause=_patient(_cause(md, observed, settings.crash_loop_restarts), on_the_way),
        ever_ready=bool(prev.get("readyAt")),
        scheduled=len(scheduled),
        starting=starting,
        not_ready_seconds=(now - since).total_seconds(),
        creating=len(pulling),
        downloading=len(fetching),
        min_available=md.spec.rollout.min_available,
    )


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
    phase = decide_phase(view, settings.degraded_grace_seconds)
    ready_at, time_to_ready = _first_ready(md, prev, phase, now)
    cu_hours, metered_at = _meter(md, prev, view.rollout.ready, now, settings.metering_interval_seconds)
    conditions: list[tuple[ConditionType, Cond]] = [
        ("Ready", ready_condition(view, phase)),
        ("Available", available_condition(view)),
        ("Progressing", progressing_condition(view, phase, generation)),
        ("Degraded", degraded_condition(view, phase)),
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
