"""The phase and the conditions of a ModelDeployment, decided from a `View` of its observation.

Ready: every asked-for instance serves. Available: at least min(spec.rollout.minAvailable, capacity)
instances serve, so it stays True through a scale-up or a rollout. Progressing: a rollout or a scale is
under way. Degraded: fewer than asked serve, with the cause. Autoscaling: from status.autoscaler (the
autoscaler's last sample). Each is a (status, reason, message) triple; status.py stamps the times.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from berth.api.models import AutoscalerStatus, ConditionStatus, Phase
from berth.controller.diagnosis import CHILD_CONFLICT, Cause

# (status, reason, message) of one condition
Cond = tuple[ConditionStatus, str, str]


@dataclass(frozen=True)
class DeploymentCounts:
    """The Deployment's counts that the phase depends on."""

    replicas: int = 0
    ready: int = 0
    updated: int = 0
    spec_replicas: int = 0
    current: bool = False  # the Deployment controller has acted on the Deployment's latest spec

    @classmethod
    def of(cls, deployment: dict[str, Any] | None) -> DeploymentCounts:
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
class View:
    """Everything the phase and the conditions are decided from."""

    capacity: int
    rollout: DeploymentCounts
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


def decide_phase(v: View, degraded_grace_seconds: float) -> Phase:
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


def ready_condition(v: View, phase: Phase) -> Cond:
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


def _progress(v: View) -> str:
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


def available_condition(v: View) -> Cond:
    """True while at least min(minAvailable, capacity) instances serve (and at least one)."""
    ready = v.rollout.ready
    if v.capacity == 0:
        return ("False", "ScaledToZero", "capacity is 0: no instance serves")
    need = max(1, min(v.min_available, v.capacity))
    if ready >= need:
        return ("True", "MinimumInstancesAvailable", f"{v.ready_of} (at least {need} must serve)")
    why = f": {v.cause.message}" if v.cause is not None else _progress(v)
    return ("False", "MinimumInstancesUnavailable", f"{v.ready_of}, {need} needed{why}")


def progressing_condition(v: View, phase: Phase, generation: int) -> Cond:
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


def degraded_condition(v: View, phase: Phase) -> Cond:
    if phase not in ("Degraded", "Failed"):
        return ("False", "AsExpected", "")
    if v.cause is not None:
        return ("True", v.cause.reason, v.cause.message)
    return ("True", "InstancesNotReady", f"only {v.rollout.ready}/{v.capacity} instances ready")


EXTERNAL_AUTOSCALER = "ExternalAutoscaler"


def autoscaling_condition(sample: dict[str, Any] | None) -> Cond:
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
