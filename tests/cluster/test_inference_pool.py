"""The operator's gateway-facing children against the real API server, with the chart's RBAC: an
InferencePool per ModelDeployment once the InferencePool CRD is installed (a minimal copy of the
upstream CRD, tests/cluster/fixtures), its gateways' status surfaced in status.inferencePool, the
opt-out; and each instance's gateway credential Secret, projected next to its keys, and the
NetworkPolicy peer that admits the gateway's pods."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from berth.gateway.registry import instance_credential

from .conftest import wait_for
from .operator_proc import OperatorProcess
from .test_operator import apply, get, md

FIXTURE = Path(__file__).parent / "fixtures" / "inferencepools.inference.networking.k8s.io.yaml"
CRD = "crd/inferencepools.inference.networking.k8s.io"
MASTER = b"cluster-test-gateway-master"


@pytest.fixture(scope="module")
def pool_crd(cluster: Any) -> Iterator[None]:
    """Installed before the operator starts (its discovery is cached a minute), removed after, so
    the other modules' operators make no pools."""
    cluster.kubectl("apply", "--server-side", "-f", str(FIXTURE), check=True)
    cluster.kubectl("wait", "--for=condition=Established", CRD, "--timeout=60s", check=True)
    try:
        yield
    finally:
        cluster.kubectl("delete", CRD, "--ignore-not-found", "--wait=false")


@pytest.fixture(scope="module")
def operator(
    cluster: Any, pool_crd: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    work = tmp_path_factory.mktemp("operator-pools")
    (work / "master").write_bytes(MASTER + b"\n")
    env = {"BERTH_GATEWAY_MASTER_KEY_FILE": str(work / "master")}
    with OperatorProcess.running(cluster, work, env) as op:
        yield op


def _pool_status_when(cluster: Any, ns: str, name: str, field: str, value: str) -> dict[str, Any]:
    """status.inferencePool of ``name`` once its ``field`` reads ``value`` (within 30 s)."""
    found: dict[str, Any] = wait_for(
        lambda: (s := _status(cluster, ns, name).get("inferencePool")) and s.get(field) == value and s,
        timeout=30,
        message=f"status.inferencePool {field}={value}",
    )
    return found


def _status(cluster: Any, ns: str, name: str) -> dict[str, Any]:
    return (get(cluster, ns, "md", name) or {}).get("status") or {}


def test_inference_pool_is_made_surfaced_and_opted_out(
    cluster: Any, operator: OperatorProcess, namespace: str
) -> None:
    apply(cluster, namespace, md("chat", model={"uri": "builtin://smollm2-135m-instruct"}, capacity=1))
    pool = wait_for(
        lambda: get(cluster, namespace, "inferencepools.inference.networking.k8s.io", "chat"),
        timeout=60,
        message="the InferencePool",
    )
    assert pool["spec"]["selector"]["matchLabels"] == {"berth.dev/model-deployment": "chat"}
    assert pool["spec"]["targetPorts"] == [{"number": 8000}]
    ref = pool["spec"]["endpointPickerRef"]
    assert (ref["name"], ref["port"], ref["failureMode"], ref["kind"]) == (
        "chat-epp",
        {"number": 9002},
        "FailOpen",
        "Service",  # the CRD's default, which the operator leaves alone
    )
    owner = pool["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["controller"]) == ("ModelDeployment", "chat", True)
    status = _pool_status_when(cluster, namespace, "chat", "reason", "NoGateway")
    assert status["accepted"] == "Unknown" and status["name"] == "chat"

    # a gateway accepts the pool (what Istio or NGINX Gateway Fabric writes): the ModelDeployment says so
    parents = {
        "parents": [
            {
                "parentRef": {"kind": "Gateway", "namespace": "gw", "name": "inference"},
                "conditions": [
                    {
                        "type": "Accepted",
                        "status": "True",
                        "reason": "Accepted",
                        "message": "",
                        "lastTransitionTime": "2026-12-02T12:00:00Z",
                    }
                ],
            }
        ]
    }
    r = cluster.kubectl(
        "patch",
        "inferencepools.inference.networking.k8s.io",
        "chat",
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": parents}),
    )
    assert r.returncode == 0, r.stderr
    status = _pool_status_when(cluster, namespace, "chat", "accepted", "True")
    assert status["message"] == "Gateway gw/inference: Accepted=True"

    # opt out: the pool goes, and the status with it
    r = cluster.kubectl(
        "patch",
        "md",
        "chat",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec":{"inferencePool":{"enabled":false}}}',
    )
    assert r.returncode == 0, r.stderr
    wait_for(
        lambda: get(cluster, namespace, "inferencepools.inference.networking.k8s.io", "chat") is None,
        timeout=30,
        message="the InferencePool deleted",
    )
    wait_for(
        lambda: "inferencePool" not in _status(cluster, namespace, "chat"),
        timeout=30,
        message="status.inferencePool removed",
    )


def test_gateway_credential_secret_volume_and_network_policy(
    cluster: Any, operator: OperatorProcess, namespace: str
) -> None:
    spec = {"model": {"uri": "builtin://smollm2-135m-instruct"}, "access": {"allowedNamespaces": ["apps"]}}
    apply(cluster, namespace, md("chat", **spec))
    secret = wait_for(
        lambda: get(cluster, namespace, "secret", "chat-gateway-key"),
        timeout=60,
        message="the gateway key Secret",
    )
    credential = base64.b64decode(secret["data"]["berth-gateway"]).decode()
    assert credential == instance_credential(MASTER, namespace, "chat")  # what the gateway presents
    deployment = wait_for(
        lambda: get(cluster, namespace, "deployment", "chat"), timeout=30, message="Deployment"
    )
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "api-keys")
    assert [s["secret"]["name"] for s in volume["projected"]["sources"]] == [
        "chat-api-keys",
        "chat-gateway-key",
    ]
    policy = wait_for(
        lambda: get(cluster, namespace, "networkpolicy", "chat"), timeout=30, message="NetworkPolicy"
    )
    assert {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "berth-system"}},
        "podSelector": {"matchLabels": {"berth.dev/gateway": "true"}},
    } in policy["spec"]["ingress"][0]["from"]
