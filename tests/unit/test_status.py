"""Phase, conditions and messages from observed Deployment and Pod states (table-driven)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from berth.api import ModelDeployment
from berth.controller.settings import OperatorSettings
from berth.controller.status import Observed, compute_status, diagnose, failed_status, status_events

from .conftest import md_body

NOW = datetime(2026, 11, 23, 10, 5, 0, tzinfo=UTC)
SCHED_MSG = (
    "0/3 nodes are available: 1 node(s) didn't match Pod's node affinity/selector, "
    "2 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are available: 3 No preemption victims found."
)


def dep(replicas: int = 2, ready: int = 0, updated: int | None = None, spec_replicas: int | None = None,
        generation: int = 1, observed: int = 1) -> dict[str, Any]:
    return {
        "metadata": {"generation": generation},
        "spec": {"replicas": replicas if spec_replicas is None else spec_replicas},
        "status": {
            "observedGeneration": observed,
            "replicas": replicas,
            "readyReplicas": ready,
            "updatedReplicas": replicas if updated is None else updated,
        },
    }


def pod(node: str | None = "gpu-1", ready: bool = False, age: float = 30, phase: str = "Running",
        **container: Any) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase, "conditions": [{"type": "Ready", "status": str(ready)}],
                              "containerStatuses": []}
    if node is None:
        status["conditions"].append(
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": SCHED_MSG}
        )
    cs: dict[str, Any] = {"name": "server", "ready": ready, "restartCount": container.pop("restarts", 0), "state": {},
                          "started": container.pop("started", ready)}
    if "running_for" in container:
        started_at = NOW - timedelta(seconds=container.pop("running_for"))
        cs["state"] = {"running": {"startedAt": started_at.strftime("%Y-%m-%dT%H:%M:%SZ")}}
    if "waiting" in container:
        cs["state"] = {"waiting": container.pop("waiting")}
    if "terminated" in container:
        cs["lastState"] = {"terminated": container.pop("terminated")}
    if node is not None:
        status["containerStatuses"].append(cs)
    created = (NOW - timedelta(seconds=age)).strftime("%Y-%m-%dT%H:%M:%SZ")
    meta = {"name": "p", "creationTimestamp": created}
    return {"metadata": meta, "spec": {"nodeName": node} if node else {}, "status": status}


PULL = {"reason": "ImagePullBackOff", "message": 'Back-off pulling image "berth/server:nope"'}
CRASH_WAIT = {"reason": "CrashLoopBackOff", "message": "back-off 40s restarting failed container"}
CRASH_TERM = {"exitCode": 1, "reason": "Error", "message": "ModelLoadError: /models/pvc/qwen: no config.json"}
REPLICA_FAILURE = {**dep(1), "status": {"observedGeneration": 1, "conditions": [
    {"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate",
     "message": 'pods "chat-7d9-x" is forbidden: exceeded quota: gpu-quota'}]}}
RUNNING_BEFORE = {"readyAt": "2026-11-23T10:01:00Z", "phase": "Running", "capacity": 2, "readyCapacity": 2}


def not_ready_since(seconds: float) -> dict[str, Any]:
    t = (NOW - timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {**RUNNING_BEFORE, "phase": "Updating",
            "conditions": [{"type": "Ready", "status": "False", "lastTransitionTime": t}]}


# (name, capacity, deployment, pods, previous status, phase, Ready status, Ready reason, words in Ready message)
TABLE: list[tuple[str, int, dict[str, Any] | None, list[dict[str, Any]], dict[str, Any], str, str, str, str]] = [
    ("nothing yet", 2, None, [], {}, "Pending", "False", "InstancesNotReady", "0/2 instances ready"),
    ("unschedulable gpu", 2, dep(2), [pod(None), pod(None)], {}, "Pending", "False", "Unschedulable",
     "2 Insufficient nvidia.com/gpu"),
    ("loading", 2, dep(2), [pod(), pod()], {}, "Deploying", "False", "InstancesNotReady",
     "2 starting (loading the model)"),
    ("half ready first time", 2, dep(2, ready=1), [pod(ready=True), pod()], {}, "Deploying", "False",
     "InstancesNotReady", "1/2 instances ready"),
    ("all ready", 2, dep(2, ready=2), [pod(ready=True), pod(ready=True)], {}, "Running", "True",
     "AllInstancesReady", "2/2 instances ready"),
    ("image pull", 2, dep(2), [pod(waiting=PULL), pod(waiting=PULL)], {}, "Failed", "False", "ImagePullBackOff",
     'Back-off pulling image "berth/server:nope"'),
    ("crash loop", 1, dep(1), [pod(waiting=CRASH_WAIT, restarts=4, terminated=CRASH_TERM)], {}, "Failed", "False",
     "CrashLoopBackOff", "exit code 1 (Error): ModelLoadError: /models/pvc/qwen: no config.json"),
    ("scale up in progress", 4, dep(4, ready=2, updated=4), [pod(ready=True)] * 2 + [pod()] * 2,
     RUNNING_BEFORE, "Updating", "False", "InstancesNotReady", "2/4 instances ready"),
    ("scale up unschedulable after grace", 4, dep(4, ready=2), [pod(ready=True)] * 2 + [pod(None)] * 2,
     not_ready_since(600), "Degraded", "False", "Unschedulable", "Insufficient nvidia.com/gpu"),
    ("lost a pod within grace", 2, dep(2, ready=1), [pod(ready=True), pod()], not_ready_since(10), "Updating",
     "False", "InstancesNotReady", "1/2 instances ready"),
    ("lost a pod after grace", 2, dep(2, ready=1), [pod(ready=True), pod(age=4000)], not_ready_since(600),
     "Degraded",
     "False", "InstancesNotReady", "1/2 instances ready"),
    ("rollout with bad image keeps serving", 2, dep(3, ready=2, updated=1, generation=2, observed=2),
     [pod(ready=True), pod(ready=True), pod(waiting=PULL)], RUNNING_BEFORE, "Degraded", "False", "ImagePullBackOff",
     "2/2 instances ready"),
    ("rollout not observed yet", 2, dep(2, ready=2, generation=3, observed=2), [pod(ready=True)] * 2,
     RUNNING_BEFORE, "Updating", "True", "AllInstancesReady", "2/2 instances ready"),
    ("scale up still loading past grace", 3, dep(3, ready=1), [pod(ready=True), pod(age=200), pod(age=200)],
     not_ready_since(600), "Updating", "False", "InstancesNotReady", "2 starting (loading the model)"),
    ("served, then lost readiness: not starting", 2, dep(2, ready=1),
     [pod(ready=True), pod(age=200, running_for=190, started=True)], not_ready_since(600), "Degraded", "False",
     "InstancesNotReady", "1/2 instances ready"),
    ("restarted container reloading its model", 2, dep(2, ready=1),
     [pod(ready=True), pod(age=4000, running_for=60, restarts=1)], not_ready_since(600), "Updating", "False",
     "InstancesNotReady", "1 starting (loading the model)"),
    ("exited, waiting to restart: not starting", 2, dep(2, ready=1),
     [pod(ready=True), pod(age=200, restarts=1, waiting=CRASH_WAIT)], not_ready_since(600), "Degraded", "False",
     "InstancesNotReady", "1/2 instances ready"),
    ("evicted pod is history", 2, dep(2, ready=2), [pod(ready=True), pod(ready=True),
     pod(phase="Failed", waiting=CRASH_WAIT, restarts=5)], RUNNING_BEFORE, "Running", "True",
     "AllInstancesReady", "2/2"),
    ("one crash is not a loop", 1, dep(1), [pod(waiting=CRASH_WAIT, restarts=1)], {}, "Deploying", "False",
     "InstancesNotReady", "0/1 instances ready"),
    ("pods cannot be created", 1, REPLICA_FAILURE, [], {}, "Failed", "False", "FailedCreate",
     'exceeded quota: gpu-quota'),
    ("scaled to zero", 0, dep(0), [], RUNNING_BEFORE, "Idle", "False", "ScaledToZero", "endpoint stays"),
    ("scaling to zero", 0, dep(2, ready=2, spec_replicas=0), [pod(ready=True)] * 2, RUNNING_BEFORE, "Updating",
     "False", "ScaledToZero", "no instance serves; 2 instances stopping"),
]


@pytest.mark.parametrize(
    ("capacity", "deployment", "pods", "previous", "phase", "ready_status", "ready_reason", "words"),
    [t[1:] for t in TABLE],
    ids=[t[0] for t in TABLE],
)
def test_phase_and_conditions(
    settings: OperatorSettings,
    capacity: int,
    deployment: dict[str, Any] | None,
    pods: list[dict[str, Any]],
    previous: dict[str, Any],
    phase: str,
    ready_status: str,
    ready_reason: str,
    words: str,
) -> None:
    md = ModelDeployment.model_validate(md_body(spec={"capacity": capacity, "resources": {"gpus": 1}}))
    st = compute_status(md, Observed(deployment, pods), settings, NOW, previous)
    assert st["phase"] == phase
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == (ready_status, ready_reason)
    assert words in ready["message"]
    degraded = next(c for c in st["conditions"] if c["type"] == "Degraded")
    assert degraded["status"] == ("True" if phase in ("Degraded", "Failed") else "False")
    assert st["capacity"] == capacity
    assert st["selector"] == "berth.dev/model-deployment=chat"
    assert st["endpoint"] == "http://chat.team-a.svc.cluster.local/v1"


def test_first_running_records_ready_at_and_time_to_ready(settings: OperatorSettings) -> None:
    md = ModelDeployment.model_validate(md_body(spec={"capacity": 1}))
    st = compute_status(md, Observed(dep(1, ready=1), [pod(ready=True)]), settings, NOW, {"phase": "Deploying"})
    assert st["readyAt"] == "2026-11-23T10:05:00Z"
    assert st["timeToReadySeconds"] == 300.0  # created 10:00:00
    later = compute_status(md, Observed(dep(1, ready=1), [pod(ready=True)]), settings, NOW + timedelta(hours=1), st)
    assert later["readyAt"] == st["readyAt"]


def test_condition_transition_time_kept_while_status_unchanged(settings: OperatorSettings) -> None:
    md = ModelDeployment.model_validate(md_body(spec={"capacity": 1}))
    first = compute_status(md, Observed(dep(1), [pod()]), settings, NOW, {})
    second = compute_status(md, Observed(dep(1), [pod()]), settings, NOW + timedelta(seconds=30), first)
    assert first["conditions"] == second["conditions"]


def test_compute_unit_hours_metering(settings: OperatorSettings) -> None:
    md = ModelDeployment.model_validate(md_body(spec={"capacity": 2, "computeUnitsPerInstance": 1.5}))
    obs = Observed(dep(2, ready=2), [pod(ready=True)] * 2)
    st = compute_status(md, obs, settings, NOW, {})
    assert st["computeUnitHours"] == 0.0 and st["meteredAt"] == "2026-11-23T10:05:00Z"
    # within the metering interval and nothing changed: identical status, so no write
    same = compute_status(md, obs, settings, NOW + timedelta(seconds=60), st)
    assert same == st
    # after an hour: 2 ready x 1.5 CU x 1 h
    later = compute_status(md, obs, settings, NOW + timedelta(hours=1), st)
    assert later["computeUnitHours"] == pytest.approx(3.0)


def test_failed_status_keeps_the_rest() -> None:
    prev = {"phase": "Running", "readyCapacity": 2, "endpoint": "http://x/v1"}
    st = failed_status(md_body(), "spec.autoscaling: minCapacity (3) must not exceed maxCapacity (1)", NOW, prev)
    assert st["phase"] == "Failed" and st["readyCapacity"] == 2 and st["endpoint"] == "http://x/v1"
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "InvalidSpec" and "minCapacity" in ready["message"]
    refused = failed_status(md_body(), "the API server refused a child: ...", NOW, prev, reason="ChildRejected")
    assert {c["reason"] for c in refused["conditions"]} == {"ChildRejected"}


def test_events_on_transitions() -> None:
    ready = [{"type": "Ready", "status": "True", "message": "2/2"}]
    assert [e.reason for e in status_events({}, {"phase": "Pending"})] == []
    evs = status_events({"phase": "Deploying", "capacity": 2}, {"phase": "Running", "capacity": 2,
                                                                "readyCapacity": 2, "endpoint": "http://e/v1",
                                                                "conditions": ready})
    assert [(e.reason, e.type) for e in evs] == [("Ready", "Normal")]
    assert "endpoint http://e/v1" in evs[0].message
    evs = status_events({"phase": "Running", "capacity": 2}, {"phase": "Updating", "capacity": 5, "conditions": []})
    assert [(e.reason, e.message) for e in evs] == [("Scaled", "capacity 2 -> 5")]
    evs = status_events({"phase": "Running"}, {"phase": "Degraded", "conditions": [
        {"type": "Degraded", "status": "True", "message": "only 1/2 instances ready"}]})
    assert [(e.reason, e.type, e.message) for e in evs] == [("Degraded", "Warning", "only 1/2 instances ready")]
    assert status_events({"phase": "Running"}, {"phase": "Running"}) == []


def test_diagnose_prefers_the_fatal_cause() -> None:
    cause = diagnose([pod(None), pod(waiting=PULL)], crash_loop_restarts=3)
    assert cause is not None and cause.reason == "ImagePullBackOff" and cause.fatal
    assert diagnose([pod(ready=True)], 3) is None
    # restarts long ago on a container that is ready now are not a crash loop
    assert diagnose([pod(ready=True, restarts=5)], 3) is None


def test_unschedulable_event_when_the_reason_appears_in_the_same_phase() -> None:
    pending = {"phase": "Pending", "conditions": [{"type": "Ready", "status": "False", "reason": "InstancesNotReady"}]}
    now = {"phase": "Pending", "conditions": [{"type": "Ready", "status": "False", "reason": "Unschedulable",
                                               "message": SCHED_MSG}]}
    assert [(e.reason, e.message) for e in status_events(pending, now)] == [("Unschedulable", SCHED_MSG)]
    assert status_events(now, now) == []
