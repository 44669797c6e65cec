"""examples/private-access.yaml on the real node: its NetworkPolicy, enforced by kube-router, lets the
allowed namespace (team-a-apps) and the chart's gateway in and turns any other namespace away before
HTTP (kube-router rejects: connection refused); that namespace gets through the gateway with a team
key; without spec.access the same client gets through directly."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import pytest

from . import clients
from .conftest import ROOT, kjson, wait_for
from .test_e2e import wait_phase

EXAMPLE = ROOT / "examples" / "private-access.yaml"
MD = "team-a-chat"


@pytest.fixture(scope="module")
def team_a(node_cluster: Any) -> Iterator[dict[str, Any]]:
    ns = "team-a"
    node_cluster.kubectl("create", "namespace", ns, check=True)
    wait_for(
        lambda: node_cluster.kubectl("get", "serviceaccount", "default", "-n", ns).returncode == 0,
        30,
        "default ServiceAccount",
    )
    node_cluster.kubectl("apply", "-n", ns, "-f", str(EXAMPLE), check=True)
    status = wait_phase(node_cluster, ns, "Running", 420, name=MD)
    secret = kjson(node_cluster, "get", "secret", "team-a-api-keys", "-n", ns)
    yield {"ns": ns, "status": status, "key": base64.b64decode(secret["data"]["ci"]).decode()}
    node_cluster.kubectl("delete", "namespace", ns, "--wait=true", "--timeout=180s")


def test_network_policy_admits_the_allowed_namespace_only(
    node_cluster: Any, team_a: dict[str, Any], images: dict[str, str], make_namespace: Any
) -> None:
    policies = kjson(node_cluster, "get", "networkpolicy", "-n", team_a["ns"])["items"]
    assert [p["metadata"]["name"] for p in policies] == [MD], policies
    allowed = make_namespace("team-a-apps")
    other = make_namespace(None)
    args = (
        images["operator"],
        team_a["status"]["endpoint"],
        team_a["status"]["servedModelName"],
        team_a["key"],
    )

    ok = clients.call(node_cluster, allowed, *args)
    assert ok.get("status") == 200, ok
    assert "Paris" in ok["body"]["choices"][0]["message"]["content"], ok

    # kube-router REJECTs what no policy admits (ICMP port unreachable: "connection refused"); an
    # enforcer that drops instead gives a connection timeout. Either way no HTTP exchange happens.
    blocked = clients.call(node_cluster, other, *args, connect_timeout=8)
    refused = blocked.get("error") == "ConnectError" and "refused" in blocked.get("detail", "").lower()
    assert blocked.get("error") == "ConnectTimeout" or refused, blocked  # not a DNS or HTTP error
    assert "status" not in blocked, blocked

    # The gateway is always admitted: the same turned-away namespace gets its answer through it,
    # with a team key (the gateway's pods reach the instance past its NetworkPolicy).
    key = clients.apikey(node_cluster, team_a["ns"], "team-a-gateway", [MD])
    model = f"{team_a['ns']}/{team_a['status']['servedModelName']}"
    via = clients.call(node_cluster, other, images["operator"], clients.GATEWAY, model, key)
    assert via.get("status") == 200, via
    assert "Paris" in via["body"]["choices"][0]["message"]["content"], via

    # The control: without spec.access the operator removes the NetworkPolicy, and the same client
    # from the same namespace gets its answer.
    node_cluster.kubectl(
        "patch",
        "md",
        MD,
        "-n",
        team_a["ns"],
        "--type=json",
        "-p",
        '[{"op": "remove", "path": "/spec/access"}]',
        check=True,
    )
    wait_for(
        lambda: not kjson(node_cluster, "get", "networkpolicy", "-n", team_a["ns"])["items"],
        60,
        "the NetworkPolicy to go",
    )
    opened = clients.call(node_cluster, other, *args, connect_timeout=8)
    assert opened.get("status") == 200, opened
