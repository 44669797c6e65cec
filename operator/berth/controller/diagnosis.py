"""Why a ModelDeployment's instances are not ready, read from its pods, their Events and its Deployment.

A pure function of what the API server reports: the scheduler's own message for an unschedulable pod,
the container's reason for an image-pull failure, a bad config or a crash loop (with its last exit),
the attach/detach controller's Multi-Attach error for a volume another node still holds, the
Deployment's ReplicaFailure or ProgressDeadlineExceeded, and a child another owner controls. Also
which pods are still on their way (creating their containers, downloading the model) and the model
commit a finished hf:// download reported. status.py turns a `Cause` into the phase and conditions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from berth.controller.pod import DOWNLOAD_CONTAINER

IMAGE_PULL_REASONS = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"}
CONFIG_REASONS = {"CreateContainerConfigError", "CreateContainerError", "RunContainerError"}
# Waiting reasons of a container that is still being set up (image pull, volume mounts, init containers).
CREATING_REASONS = {"ContainerCreating", "PodInitializing"}
# Pod events that say why a pod stays in ContainerCreating (the attach/detach controller, the kubelet).
VOLUME_EVENT_REASONS = {"FailedAttachVolume", "FailedMount"}
MULTI_ATTACH = "MultiAttachError"
CHILD_CONFLICT = "ChildConflict"


@dataclass(frozen=True)
class Cause:
    """Why instances are not ready: a condition reason and a human message."""

    reason: str
    message: str
    fatal: bool  # nothing will get better without a change (image, config, crash loop)


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
    if not (pod.get("spec") or {}).get("nodeName") or pod_ready(pod):
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


def volume_event(pod: dict[str, Any], events: list[dict[str, Any]]) -> Cause | None:
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
        or _first(volume_event(pod, events or []) for pod in pods)
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


def pod_ready(pod: dict[str, Any]) -> bool:
    conds = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conds)


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
