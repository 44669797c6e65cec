"""Rotating the gateway master key: the operator rewrites each instance's gateway-key Secret with the
new credential (a JSON Patch guarded by a test of the Secret's owner), never reading a Secret and never
writing one it does not own; the Deployment records the credential's fingerprint, not its pods."""

from __future__ import annotations

import base64
import hashlib
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from berth.api import ModelDeployment
from berth.controller import builders, kube
from berth.controller.cache import Caches, operator_specs, remembered_specs
from berth.controller.cached_kube import CachedKube
from berth.controller.plan import gateway_key_rewrite
from berth.controller.reconcile import desired_children, reconcile
from berth.controller.settings import OperatorSettings
from berth.gateway.registry import instance_credential

from .conftest import NoSecretReads, RecordingKube, md_body

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
OLD, NEW = b"the-old-master-key", b"the-new-master-key"
FINGERPRINT = builders.GATEWAY_KEY_FINGERPRINT
OWNER = {
    "apiVersion": "berth.dev/v1alpha1",
    "kind": "ModelDeployment",
    "name": "chat",
    "uid": "uid-chat",
    "controller": True,
    "blockOwnerDeletion": True,
}


@pytest.fixture
def master(tmp_path: Path) -> Path:
    path = tmp_path / "master"
    path.write_bytes(OLD + b"\n")
    return path


@pytest.fixture
def gw(settings: OperatorSettings, master: Path) -> OperatorSettings:
    return settings.model_copy(update={"gateway_master_key_file": str(master)})


def _children(settings: OperatorSettings) -> dict[str, Any]:
    md = ModelDeployment.model_validate(md_body())
    children = {(kind.kind, name): m for kind, name, m in desired_children(md, settings, lambda: "sk-x")}
    return {
        "Secret": children.get(("Secret", "chat-gateway-key")),
        "Deployment": children[("Deployment", "chat")],
    }


def _b64(credential: str) -> str:
    return base64.b64encode(credential.encode()).decode()


def _reconcile(k: RecordingKube, settings: OperatorSettings) -> dict[str, Any]:
    body = k.objects[("ModelDeployment", "team-a", "chat")]
    return reconcile(body, k, settings, NOW, api_key=lambda: "sk-test").status


def _writes(k: RecordingKube) -> list[tuple[str, str]]:
    """The writes of the gateway-key Secret and of the Deployment."""
    return [
        (c[0], c[1])
        for c in k.writes()
        if (c[1], c[2]) in (("Secret", "chat-gateway-key"), ("Deployment", "chat"))
    ]


def _stored_credential(k: RecordingKube) -> str:
    data = k.objects[("Secret", "team-a", "chat-gateway-key")]["data"]["berth-gateway"]
    return base64.b64decode(data).decode()


def test_the_fingerprint_is_a_short_hash_on_the_deployment_not_its_pods(gw: OperatorSettings) -> None:
    credential = instance_credential(OLD, "team-a", "chat")
    fingerprint = builders.gateway_key_fingerprint(credential)
    assert fingerprint == hashlib.sha256(credential.encode()).hexdigest()[:16]
    assert credential not in fingerprint and len(fingerprint) == 16
    deployment = _children(gw)["Deployment"]
    assert deployment["metadata"]["annotations"][FINGERPRINT] == fingerprint
    assert FINGERPRINT not in (deployment["spec"]["template"]["metadata"].get("annotations") or {})


def test_a_changed_credential_plans_a_patch_that_tests_the_owner(gw: OperatorSettings, master: Path) -> None:
    observed = _children(gw)["Deployment"]  # records the old credential
    master.write_bytes(NEW)
    secret = _children(gw)["Secret"]
    assert gateway_key_rewrite(secret, "uid-chat", observed) == [
        {"op": "test", "path": "/metadata/ownerReferences", "value": [OWNER]},
        {
            "op": "add",
            "path": "/data",
            "value": {"berth-gateway": _b64(instance_credential(NEW, "team-a", "chat"))},
        },
    ]


def test_the_same_credential_or_no_master_plans_nothing(
    gw: OperatorSettings, settings: OperatorSettings
) -> None:
    children = _children(gw)
    assert gateway_key_rewrite(children["Secret"], "uid-chat", children["Deployment"]) is None
    assert _children(settings)["Secret"] is None  # no master key file: no Secret wanted, nothing to rewrite
    assert gateway_key_rewrite(None, "uid-chat", children["Deployment"]) is None


def test_a_deployment_that_vouches_for_nothing_plans_the_guarded_patch(gw: OperatorSettings) -> None:
    children = _children(gw)
    secret, deployment = children["Secret"], children["Deployment"]
    someone_elses = {**deployment, "metadata": {**deployment["metadata"], "ownerReferences": []}}
    unrecorded = {**deployment, "metadata": {**deployment["metadata"], "annotations": {}}}
    for observed in (None, someone_elses, unrecorded):  # a 409 with no record, an old operator's Deployment
        ops = gateway_key_rewrite(secret, "uid-chat", observed)
        assert ops is not None and ops[0] == {
            "op": "test",
            "path": "/metadata/ownerReferences",
            "value": [OWNER],
        }
    # the operator's remembered stub of the Secret vouches as the Deployment does
    stub = {"metadata": {"ownerReferences": [OWNER], "annotations": deployment["metadata"]["annotations"]}}
    assert gateway_key_rewrite(secret, "uid-chat", None, stub) is None


def test_rotating_the_master_rewrites_the_secret_then_the_record(
    gw: OperatorSettings, master: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    k = NoSecretReads()
    k.objects[("ModelDeployment", "team-a", "chat")] = md_body()
    _reconcile(k, gw)
    assert _stored_credential(k) == instance_credential(OLD, "team-a", "chat")
    template = k.objects[("Deployment", "team-a", "chat")]["spec"]["template"]
    k.clear()
    _reconcile(k, gw)
    assert _writes(k) == [("create", "Secret")]  # a 409, no patch
    master.write_bytes(NEW + b"\n")  # the kubelet updated the mounted master key
    k.clear()
    status = _reconcile(k, gw)
    new = instance_credential(NEW, "team-a", "chat")
    assert _stored_credential(k) == new
    assert _writes(k) == [("create", "Secret"), ("json_patch", "Secret"), ("patch", "Deployment")]
    patch = next(c[3] for c in k.writes() if c[0] == "patch" and c[1] == "Deployment")
    assert patch == {"metadata": {"annotations": {FINGERPRINT: builders.gateway_key_fingerprint(new)}}}
    assert k.objects[("Deployment", "team-a", "chat")]["spec"]["template"] == template  # no pod rolls
    assert "ChildConflict" not in str(status)
    assert "rewrite Secret team-a/chat-gateway-key" in caplog.text
    assert new not in caplog.text and _b64(new) not in caplog.text  # keys never in logs
    k.clear()
    _reconcile(k, gw)
    assert _writes(k) == [("create", "Secret")]  # settled


def test_a_foreign_secret_under_the_name_is_not_rewritten_and_is_a_conflict(
    gw: OperatorSettings, master: Path
) -> None:
    k = NoSecretReads()
    k.objects[("ModelDeployment", "team-a", "chat")] = md_body()
    _reconcile(k, gw)
    foreign = {"metadata": {"name": "chat-gateway-key"}, "data": {"berth-gateway": _b64("planted")}}
    k.objects[("Secret", "team-a", "chat-gateway-key")] = foreign  # ours deleted, another put in its place
    recorded = k.objects[("Deployment", "team-a", "chat")]["metadata"]["annotations"][FINGERPRINT]
    master.write_bytes(NEW)
    k.clear()
    status = _reconcile(k, gw)
    assert _stored_credential(k) == "planted"  # the test op failed: nothing written
    assert ("json_patch", "Secret") in [(c[0], c[1]) for c in k.writes()]
    assert not [c for c in k.writes() if c[1] == "Deployment"]  # the record stays with the old credential
    assert k.objects[("Deployment", "team-a", "chat")]["metadata"]["annotations"][FINGERPRINT] == recorded
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "ChildConflict" and "Secret/chat-gateway-key" in ready["message"]


def _rotate_against(
    k: RecordingKube, gw: OperatorSettings, master: Path, secret: dict[str, Any]
) -> dict[str, Any]:
    """Reconcile, replace the gateway-key Secret with `secret`, rotate the master key, reconcile again."""
    k.objects[("ModelDeployment", "team-a", "chat")] = md_body()
    _reconcile(k, gw)
    k.objects[("Secret", "team-a", "chat-gateway-key")] = secret
    master.write_bytes(NEW)
    k.clear()
    return _reconcile(k, gw)


def test_a_foreign_secret_that_names_the_owner_uid_in_another_reference_is_not_rewritten(
    gw: OperatorSettings, master: Path
) -> None:
    """A tenant's Secret whose first reference carries this ModelDeployment's uid (a ConfigMap's, not a
    controller) does not pass the owner test: the whole list is compared."""
    planted = {
        "metadata": {
            "name": "chat-gateway-key",
            "ownerReferences": [
                {"apiVersion": "v1", "kind": "ConfigMap", "name": "x", "uid": "uid-chat", "controller": False}
            ],
        },
        "data": {"berth-gateway": _b64("planted")},
    }
    status = _rotate_against(NoSecretReads(), gw, master, planted)
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "ChildConflict" and "Secret/chat-gateway-key" in ready["message"]


def test_our_secret_without_its_data_key_is_rewritten(gw: OperatorSettings, master: Path) -> None:
    k = NoSecretReads()
    emptied = {"metadata": {"name": "chat-gateway-key", "ownerReferences": [OWNER]}}  # someone removed /data
    status = _rotate_against(k, gw, master, emptied)
    assert _stored_credential(k) == instance_credential(NEW, "team-a", "chat")
    assert "ChildConflict" not in str(status)


class PatchRefused(NoSecretReads):
    """An API server that refuses the Secret's JSON Patch: RBAC without `patch` (an older chart), or an
    admission webhook."""

    def __init__(self, error: kube.ApiError) -> None:
        super().__init__()
        self.error = error

    def json_patch(
        self, kind: kube.Kind, namespace: str, name: str, ops: list[dict[str, Any]]
    ) -> dict[str, Any]:
        self.calls.append(("json_patch", kind.kind, name, ops))
        raise self.error


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(kube.Forbidden(403, "Forbidden", 'secrets "chat-gateway-key" is forbidden'), id="rbac"),
        pytest.param(kube.Rejected(422, "Invalid", "admission webhook denied the request"), id="webhook"),
    ],
)
def test_a_refused_rewrite_warns_and_keeps_the_record_and_the_instance(
    gw: OperatorSettings, master: Path, error: kube.ApiError
) -> None:
    k = PatchRefused(error)
    k.objects[("ModelDeployment", "team-a", "chat")] = md_body()
    _reconcile(k, gw)
    recorded = k.objects[("Deployment", "team-a", "chat")]["metadata"]["annotations"][FINGERPRINT]
    master.write_bytes(NEW)
    body = k.objects[("ModelDeployment", "team-a", "chat")]
    body["spec"]["capacity"] = 2  # the reconcile goes on with everything else
    k.clear()
    result = reconcile(body, k, gw, NOW, api_key=lambda: "sk-test")
    deployment = k.objects[("Deployment", "team-a", "chat")]
    assert deployment["spec"]["replicas"] == 2
    assert deployment["metadata"]["annotations"][FINGERPRINT] == recorded  # the record does not claim it
    assert _stored_credential(k) == instance_credential(OLD, "team-a", "chat")
    warning = next(e for e in result.events if e.reason == "GatewayKeyNotWritten")
    assert warning.type == "Warning" and error.message in warning.message
    assert "ChildConflict" not in str(result.status)


def test_a_held_back_deployment_does_not_make_a_secret_patch_every_resync(
    gw: OperatorSettings, master: Path
) -> None:
    """Someone else's Deployment under the name: the record on ours never advances, so the operator's
    cache remembers the credential it wrote and the next reconciles write nothing."""
    k = NoSecretReads()
    k.objects[("Deployment", "team-a", "chat")] = {"metadata": {"name": "chat", "namespace": "team-a"}}
    client = CachedKube(k, Caches(operator_specs(), remembered_specs()))
    k.objects[("ModelDeployment", "team-a", "chat")] = md_body()
    reconcile(k.objects[("ModelDeployment", "team-a", "chat")], client, gw, NOW, api_key=lambda: "sk-test")
    master.write_bytes(NEW)
    patches = []
    for _ in range(3):
        k.clear()
        body = k.objects[("ModelDeployment", "team-a", "chat")]
        reconcile(body, client, gw, NOW, api_key=lambda: "sk-test")
        patches.append([c[0] for c in k.writes() if c[1] == "Secret"])
    assert _stored_credential(k) == instance_credential(NEW, "team-a", "chat")
    assert patches[0][-1] == "json_patch"
    assert patches[1:] == [[], []]
