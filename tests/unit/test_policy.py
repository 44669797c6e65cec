"""What the platform allows beyond the schema: a violation fails the ModelDeployment, nothing is created."""

from __future__ import annotations

import copy
import logging
from datetime import UTC, datetime

import kopf
import pytest

from berth.controller import handlers
from berth.controller.context import OperatorContext
from berth.controller.policy import PolicyViolation
from berth.controller.reconcile import reconcile
from berth.controller.settings import OperatorSettings

from .conftest import RecordingKube, md_body

NOW = datetime(2026, 11, 23, 10, 5, 0, tzinfo=UTC)
REMOTE = {"model": {"uri": "pvc://models/chatglm3", "trustRemoteCode": True}}


def test_remote_code_is_refused_unless_the_operator_allows_it(settings: OperatorSettings) -> None:
    client = RecordingKube()
    with pytest.raises(PolicyViolation) as exc:
        reconcile(md_body(spec=REMOTE), client, settings, NOW)
    assert exc.value.field == "spec.model.trustRemoteCode"
    assert "BERTH_ALLOW_REMOTE_CODE" in exc.value.message
    assert client.writes() == []  # no child is created or changed


def test_allowed_remote_code_reaches_the_server(settings: OperatorSettings) -> None:
    allowed = settings.model_copy(update={"allow_remote_code": True})
    client = RecordingKube()
    reconcile(md_body(spec=REMOTE), client, allowed, NOW)
    deployment = client.objects[("Deployment", "team-a", "chat")]
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--trust-remote-code" in args
    assert args[args.index("--backend") + 1] == "auto"


def test_the_handler_records_failed_policy_violation(settings: OperatorSettings) -> None:
    client = RecordingKube()
    body = md_body(spec=REMOTE)
    client.objects[("ModelDeployment", "team-a", "chat")] = copy.deepcopy(body)
    ctx = OperatorContext.create(settings, client=client)
    with pytest.raises(kopf.PermanentError, match=r"spec\.model\.trustRemoteCode"):
        handlers.run_reconcile(ctx, "team-a", "chat", "spec", logging.getLogger(), permanent_on_invalid=True)
    status = client.objects[("ModelDeployment", "team-a", "chat")]["status"]
    assert status["phase"] == "Failed"
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and ready["reason"] == "PolicyViolation"
    assert "spec.model.trustRemoteCode" in ready["message"]
    kinds = {k for k, _, _ in client.objects}
    assert kinds <= {"ModelDeployment", "Event"}
