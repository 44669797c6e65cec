"""Phase, conditions and messages from observed Deployment and Pod states (table-driven)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import pytest

from berth.api import ModelDeployment
from berth.api.models import Phase
from berth.controller.diagnosis import diagnose
from berth.controller.events import status_events
from berth.controller.settings import OperatorSettings
from berth.controller.status import Observed, compute_status, failed_status

from .conftest import md_body

NOW = datetime(2026, 11, 23, 10, 5, 0, tzinfo=UTC)
SCHED_MSG = (
    "0/3 nodes are available: 1 node(s) didn't match Pod's node affinity/selector, "
    "2 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are available: 3 No preemption victims found."
)


def dep(
    replicas: int = 2,
    ready: int = 0,
    updated: int | None = None,
    spec_replicas: int | None = None,
    generation: int = 1,
    observed: int = 1,
) -> dict[str, Any]:
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


def pod(
    node: str | None = "gpu-1", ready: bool = False, age: float = 30, phase: str = "Running", **container: Any
) -> dict[str, Any]:
    status: dict[str, Any] = {
        "phase": phase,
        "conditions": [{"type": "Ready", "status": str(ready)}],
        "containerStatuses": [],
    }
    if node is None:
        status["conditions"].append(
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": SCHED_MSG}
        )
    cs: dict[str, Any] = {
        "name": "server",
        "ready": ready,
        "restartCount": container.pop("restarts", 0),
        "state": {},
        "started": container.pop("started", ready),
    }
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
REPLICA_FAILURE = {
    **dep(1),
    "status": {
        "observedGeneration": 1,
        "conditions": [
            {
                "type": "ReplicaFailure",
                "status": "True",
                "reason": "FailedCreate",
                "message": 'pods "chat-7d9-x" is forbidden: exceeded quota: gpu-quota',
            }
        ],
    },
}
RUNNING_BEFORE = {"readyAt": "2026-11-23T10:01:00Z", "phase": "Running", "capacity": 2, "readyCapacity": 2}


def not_ready_since(seconds: float) -> dict[str, Any]:
    t = (NOW - timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        **RUNNING_BEFORE,
        "phase": "Updating",
        "conditions": [{"type": "Ready", "status": "False", "lastTransitionTime": t}],
    }


@dataclass(frozen=True)
class Seen:
    """What the API server shows: the capacity asked for, the Deployment, its pods, the status before."""

    capacity: int
    deployment: dict[str, Any] | None = None
    pods: list[dict[str, Any]] = field(default_factory=list)
    previous: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Want:
    """The phase and the Ready condition that must follow: its status, its reason, words in its message."""

    phase: Phase
    ready: Literal["True", "False"]
    reason: str
    words: str


TABLE = [
    pytest.param(
        Seen(capacity=2),
        Want(phase="Pending", ready="False", reason="InstancesNotReady", words="0/2 instances ready"),
        id="nothing yet",
    ),
    pytest.param(
        Seen(capacity=2, deployment=dep(2), pods=[pod(None), pod(None)]),
        Want(phase="Pending", ready="False", reason="Unschedulable", words="2 Insufficient nvidia.com/gpu"),
        id="unschedulable gpu",
    ),
    pytest.param(
        Seen(capacity=2, deployment=dep(2), pods=[pod(), pod()]),
        Want(
            phase="Deploying",
            ready="False",
            reason="InstancesNotReady",
            words="2 starting (loading the model)",
        ),
        id="loading",
    ),
    pytest.param(
        Seen(capacity=2, deployment=dep(2, ready=1), pods=[pod(ready=True), pod()]),
        Want(phase="Deploying", ready="False", reason="InstancesNotReady", words="1/2 instances ready"),
        id="half ready first time",
    ),
    pytest.param(
        Seen(capacity=2, deployment=dep(2, ready=2), pods=[pod(ready=True), pod(ready=True)]),
        Want(phase="Running", ready="True", reason="AllInstancesReady", words="2/2 instances ready"),
        id="all ready",
    ),
    pytest.param(
        Seen(capacity=2, deployment=dep(2), pods=[pod(waiting=PULL), pod(waiting=PULL)]),
        Want(
            phase="Failed",
            ready="False",
            reason="ImagePullBackOff",
            words='Back-off pulling image "berth/server:nope"',
        ),
        id="image pull",
    ),
    pytest.param(
        Seen(
            capacity=1, deployment=dep(1), pods=[pod(waiting=CRASH_WAIT, restarts=4, terminated=CRASH_TERM)]
        ),
        Want(
            phase="Failed",
            ready="False",
            reason="CrashLoopBackOff",
            words="exit code 1 (Error): ModelLoadError: /models/pvc/qwen: no config.json",
        ),
        id="crash loop",
    ),
    pytest.param(
        Seen(
            capacity=4,
            deployment=dep(4, ready=2, updated=4),
            pods=[pod(ready=True)] * 2 + [pod()] * 2,
            previous=RUNNING_BEFORE,
        ),
        Want(phase="Updating", ready="False", reason="InstancesNotReady", words="2/4 instances ready"),
        id="scale up in progress",
    ),
    pytest.param(
        Seen(
            capacity=4,
            deployment=dep(4, ready=2),
            pods=[pod(ready=True)] * 2 + [pod(None)] * 2,
            previous=not_ready_since(600),
        ),
        Want(phase="Degraded", ready="False", reason="Unschedulable", words="Insufficient nvidia.com/gpu"),
        id="scale up unschedulable after grace",
    ),
    pytest.param(
        Seen(
            capacity=2,
            deployment=dep(2, ready=1),
            pods=[pod(ready=True), pod()],
            previous=not_ready_since(10),
        ),
        Want(phase="Updating", ready="False", reason="InstancesNotReady", words="1/2 instances ready"),
        id="lost a pod within grace",
    ),
    pytest.param(
        Seen(
            capacity=2,
            deployment=dep(2, ready=1),
            pods=[pod(ready=True), pod(age=4000)],
            previous=not_ready_since(600),
        ),
        Want(phase="Degraded", ready="False", reason="InstancesNotReady", words="1/2 instances ready"),
        id="lost a pod after grace",
    ),
    pytest.param(
        Seen(
            capacity=2,
            deployment=dep(3, ready=2, updated=1, generation=2, observed=2),
            pods=[pod(ready=True), pod(ready=True), pod(waiting=PULL)],
            previous=RUNNING_BEFORE,
        ),
        Want(phase="Degraded", ready="False", reason="ImagePullBackOff", words="2/2 instances ready"),
        id="rollout with bad image keeps serving",
    ),
    pytest.param(
        Seen(
            capacity=2,
            deployment=dep(2, ready=2, generation=3, observed=2),
            pods=[pod(ready=True)] * 2,
            previous=RUNNING_BEFORE,
        ),
        Want(phase="Updating", ready="True", reason="AllInstancesReady", words="2/2 instances ready"),
        id="rollout not observed yet",
    ),
    pytest.param(
        Seen(
            capacity=3,
            deployment=dep(3, ready=1),
            pods=[pod(ready=True), pod(age=200), pod(age=200)],
            previous=not_ready_since(600),
        ),
        Want(
            phase="Updating",
            ready="False",
            reason="InstancesNotReady",
            words="2 starting (loading the model)",
        ),
        id="scale up still loading past grace",
    ),
    pytest.param(
        Seen(
            capacity=2,
            deployment=dep(2, ready=1),
            pods=[pod(ready=True), pod(age=200, running_for=190, started=True)],
            previous=not_ready_since(600),
        ),
        Want(phase="Degraded", ready="False", reason="InstancesNotReady", words="1/2 instances ready"),
        id="served, then lost readiness: not starting",
    ),
    pytest.param(
        Seen(
            capacity=2,
            deployment=dep(2, ready=1),
            pods=[pod(ready=True), pod(age=4000, running_for=60, restarts=1)],
            previous=not_ready_since(600),
        ),
        Want(
            phase="Updating",
            ready="False",
            reason="InstancesNotReady",
            words="1 starting (loading the model)",
        ),
        id="restarted container reloading its model",
    ),
    pytest.param(
        Seen(
            capacity=2,
            deployment=dep(2, ready=1),
            pods=[pod(ready=True), pod(age=200, restarts=1, waiting=CRASH_WAIT)],
            previous=not_ready_since(600),
        ),
        Want(phase="Degraded", ready="False", reason="InstancesNotReady", words="1/2 instances ready"),
        id="exited, waiting to restart: not starting",
    ),
    pytest.param(
        Seen(
            capacity=2,
            deployment=dep(2, ready=2),
            pods=[pod(ready=True), pod(ready=True), pod(phase="Failed", waiting=CRASH_WAIT, restarts=5)],
            previous=RUNNING_BEFORE,
        ),
        Want(phase="Running", ready="True", reason="AllInstancesReady", words="2/2"),
        id="evicted pod is history",
    ),
    pytest.param(
        Seen(capacity=1, deployment=dep(1), pods=[pod(waiting=CRASH_WAIT, restarts=1)]),
        Want(phase="Deploying", ready="False", reason="InstancesNotReady", words="0/1 instances ready"),
        id="one crash is not a loop",
    ),
    pytest.param(
        Seen(capacity=1, deployment=REPLICA_FAILURE),
        Want(phase="Failed", ready="False", reason="FailedCreate", words="exceeded quota: gpu-quota"),
        id="pods cannot be created",
    ),
    pytest.param(
        Seen(capacity=0, deployment=dep(0), previous=RUNNING_BEFORE),
        Want(phase="Idle", ready="False", reason="ScaledToZero", words="endpoint stays"),
        id="scaled to zero",
    ),
    pytest.param(
        Seen(
            capacity=0,
            deployment=dep(2, ready=2, spec_replicas=0),
            pods=[pod(ready=True)] * 2,
            previous=RUNNING_BEFORE,
        ),
        Want(
            phase="Updating",
            ready="False",
            reason="ScaledToZero",
            words="no instance serves; 2 instances stopping",
        ),
        id="scaling to zero",
    ),
]


@pytest.mark.parametrize(("seen", "want"), TABLE)
def test_phase_and_conditions(settings: OperatorSettings, seen: Seen, want: Want) -> None:
    md = ModelDeployment.model_validate(md_body(spec={"capacity": seen.capacity, "resources": {"gpus": 1}}))
    st = compute_status(md, Observed(seen.deployment, seen.pods), settings, NOW, seen.previous)
    assert st["phase"] == want.phase
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == (want.ready, want.reason)
    assert want.words in ready["message"]
    degraded = next(c for c in st["conditions"] if c["type"] == "Degraded")
    assert degraded["status"] == ("True" if want.phase in ("Degraded", "Failed") else "False")
    assert st["capacity"] == seen.capacity
    assert st["selector"] == "berth.dev/model-deployment=chat"
    assert st["endpoint"] == "http://chat.team-a.svc.cluster.local/v1"


def test_first_running_records_ready_at_and_time_to_ready(settings: OperatorSettings) -> None:
    md = ModelDeployment.model_validate(md_body(spec={"capacity": 1}))
    st = compute_status(
        md, Observed(dep(1, ready=1), [pod(ready=True)]), settings, NOW, {"phase": "Deploying"}
    )
    assert st["readyAt"] == "2026-11-23T10:05:00Z"
    assert st["timeToReadySeconds"] == 300.0  # created 10:00:00
    later = compute_status(
        md, Observed(dep(1, ready=1), [pod(ready=True)]), settings, NOW + timedelta(hours=1), st
    )
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
    # by default nothing is written while the ready count stays: an hour later, still no change
    assert compute_status(md, obs, settings, NOW + timedelta(hours=1), st) == st
    # one instance lost after an hour: 2 ready x 1.5 CU x 1 h booked at the change
    one = Observed(dep(2, ready=1), [pod(ready=True), pod()])
    lost = compute_status(md, one, settings, NOW + timedelta(hours=1), st)
    assert lost["computeUnitHours"] == pytest.approx(3.0) and lost["meteredAt"] == "2026-11-23T11:05:00Z"
    # with a metering interval, also brought up to date after it: 2 x 1.5 x 1 h
    periodic = settings.model_copy(update={"metering_interval_seconds": 300.0})
    later = compute_status(md, obs, periodic, NOW + timedelta(hours=1), st)
    assert later["computeUnitHours"] == pytest.approx(3.0)


def test_failed_status_keeps_the_rest() -> None:
    prev = {"phase": "Running", "readyCapacity": 2, "endpoint": "http://x/v1"}
    st = failed_status(
        md_body(), "spec.autoscaling: minCapacity (3) must not exceed maxCapacity (1)", NOW, prev
    )
    assert st["phase"] == "Failed" and st["readyCapacity"] == 2 and st["endpoint"] == "http://x/v1"
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "InvalidSpec" and "minCapacity" in ready["message"]
    refused = failed_status(
        md_body(), "the API server refused a child: ...", NOW, prev, reason="ChildRejected"
    )
    assert {c["reason"] for c in refused["conditions"]} == {"ChildRejected"}


def test_events_on_transitions() -> None:
    ready = [{"type": "Ready", "status": "True", "message": "2/2"}]
    assert [e.reason for e in status_events({}, {"phase": "Pending"})] == []
    evs = status_events(
        {"phase": "Deploying", "capacity": 2},
        {
            "phase": "Running",
            "capacity": 2,
            "readyCapacity": 2,
            "endpoint": "http://e/v1",
            "conditions": ready,
        },
    )
    assert [(e.reason, e.type) for e in evs] == [("Ready", "Normal")]
    assert "endpoint http://e/v1" in evs[0].message
    evs = status_events(
        {"phase": "Running", "capacity": 2}, {"phase": "Updating", "capacity": 5, "conditions": []}
    )
    assert [(e.reason, e.message) for e in evs] == [("Scaled", "capacity 2 -> 5")]
    evs = status_events(
        {"phase": "Running"},
        {
            "phase": "Degraded",
            "conditions": [{"type": "Degraded", "status": "True", "message": "only 1/2 instances ready"}],
        },
    )
    assert [(e.reason, e.type, e.message) for e in evs] == [
        ("Degraded", "Warning", "only 1/2 instances ready")
    ]
    assert status_events({"phase": "Running"}, {"phase": "Running"}) == []


def test_diagnose_prefers_the_fatal_cause() -> None:
    cause = diagnose([pod(None), pod(waiting=PULL)], crash_loop_restarts=3)
    assert cause is not None and cause.reason == "ImagePullBackOff" and cause.fatal
    assert diagnose([pod(ready=True)], 3) is None
    # restarts long ago on a container that is ready now are not a crash loop
    assert diagnose([pod(ready=True, restarts=5)], 3) is None


def test_unschedulable_event_when_the_reason_appears_in_the_same_phase() -> None:
    pending = {
        "phase": "Pending",
        "conditions": [{"type": "Ready", "status": "False", "reason": "InstancesNotReady"}],
    }
    now = {
        "phase": "Pending",
        "conditions": [{"type": "Ready", "status": "False", "reason": "Unschedulable", "message": SCHED_MSG}],
    }
    assert [(e.reason, e.message) for e in status_events(pending, now)] == [("Unschedulable", SCHED_MSG)]
    assert status_events(now, now) == []


# ---------------------------------------------------------------- lifecycle (issue 14)

DEADLINE = {
    **dep(1),
    "status": {
        "observedGeneration": 1,
        "replicas": 1,
        "updatedReplicas": 1,
        "conditions": [
            {
                "type": "Progressing",
                "status": "False",
                "reason": "ProgressDeadlineExceeded",
                "message": 'ReplicaSet "chat-7d9" has timed out progressing.',
            }
        ],
    },
}


def _ts(seconds_ago: float) -> str:
    return (NOW - timedelta(seconds=seconds_ago)).strftime("%Y-%m-%dT%H:%M:%SZ")


def hf_pod(
    age: float, init: dict[str, Any], server: dict[str, Any], name: str = "p", ready: bool = False
) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "uid": f"uid-{name}", "creationTimestamp": _ts(age)},
        "spec": {"nodeName": "n1"},
        "status": {
            "phase": "Pending" if "running" in init else "Running",
            "conditions": [{"type": "Ready", "status": str(ready)}],
            "initContainerStatuses": [{"name": "download-model", "restartCount": 0, "state": init}],
            "containerStatuses": [{"name": "server", "restartCount": 0, "started": ready, "state": server}],
        },
    }


def _cond(st: dict[str, Any], type_: str) -> dict[str, Any]:
    found: dict[str, Any] = next(c for c in st["conditions"] if c["type"] == type_)
    return found


HF = {"model": {"uri": "hf://acme/big"}, "capacity": 1}
INITIALIZING = {"waiting": {"reason": "PodInitializing"}}


def test_a_long_download_past_the_deadline_is_not_failed(settings: OperatorSettings) -> None:
    md = ModelDeployment.model_validate(md_body(spec=HF))
    # downloading for three startup budgets, the Deployment gave up: still on its way
    downloading = hf_pod(
        3 * settings.startup_seconds, {"running": {"startedAt": _ts(3 * 1800)}}, INITIALIZING
    )
    st = compute_status(md, Observed(DEADLINE, [downloading]), settings, NOW, {})
    assert st["phase"] == "Deploying"
    ready = _cond(st, "Ready")
    assert ready["reason"] == "InstancesNotReady" and "1 downloading the model" in ready["message"]
    assert _cond(st, "Degraded")["status"] == "False"


def test_loading_inside_the_budget_is_not_failed_and_past_it_is(settings: OperatorSettings) -> None:
    md = ModelDeployment.model_validate(md_body(spec=HF))
    done = {"terminated": {"exitCode": 0, "reason": "Completed", "message": '{"model": "abc"}'}}
    loading = hf_pod(2000, done, {"running": {"startedAt": _ts(settings.startup_seconds - 60)}})
    st = compute_status(md, Observed(DEADLINE, [loading]), settings, NOW, {})
    assert st["phase"] == "Deploying"
    assert "1 starting (loading the model)" in _cond(st, "Ready")["message"]
    # the same pod after its budget: nothing is on its way any more, the deadline counts
    late = hf_pod(4000, done, {"running": {"startedAt": _ts(settings.startup_seconds + 60)}})
    st = compute_status(md, Observed(DEADLINE, [late]), settings, NOW, {})
    assert st["phase"] == "Failed"
    assert _cond(st, "Ready")["reason"] == "ProgressDeadlineExceeded"


def test_creating_containers_past_the_deadline_is_not_failed(settings: OperatorSettings) -> None:
    md = ModelDeployment.model_validate(md_body(spec={"capacity": 1}))
    pulling = pod(age=5000, waiting={"reason": "ContainerCreating"}, started=False)
    st = compute_status(md, Observed(DEADLINE, [pulling]), settings, NOW, {})
    assert st["phase"] == "Deploying"
    assert "1 creating containers" in _cond(st, "Ready")["message"]


MULTI_ATTACH_EVENT = {
    "type": "Warning",
    "reason": "FailedAttachVolume",
    "involvedObject": {"kind": "Pod", "name": "p2", "uid": "uid-p2"},
    "message": 'Multi-Attach error for volume "pvc-1f2e" Volume is already used by pod(s) chat-5d8-abc',
    "lastTimestamp": _ts(10),
}


def test_multi_attach_surfaces_as_the_reason(settings: OperatorSettings) -> None:
    md = ModelDeployment.model_validate(md_body(spec={"model": {"uri": "pvc://models/q"}, "capacity": 2}))
    serving = pod(ready=True, running_for=600)
    stuck = pod(age=60, waiting={"reason": "ContainerCreating"}, started=False)
    stuck["metadata"].update(name="p2", uid="uid-p2")
    other = {**MULTI_ATTACH_EVENT, "involvedObject": {"kind": "Pod", "name": "elsewhere"}}
    obs = Observed(dep(2, ready=1), [serving, stuck], pod_events=[other])
    assert _cond(compute_status(md, obs, settings, NOW, {}), "Ready")["reason"] == "InstancesNotReady"
    obs = Observed(dep(2, ready=1), [serving, stuck], pod_events=[MULTI_ATTACH_EVENT, other])
    st = compute_status(md, obs, settings, NOW, RUNNING_BEFORE)
    ready = _cond(st, "Ready")
    assert ready["reason"] == "MultiAttachError"
    assert "pod p2: Multi-Attach error for volume" in ready["message"]
    # the stuck pod is not "on its way": after the grace the phase is Degraded with the same reason
    later = compute_status(md, obs, settings, NOW + timedelta(seconds=600), st)
    assert later["phase"] == "Degraded" and _cond(later, "Degraded")["reason"] == "MultiAttachError"


def test_available_stays_true_through_a_scale_up_while_ready_does_not(settings: OperatorSettings) -> None:
    md = ModelDeployment.model_validate(md_body(spec={"capacity": 2}))
    two = [pod(ready=True, running_for=600), pod(ready=True, running_for=600)]
    before = compute_status(md, Observed(dep(2, ready=2), two), settings, NOW, {})
    assert _cond(before, "Available")["status"] == "True"
    up = ModelDeployment.model_validate(md_body(spec={"capacity": 4}, generation=2))
    new = [pod(running_for=5), pod(running_for=5)]
    during = compute_status(
        up, Observed(dep(4, ready=2), two + new), settings, NOW + timedelta(seconds=30), before
    )
    assert during["phase"] == "Updating"
    assert _cond(during, "Ready")["status"] == "False"
    available = _cond(during, "Available")
    assert available["status"] == "True" and available["reason"] == "MinimumInstancesAvailable"
    assert available["lastTransitionTime"] == _cond(before, "Available")["lastTransitionTime"]
    # minAvailable 3 of 4 with 2 serving: not available
    strict = ModelDeployment.model_validate(md_body(spec={"capacity": 4, "rollout": {"minAvailable": 3}}))
    st = compute_status(strict, Observed(dep(4, ready=2), two + new), settings, NOW, before)
    assert _cond(st, "Available")["status"] == "False"
    assert "2/4 instances ready, 3 needed" in _cond(st, "Available")["message"]
    # nothing serves: not available
    none = compute_status(md, Observed(dep(2), [pod(), pod()]), settings, NOW, {})
    assert _cond(none, "Available")["status"] == "False"


def test_conditions_are_one_per_type_and_autoscaling_follows_the_autoscaler(
    settings: OperatorSettings,
) -> None:
    auto = {"capacity": 1, "autoscaling": {"enabled": True, "minCapacity": 1, "maxCapacity": 3}}
    md = ModelDeployment.model_validate(md_body(spec=auto))
    obs = Observed(dep(1, ready=1), [pod(ready=True)])
    st = compute_status(md, obs, settings, NOW, {})
    types = [c["type"] for c in st["conditions"]]
    assert types == ["Ready", "Available", "Progressing", "Degraded", "Autoscaling"]
    assert (_cond(st, "Autoscaling")["status"], _cond(st, "Autoscaling")["reason"]) == (
        "Unknown",
        "NotSampled",
    )
    sample = {"externalAutoscaler": "HorizontalPodAutoscaler/chat-hpa", "readPods": 0, "unreadablePods": []}
    st = compute_status(md, obs, settings, NOW, {"autoscaler": sample})
    hpa = _cond(st, "Autoscaling")
    assert (hpa["status"], hpa["reason"]) == ("False", "ExternalAutoscaler")
    assert hpa["message"].startswith("HorizontalPodAutoscaler/chat-hpa targets this ModelDeployment")
    sample = {"readPods": 2, "unreadablePods": ["chat-1", "chat-2"]}
    unread = _cond(compute_status(md, obs, settings, NOW, {"autoscaler": sample}), "Autoscaling")
    assert (unread["status"], unread["reason"]) == ("True", "UnreadableInstances")
    assert "2 of 4 ready instances did not answer /metrics" in unread["message"]
    assert "chat-1, chat-2" in unread["message"]
    fine = compute_status(md, obs, settings, NOW, {"autoscaler": {"readPods": 1}})
    assert _cond(fine, "Autoscaling")["reason"] == "Active"
    # autoscaling off: no Autoscaling condition, whatever the last sample said
    off = ModelDeployment.model_validate(md_body(spec={"capacity": 1}))
    st = compute_status(off, obs, settings, NOW, {**st, "autoscaler": sample})
    assert "Autoscaling" not in [c["type"] for c in st["conditions"]]


def test_resolved_commit_is_published(settings: OperatorSettings) -> None:
    md = ModelDeployment.model_validate(md_body(spec={"model": {"uri": "hf://acme/big", "revision": "main"}}))
    done = {"terminated": {"exitCode": 0, "message": '{"model": "4f2c9e", "adapter-x": "77"}'}}
    older = hf_pod(900, {"terminated": {"exitCode": 0, "message": '{"model": "0ld"}'}}, {}, name="old")
    newer = hf_pod(100, done, {"running": {"startedAt": _ts(50)}}, name="new", ready=True)
    st = compute_status(md, Observed(dep(1, ready=1), [older, newer]), settings, NOW, {})
    assert st["modelRevision"] == "4f2c9e"
    # a failed or garbled download says nothing; the last published commit stays
    bad = hf_pod(10, {"terminated": {"exitCode": 1, "message": "HTTP 401"}}, {}, name="bad")
    assert compute_status(md, Observed(dep(1), [bad]), settings, NOW, st)["modelRevision"] == "4f2c9e"
    builtin = ModelDeployment.model_validate(md_body())
    assert compute_status(builtin, Observed(dep(1), [newer]), settings, NOW, {})["modelRevision"] is None


def test_an_invalid_edit_keeps_available_as_last_observed(settings: OperatorSettings) -> None:
    md = ModelDeployment.model_validate(md_body(spec={"capacity": 1}))
    serving = compute_status(md, Observed(dep(1, ready=1), [pod(ready=True)]), settings, NOW, {})
    failed = failed_status(md_body(), "spec.capacity: bad", NOW, serving)
    assert [c["type"] for c in failed["conditions"]] == ["Ready", "Available", "Progressing", "Degraded"]
    assert _cond(failed, "Available") == _cond(serving, "Available")
    fresh = failed_status(md_body(), "spec.capacity: bad", NOW, {})
    assert (_cond(fresh, "Available")["status"], _cond(fresh, "Available")["reason"]) == (
        "False",
        "InvalidSpec",
    )
