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
from berth.controller import builders
from berth.controller.plan import gateway_key_rewrite
from berth.controller.reconcile import desired_children, reconcile
from berth.controller.settings import OperatorSettings
from berth.gateway.registry import instance_credential

from .conftest import RecordingKube, md_body

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
OLD, NEW = b"the-old-master-key", b"the-new-master-key"
FINGERPRINT = builders.GATEWAY_KEY_FINGERPRINT


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


class NoSecretReads(RecordingKube):
    """The operator's view of Secrets with RBAC create and patch only: a read never finds one."""

    def get(self, kind: Any, namespace: str, name: str) -> dict[str, Any] | None:
        if kind.kind == "Secret":
            self.calls.append(("get", "Secret", name, None))
            return None
        return super().get(kind, namespace, name)


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
    assert gateway_key_rewrite(secret, observed, "uid-chat") == [
        {"op": "test", "path": "/metadata/ownerReferences/0/uid", "value": "uid-chat"},
        {
            "op": "replace",
            "path": "/data/berth-gateway",
            "value": _b64(instance_credential(NEW, "team-a", "chat")),
        },
    ]


def test_the_same_credential_or_no_master_plans_nothing(
    gw: OperatorSettings, settings: OperatorSettings
) -> None:
    children = _children(gw)
    assert gateway_key_rewrite(children["Secret"], children["Deployment"], "uid-chat") is None
    assert _children(settings)["Secret"] is None  # no master key file: no Secret wanted, nothing to rewrite
    assert gateway_key_rewrite(None, children["Deployment"], "uid-chat") is None


def test_a_deployment_that_vouches_for_nothing_plans_the_guarded_patch(gw: OperatorSettings) -> None:
    children = _children(gw)
    secret, deployment = children["Secret"], children["Deployment"]
    someone_elses = {**deployment, "metadata": {**deployment["metadata"], "ownerReferences": []}}
    unrecorded = {**deployment, "metadata": {**deployment["metadata"], "annotations": {}}}
    for observed in (None, someone_elses, unrecorded):  # a 409 with no record, an old operator's Deployment
        ops = gateway_key_rewrite(secret, observed, "uid-chat")
        assert ops is not None and ops[0] == {
            "op": "test",
            "path": "/metadata/ownerReferences/0/uid",
            "value": "uid-chat",
        }


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
