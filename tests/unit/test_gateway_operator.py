"""The operator's side of the gateway: each instance's gateway credential (a Secret projected next to
its API keys, accepted by the server's key store), the NetworkPolicy peer that always admits the
gateway, and the requests the gateway holds counted as load by the autoscaler."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from berth.api import ModelDeployment
from berth.controller import autoscaler, builders
from berth.controller.autoscaler import Autoscaler, GatewayWaiting, parse_gateway_waiting
from berth.controller.reconcile import desired_children, reconcile
from berth.controller.settings import OperatorSettings
from berth.gateway.registry import instance_credential
from berth.server.auth import GATEWAY_KEY_ID, KeyStore

from .conftest import NoSecretReads, RecordingKube, md_body

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
MASTER = b"the-gateway-master-key"


@pytest.fixture
def gw_settings(settings: OperatorSettings, tmp_path: Path) -> OperatorSettings:
    (tmp_path / "master").write_bytes(MASTER + b"\n")
    return settings.model_copy(update={"gateway_master_key_file": str(tmp_path / "master")})


def _md(**spec: Any) -> ModelDeployment:
    return ModelDeployment.model_validate(md_body(spec=spec))


def _children(md: ModelDeployment, settings: OperatorSettings) -> dict[tuple[str, str], Any]:
    return {(k.kind, name): m for k, name, m in desired_children(md, settings, lambda: "sk-x")}


def test_server_and_builders_agree_on_the_gateway_key_id() -> None:
    assert builders.GATEWAY_KEY_ID == GATEWAY_KEY_ID


def test_gateway_key_secret_and_projected_volume(gw_settings: OperatorSettings) -> None:
    md = _md()
    children = _children(md, gw_settings)
    secret = children[("Secret", "chat-gateway-key")]
    credential = base64.b64decode(secret["data"]["berth-gateway"]).decode()
    assert credential == instance_credential(MASTER, "team-a", "chat")  # what the gateway presents
    assert secret["metadata"]["ownerReferences"][0]["uid"] == "uid-chat"
    volumes = children[("Deployment", "chat")]["spec"]["template"]["spec"]["volumes"]
    keys = next(v for v in volumes if v["name"] == "api-keys")
    assert "secret" not in keys
    assert keys["projected"]["sources"] == [
        {"secret": {"name": "chat-api-keys"}},
        {
            "secret": {
                "name": "chat-gateway-key",
                "items": [{"key": "berth-gateway", "path": "berth-gateway"}],
            }
        },
    ]
    # the other volumes are as the plain builder makes them
    plain = builders.build_deployment(md, gw_settings)["spec"]["template"]["spec"]["volumes"]
    assert [v for v in volumes if v["name"] != "api-keys"] == [v for v in plain if v["name"] != "api-keys"]
    assert next(v for v in plain if v["name"] == "api-keys")["secret"]["secretName"] == "chat-api-keys"


def test_a_referenced_key_secret_is_projected_too(gw_settings: OperatorSettings) -> None:
    md = _md(auth={"apiKeySecretRef": "team-keys"})
    children = _children(md, gw_settings)
    volumes = children[("Deployment", "chat")]["spec"]["template"]["spec"]["volumes"]
    sources = next(v for v in volumes if v["name"] == "api-keys")["projected"]["sources"]
    assert [s["secret"]["name"] for s in sources] == ["team-keys", "chat-gateway-key"]


def test_no_gateway_key_without_master_or_auth(
    settings: OperatorSettings, gw_settings: OperatorSettings
) -> None:
    assert not Path(settings.gateway_master_key_file).exists()
    plain = _children(_md(), settings)
    assert ("Secret", "chat-gateway-key") not in plain
    assert "secret" in next(
        v
        for v in plain[("Deployment", "chat")]["spec"]["template"]["spec"]["volumes"]
        if v["name"] == "api-keys"
    )
    open_md = _children(_md(auth={"mode": "none"}), gw_settings)
    assert ("Secret", "chat-gateway-key") not in open_md
    volumes = open_md[("Deployment", "chat")]["spec"]["template"]["spec"].get("volumes") or []
    assert not [v for v in volumes if v["name"] == "api-keys"]


def test_the_server_accepts_the_projected_credential(tmp_path: Path) -> None:
    """The directory the projected volume makes: the instance's key and the gateway's, side by side."""
    (tmp_path / "default").write_text("sk-berth-direct\n")
    (tmp_path / "berth-gateway").write_text(instance_credential(MASTER, "team-a", "chat"))
    store = KeyStore(key_dir=tmp_path)
    bearer = "Bearer " + instance_credential(MASTER, "team-a", "chat")
    assert store.authenticate_forwarded(bearer, "ak-ci") == "gateway/ak-ci"
    assert store.authenticate_forwarded("Bearer sk-berth-direct", "ak-ci") == "default"
    other = "Bearer " + instance_credential(MASTER, "team-a", "other")
    assert store.authenticate_forwarded(other, "ak-ci") is None


def test_reconcile_creates_the_key_secret_once(
    recording: RecordingKube, gw_settings: OperatorSettings
) -> None:
    body = md_body()
    recording.objects[("ModelDeployment", "team-a", "chat")] = body
    reconcile(body, recording, gw_settings, NOW, api_key=lambda: "sk-test")
    created = [(c[1], c[2]) for c in recording.writes() if c[0] == "create" and c[1] != "Event"]
    assert created[:3] == [
        ("Secret", "chat-api-keys"),
        ("Secret", "chat-gateway-key"),
        ("Deployment", "chat"),
    ]
    recording.clear()
    body["status"] = recording.objects[("ModelDeployment", "team-a", "chat")]["status"]
    reconcile(body, recording, gw_settings, NOW, api_key=lambda: "sk-test")
    assert [c for c in recording.writes() if c[1] in ("Secret", "Deployment")] == []


def test_network_policy_always_admits_the_gateway(settings: OperatorSettings) -> None:
    md = _md(access={"allowedNamespaces": ["apps"]})
    peers = builders.build_network_policy(md, settings)["spec"]["ingress"][0]["from"]  # type: ignore[index]
    gateway = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "berth-system"}},
        "podSelector": {"matchLabels": {"berth.dev/gateway": "true"}},
    }
    assert gateway in peers
    elsewhere = settings.model_copy(update={"gateway_namespace": "edge"})
    peers = builders.build_network_policy(md, elsewhere)["spec"]["ingress"][0]["from"]  # type: ignore[index]
    assert peers[-1]["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "edge"}}


EXPOSITION = """# HELP berth_gateway_waiting_requests Requests held
# TYPE berth_gateway_waiting_requests gauge
berth_gateway_waiting_requests{namespace="team-a",modeldeployment="chat",model="chat"} 3.0
berth_gateway_waiting_requests{namespace="team-a",modeldeployment="coder",model="coder-7b"} 0.0
berth_gateway_waiting_requests{namespace="team-b",modeldeployment="chat",model="chat"} 1.0
# HELP berth_gateway_in_flight_requests In flight
# TYPE berth_gateway_in_flight_requests gauge
berth_gateway_in_flight_requests{namespace="team-a",model="chat"} 7.0
"""


def test_parse_gateway_waiting() -> None:
    assert parse_gateway_waiting(EXPOSITION) == {("team-a", "chat"): 3.0, ("team-b", "chat"): 1.0}
    assert parse_gateway_waiting("") == {}


def _gateway_pod(name: str, ip: str, ready: bool = True) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "berth-system", "labels": {"berth.dev/gateway": "true"}},
        "status": {
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def test_gateway_waiting_sums_ready_replicas_and_caches(
    recording: RecordingKube, settings: OperatorSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    for pod in (
        _gateway_pod("gw-1", "10.0.0.1"),
        _gateway_pod("gw-2", "10.0.0.2"),
        _gateway_pod("gw-3", "10.0.0.3", False),
    ):
        recording.objects[("Pod", "berth-system", pod["metadata"]["name"])] = pod
    asked: list[tuple[str, int]] = []

    def fetch(ip: str, port: int, deadline: float, max_bytes: int) -> str:
        asked.append((ip, port))
        if ip == "10.0.0.2":
            return EXPOSITION
        return 'berth_gateway_waiting_requests{namespace="team-a",modeldeployment="chat",model="chat"} 2\n'

    monkeypatch.setattr(autoscaler, "fetch_metrics", fetch)
    now = [0.0]
    waiting = GatewayWaiting(recording, settings, max_age=5.0, clock=lambda: now[0])
    assert waiting.waiting("team-a", "chat") == 5.0
    assert waiting.waiting("team-b", "chat") == 1.0 and waiting.waiting("team-a", "coder") == 0.0
    assert sorted(asked) == [("10.0.0.1", 8080), ("10.0.0.2", 8080)]  # one read of each ready replica
    now[0] = 6.0
    waiting.waiting("team-a", "chat")
    assert len(asked) == 4


def test_held_requests_wake_and_keep_a_deployment_at_zero_ready(
    recording: RecordingKube, settings: OperatorSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Capacity 0, no pod: without the gateway's count there is no load at all."""
    spec = {"capacity": 0, "autoscaling": {"enabled": True, "minCapacity": 0, "maxCapacity": 4}}
    body = md_body(spec=spec)
    recording.objects[("ModelDeployment", "team-a", "chat")] = body

    class Held:
        def __init__(self, n: float) -> None:
            self.n = n

        def waiting(self, namespace: str, name: str) -> float:
            return self.n if (namespace, name) == ("team-a", "chat") else 0.0

    class NoPods:
        def in_flight(self, pods: list[dict[str, Any]], port: int) -> dict[str, float]:
            return {}

    scaler = Autoscaler(recording, settings, NoPods())
    scaler.gateway = Held(0)  # type: ignore[assignment]
    decision = scaler.tick(body, NOW, 0.0)
    assert decision is not None and decision.desired == 0
    scaler.gateway = Held(3)  # type: ignore[assignment]
    decision = scaler.tick(body, NOW, 100.0)
    assert decision is not None and decision.desired == 1
    assert ("patch_scale", "ModelDeployment", "chat", 1) in recording.writes()
    # capacity 1, the instance still loading (not ready), the requests still held: it stays up
    body["spec"]["capacity"] = 1
    decision = scaler.tick(body, NOW, 1000.0)
    assert decision is not None and decision.desired == 1
    # once nothing is held any more (and the scale-down delay passed) it goes back to zero
    scaler.gateway = Held(0)  # type: ignore[assignment]
    decision = scaler.tick(body, NOW, 2000.0)
    assert decision is not None and decision.desired == 0
    scaler_off = Autoscaler(recording, settings.model_copy(update={"gateway_metrics_port": 0}), NoPods())
    assert scaler_off.gateway is None and scaler_off.gateway_waiting(_md()) == 0.0


def test_gateway_key_409_is_ours_only_when_our_deployment_mounts_it(gw_settings: OperatorSettings) -> None:
    k = NoSecretReads()
    body = md_body()
    k.objects[("ModelDeployment", "team-a", "chat")] = body
    reconcile(body, k, gw_settings, NOW, api_key=lambda: "sk-test")
    assert ("Secret", "team-a", "chat-gateway-key") in k.objects
    # the next reconcile: the Secret exists (409) and the Deployment mounts it: ours, nothing else written
    k.clear()
    body["status"] = k.objects[("ModelDeployment", "team-a", "chat")]["status"]
    result = reconcile(body, k, gw_settings, NOW, api_key=lambda: "sk-test")
    writes = [c[:3] for c in k.writes() if c[1] not in ("Event",)]
    assert ("create", "Secret", "chat-gateway-key") in writes  # answered 409
    assert not [w for w in writes if w[1] == "Deployment"]
    assert "ChildConflict" not in json_of(result.status)


def test_a_foreign_gateway_key_secret_is_a_conflict_and_never_mounted(gw_settings: OperatorSettings) -> None:
    k = NoSecretReads()
    k.objects[("Secret", "team-a", "chat-gateway-key")] = {"metadata": {"name": "chat-gateway-key"}}
    body = md_body()
    k.objects[("ModelDeployment", "team-a", "chat")] = body
    result = reconcile(body, k, gw_settings, NOW, api_key=lambda: "sk-test")
    assert not [c for c in k.writes() if c[1] == "Deployment"]
    ready = next(c for c in result.status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "ChildConflict" and "Secret/chat-gateway-key" in ready["message"]


def json_of(obj: Any) -> str:
    import json

    return json.dumps(obj)
