"""The InferencePool child: built from the spec, made only where the cluster serves the CRD, removed on
opt-out, and its gateways' status summarised in status.inferencePool."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from berth.api import ModelDeployment
from berth.controller import builders, inference_pool
from berth.controller.reconcile import reconcile
from berth.controller.settings import OperatorSettings

from .conftest import RecordingKube, md_body

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
DISCOVERY = {
    "kind": "APIResourceList",
    "groupVersion": "inference.networking.k8s.io/v1",
    "resources": [{"name": "inferencepools", "namespaced": True, "kind": "InferencePool"}],
}


def _serve_pools(k: RecordingKube) -> None:
    k.objects[("APIResourceList", "", "")] = DISCOVERY


def test_build_inference_pool(settings: OperatorSettings) -> None:
    md = ModelDeployment.model_validate(md_body())
    pool = builders.build_inference_pool(md, settings)
    assert pool is not None
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1" and pool["kind"] == "InferencePool"
    assert pool["metadata"]["ownerReferences"][0]["uid"] == "uid-chat"
    assert pool["spec"] == {
        "selector": {"matchLabels": {"berth.dev/model-deployment": "chat"}},
        "targetPorts": [{"number": 8000}],
        "endpointPickerRef": {"name": "chat-epp", "port": {"number": 9002}, "failureMode": "FailOpen"},
    }
    custom = ModelDeployment.model_validate(
        md_body(spec={"inferencePool": {"endpointPicker": "shared-epp", "failureMode": "FailClose"}})
    )
    ref = builders.build_inference_pool(custom, settings)["spec"]["endpointPickerRef"]  # type: ignore[index]
    assert ref["name"] == "shared-epp" and ref["failureMode"] == "FailClose"
    off = ModelDeployment.model_validate(md_body(spec={"inferencePool": {"enabled": False}}))
    assert builders.build_inference_pool(off, settings) is None


def test_served_follows_discovery_and_is_cached(recording: RecordingKube) -> None:
    assert inference_pool.served(recording, now=0.0) is False
    _serve_pools(recording)
    assert inference_pool.served(recording, now=1.0) is False  # cached for a minute
    assert inference_pool.served(recording, now=61.0) is True
    asked = [c for c in recording.calls if c[:2] == ("get", "APIResourceList")]
    assert len(asked) == 2


def _reconcile(k: RecordingKube, settings: OperatorSettings, spec: dict[str, Any]) -> dict[str, Any]:
    body = md_body(spec=spec)
    k.objects[("ModelDeployment", "team-a", "chat")] = body
    previous = k.objects[("ModelDeployment", "team-a", "chat")].get("status")
    if previous:
        body["status"] = previous
    reconcile(body, k, settings, NOW, api_key=lambda: "sk")
    return k.objects[("ModelDeployment", "team-a", "chat")]["status"]


def test_no_crd_no_pool(recording: RecordingKube, settings: OperatorSettings) -> None:
    status = _reconcile(recording, settings, {})
    assert not [c for c in recording.writes() if c[1] == "InferencePool"]
    assert status.get("inferencePool") is None


def test_pool_created_then_removed_on_opt_out(recording: RecordingKube, settings: OperatorSettings) -> None:
    _serve_pools(recording)
    status = _reconcile(recording, settings, {})
    assert ("create", "InferencePool", "chat") in [c[:3] for c in recording.writes()]
    assert status["inferencePool"] == {
        "name": "chat",
        "accepted": "Unknown",
        "reason": "Creating",
        "message": "the pool is being created",
    }
    status = _reconcile(recording, settings, {})
    assert status["inferencePool"]["reason"] == "NoGateway"
    recording.clear()
    status = _reconcile(recording, settings, {"inferencePool": {"enabled": False}})
    assert ("delete", "InferencePool", "chat") in [c[:3] for c in recording.writes()]
    assert status.get("inferencePool") is None
    assert ("InferencePool", "team-a", "chat") not in recording.objects


def _pool(parents: list[dict[str, Any]]) -> dict[str, Any]:
    return {"metadata": {"name": "chat"}, "status": {"parents": parents}}


def _parent(name: str, status: str, reason: str, message: str = "") -> dict[str, Any]:
    cond = {"type": "Accepted", "status": status, "reason": reason, "message": message}
    return {"parentRef": {"kind": "Gateway", "namespace": "gw", "name": name}, "conditions": [cond]}


@pytest.mark.parametrize(
    ("parents", "accepted", "reason"),
    [
        ([{"parentRef": {"kind": "Status", "name": "default"}, "conditions": []}], "Unknown", "NoGateway"),
        ([_parent("istio", "True", "Accepted")], "True", "Accepted"),
        (
            [_parent("istio", "True", "Accepted"), _parent("nginx", "False", "NotSupportedByGateway")],
            "False",
            "NotSupportedByGateway",
        ),
        ([_parent("istio", "Unknown", "Pending")], "Unknown", "Pending"),
    ],
)
def test_pool_status_from_the_gateways(parents: list[dict[str, Any]], accepted: str, reason: str) -> None:
    md = ModelDeployment.model_validate(md_body())
    out = inference_pool.pool_status(md, _pool(parents), wanted=True)
    assert out is not None and (out["accepted"], out["reason"]) == (accepted, reason)
    if accepted != "Unknown" or reason != "NoGateway":
        assert "Gateway gw/istio: Accepted=" in out["message"]
    assert inference_pool.pool_status(md, _pool(parents), wanted=False) is None
