"""The reconcile reads pod Events only while a pod stays ContainerCreating, and a Multi-Attach one
becomes the reason (issue 14)."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

from berth.controller.reconcile import reconcile
from berth.controller.settings import OperatorSettings

from .conftest import RecordingKube, md_body

NOW = datetime(2026, 11, 23, 10, 5, 0, tzinfo=UTC)


def _pod(waiting: str | None) -> dict[str, Any]:
    state = (
        {"waiting": {"reason": waiting}} if waiting else {"running": {"startedAt": "2026-11-23T10:01:00Z"}}
    )
    return {
        "metadata": {
            "name": "chat-5d8-x",
            "uid": "pod-uid",
            "labels": {"berth.dev/model-deployment": "chat"},
            "creationTimestamp": "2026-11-23T10:00:00Z",
        },
        "spec": {"nodeName": "n1"},
        "status": {
            "phase": "Pending" if waiting else "Running",
            "conditions": [{"type": "Ready", "status": "False"}],
            "containerStatuses": [{"name": "server", "restartCount": 0, "started": False, "state": state}],
        },
    }


EVENT = {
    "metadata": {"name": "chat-5d8-x.1"},
    "type": "Warning",
    "reason": "FailedAttachVolume",
    "involvedObject": {"kind": "Pod", "name": "chat-5d8-x", "uid": "pod-uid"},
    "message": 'Multi-Attach error for volume "pvc-9" Volume is already used by pod(s) chat-5d8-y',
    "lastTimestamp": "2026-11-23T10:04:00Z",
}


def _reconciled(recording: RecordingKube, settings: OperatorSettings, pod: dict[str, Any]) -> dict[str, Any]:
    body = md_body(spec={"model": {"uri": "pvc://models/q"}})
    recording.objects[("ModelDeployment", "team-a", "chat")] = copy.deepcopy(body)
    reconcile(body, recording, settings, NOW, api_key=lambda: "sk-test")  # creates the Deployment
    recording.objects[("Pod", "team-a", "chat-5d8-x")] = pod
    recording.objects[("Event", "team-a", "chat-5d8-x.1")] = copy.deepcopy(EVENT)
    recording.clear()
    current = recording.objects[("ModelDeployment", "team-a", "chat")]
    return reconcile(copy.deepcopy(current), recording, settings, NOW, api_key=lambda: "sk-test").status


def test_a_multi_attach_event_is_the_reason(recording: RecordingKube, settings: OperatorSettings) -> None:
    status = _reconciled(recording, settings, _pod("ContainerCreating"))
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "MultiAttachError"
    assert 'pod chat-5d8-x: Multi-Attach error for volume "pvc-9"' in ready["message"]
    assert ("list", "Event", "", None) in recording.calls


def test_events_are_not_read_while_no_pod_is_creating(
    recording: RecordingKube, settings: OperatorSettings
) -> None:
    status = _reconciled(recording, settings, _pod(None))
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "InstancesNotReady"
    assert not [c for c in recording.calls if c[0] == "list" and c[1] == "Event"]
