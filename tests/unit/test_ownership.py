"""Ownership: a child that exists without this ModelDeployment's controller reference is never patched,
adopted or deleted; the conflict is reported (Ready False, ChildConflict, an Event) and clears by itself."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from berth.controller import kube
from berth.controller.plan import Action, conflicts, owned_by, plan
from berth.controller.reconcile import reconcile
from berth.controller.settings import OperatorSettings

from .conftest import RecordingKube, md_body

NOW = datetime(2026, 11, 23, 10, 5, 0, tzinfo=UTC)
FOREIGN_SERVICE: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {"name": "chat", "namespace": "team-a", "uid": "svc-1", "labels": {"app": "billing"}},
    "spec": {"ports": [{"port": 443, "targetPort": 8443}], "selector": {"app": "billing"}},
}


def _ready(status: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == "Ready")


def _store(client: RecordingKube, kind: str, obj: dict[str, Any]) -> None:
    client.objects[(kind, obj["metadata"]["namespace"], obj["metadata"]["name"])] = copy.deepcopy(obj)


def _child_writes(client: RecordingKube) -> list[tuple[str, str, str]]:
    return [(c[0], c[1], c[2]) for c in client.writes() if c[1] not in ("Event", "ModelDeployment")]


def _ref(uid: str, controller: bool = True) -> dict[str, Any]:
    return {
        "apiVersion": "berth.dev/v1alpha1",
        "kind": "ModelDeployment",
        "name": "chat",
        "uid": uid,
        "controller": controller,
    }


def test_owned_by_needs_the_controller_reference_of_this_uid() -> None:
    obj: dict[str, Any] = {"metadata": {"ownerReferences": [_ref("uid-chat")]}}
    assert owned_by(obj, "uid-chat") and owned_by(obj, None)
    assert not owned_by(obj, "uid-other")  # an earlier ModelDeployment of the same name
    assert not owned_by({"metadata": {"ownerReferences": [_ref("uid-chat", controller=False)]}}, "uid-chat")
    assert not owned_by({"metadata": {}}, "uid-chat")


def test_plan_never_patches_or_deletes_what_it_does_not_own() -> None:
    foreign = copy.deepcopy(FOREIGN_SERVICE)
    mine = {"metadata": {"ownerReferences": [_ref("u1")]}, "spec": {"podSelector": {}}}
    desired = [
        (kube.SERVICE, "chat", {"spec": {"ports": [{"port": 80}]}}),
        (kube.NETWORK_POLICY, "chat", None),  # not wanted, but someone else's: not deleted
        (kube.PDB, "chat", None),  # not wanted and ours: deleted
    ]
    observed = {
        ("Service", "chat"): foreign,
        ("NetworkPolicy", "chat"): foreign,
        ("PodDisruptionBudget", "chat"): mine,
    }
    assert plan(desired, observed, owner_uid="u1") == [Action("delete", kube.PDB, "chat")]
    assert conflicts(desired, observed, "u1") == [
        "Service/chat"
    ]  # a foreign object not wanted is no conflict


@pytest.mark.parametrize(
    ("kind", "name", "extra"),
    [
        ("Service", "chat", {}),
        ("NetworkPolicy", "chat", {"access": {"allowedNamespaces": ["apps"]}}),
        ("PodDisruptionBudget", "chat", {"capacity": 2}),
        ("Deployment", "chat", {}),
        ("Secret", "chat-api-keys", {}),
    ],
)
def test_a_foreign_child_is_left_unchanged_and_reported(
    recording: RecordingKube, settings: OperatorSettings, kind: str, name: str, extra: dict[str, Any]
) -> None:
    foreign = {
        "metadata": {"name": name, "namespace": "team-a", "uid": "x-1", "labels": {"team": "b"}},
        "spec": {"foreign": True},
        "data": {"keys": "c2VjcmV0"},
    }
    _store(recording, kind, foreign)
    body = md_body(spec=extra)
    _store(recording, "ModelDeployment", body)
    result = reconcile(body, recording, settings, NOW, api_key=lambda: "sk-test")

    assert recording.objects[(kind, "team-a", name)] == foreign  # not patched, not adopted
    assert not any(c[1] == kind and c[2] == name for c in _child_writes(recording))
    ready = _ready(result.status)
    assert ready["status"] == "False" and ready["reason"] == "ChildConflict"
    assert f"{kind}/{name} exists and is not controlled by this ModelDeployment" in ready["message"]
    assert result.status["phase"] == "Failed"
    warnings = [e for e in result.events if e.type == "Warning"]
    assert warnings[0].reason == "ChildConflict" and f"{kind}/{name}" in warnings[0].message
    if kind == "Secret":  # instances must not mount someone else's Secret as their keys
        assert ("Deployment", "team-a", "chat") not in recording.objects


def test_the_conflict_event_is_recorded_once_and_the_conflict_clears_by_itself(
    recording: RecordingKube, settings: OperatorSettings
) -> None:
    _store(recording, "Service", FOREIGN_SERVICE)
    body = md_body()
    _store(recording, "ModelDeployment", body)
    reconcile(body, recording, settings, NOW)
    current = copy.deepcopy(recording.objects[("ModelDeployment", "team-a", "chat")])
    again = reconcile(current, recording, settings, NOW + timedelta(seconds=30))
    assert not any(e.reason == "ChildConflict" for e in again.events)  # unchanged: no second Event
    assert recording.objects[("Service", "team-a", "chat")] == FOREIGN_SERVICE

    del recording.objects[("Service", "team-a", "chat")]  # its owner removes it
    recording.clear()
    current = copy.deepcopy(recording.objects[("ModelDeployment", "team-a", "chat")])
    healed = reconcile(current, recording, settings, NOW + timedelta(seconds=60))
    assert ("create", "Service", "chat") in _child_writes(recording)
    service = recording.objects[("Service", "team-a", "chat")]
    assert owned_by(service, "uid-chat")
    assert _ready(healed.status)["reason"] != "ChildConflict"
    assert healed.status["phase"] != "Failed"


def test_a_child_of_an_earlier_model_deployment_of_the_same_name_is_a_conflict(
    recording: RecordingKube, settings: OperatorSettings
) -> None:
    old = copy.deepcopy(FOREIGN_SERVICE)
    old["metadata"]["ownerReferences"] = [_ref("uid-deleted-one")]
    _store(recording, "Service", old)
    body = md_body()
    _store(recording, "ModelDeployment", body)
    result = reconcile(body, recording, settings, NOW)
    assert recording.objects[("Service", "team-a", "chat")] == old
    assert _ready(result.status)["reason"] == "ChildConflict"


def test_a_referenced_api_key_secret_is_only_read(
    recording: RecordingKube, settings: OperatorSettings
) -> None:
    theirs = {"metadata": {"name": "team-keys", "namespace": "team-a", "uid": "s-1"}, "data": {"k": "dg=="}}
    _store(recording, "Secret", theirs)
    body = md_body(spec={"auth": {"apiKeySecretRef": "team-keys"}})
    _store(recording, "ModelDeployment", body)
    result = reconcile(body, recording, settings, NOW)
    assert not any(c[1] == "Secret" for c in _child_writes(recording))
    assert recording.objects[("Secret", "team-a", "team-keys")] == theirs
    assert _ready(result.status)["reason"] != "ChildConflict"
    assert ("Deployment", "team-a", "chat") in recording.objects
