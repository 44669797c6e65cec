"""The built-in autoscaler against the real API server and kube-controller-manager's HPA controller:
unreadable instances are named in the Autoscaling condition, and an autoscaling/v2 HPA that targets the
ModelDeployment is reported (condition and Event naming it) while the built-in autoscaler stands aside.

The instances' /metrics are tiny HTTP servers on the kwok pods' loopback IPs (no model needed): they
answer "idle", so the built-in autoscaler would scale down whenever it is not standing aside.
"""

from __future__ import annotations

import http.server
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.metrics_stubs import Drip, Huge, Metrics, serve

from .operator_proc import OperatorProcess, _free_port
from .test_operator import apply, condition, get, md, wait_md


class IdleMetrics:
    """A /metrics (idle by default) on each given pod IP and the server port."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.servers: dict[str, http.server.HTTPServer] = {}

    def serve(self, ip: str, handler: type[http.server.BaseHTTPRequestHandler] = Metrics) -> None:
        assert ip.startswith("127."), f"pod IP {ip} is not on loopback"
        self.servers[ip] = serve(handler, ip, self.port)

    def stop(self) -> None:
        for s in self.servers.values():
            s.shutdown()
            s.server_close()


@pytest.fixture(scope="module")
def server_port() -> int:
    return _free_port()


@pytest.fixture(scope="module")
def operator(
    cluster: Any, tmp_path_factory: pytest.TempPathFactory, server_port: int
) -> Iterator[OperatorProcess]:
    env = {"BERTH_SERVER_PORT": str(server_port), "BERTH_METRICS_SCRAPE_TIMEOUT_SECONDS": "0.5"}
    with OperatorProcess.running(cluster, tmp_path_factory.mktemp("operator-hpa"), env) as op:
        yield op


@pytest.fixture
def idle(server_port: int) -> Iterator[IdleMetrics]:
    servers = IdleMetrics(server_port)
    try:
        yield servers
    finally:
        servers.stop()


def _pods(cluster: Any, ns: str, name: str) -> list[dict[str, Any]]:
    out = cluster.kubectl(
        "get", "pods", "-n", ns, "-l", f"berth.dev/model-deployment={name}", "-o", "json", check=True
    ).stdout
    return sorted(
        (p for p in json.loads(out)["items"] if not p["metadata"].get("deletionTimestamp")),
        key=lambda p: p["metadata"]["name"],
    )


def _events(cluster: Any, ns: str, name: str, reason: str) -> list[dict[str, Any]]:
    out = cluster.kubectl(
        "get", "events", "-n", ns, "--field-selector", f"involvedObject.name={name}", "-o", "json", check=True
    ).stdout
    return [e for e in json.loads(out)["items"] if e["reason"] == reason]


def test_unreadable_instances_are_named_in_the_autoscaling_condition(
    cluster: Any, operator: OperatorProcess, namespace: str, idle: IdleMetrics
) -> None:
    autoscaling = {"enabled": True, "minCapacity": 2, "maxCapacity": 3, "scaleDownDelaySeconds": 2}
    apply(cluster, namespace, md("lumpy", capacity=2, auth={"mode": "none"}, autoscaling=autoscaling))
    wait_md(cluster, operator, namespace, "lumpy", lambda s: s.get("readyCapacity") == 2, "2 ready")
    pods = _pods(cluster, namespace, "lumpy")
    names = [p["metadata"]["name"] for p in pods]

    def unreadable(want: list[str]) -> Any:
        def check(s: dict[str, Any]) -> bool:
            # status.autoscaler is the autoscaler's; the condition follows at the next reconcile
            c = condition(s, "Autoscaling")
            named = [n for n in names if n in c.get("message", "")]
            return (
                (s.get("autoscaler") or {}).get("unreadablePods", []) == want
                and c.get("reason") == ("UnreadableInstances" if want else "Active")
                and named == want
            )

        return check

    # no pod answers: both are named, and counted in the metric
    got = wait_md(cluster, operator, namespace, "lumpy", unreadable(names), "both pods unreadable")
    c = condition(got["status"], "Autoscaling")
    assert c["status"] == "True" and "2 of 2 ready instances did not answer /metrics" in c["message"]
    assert all(n in c["message"] for n in names)
    assert operator.metrics()[f"berth_operator_unreadable_pods{{name=lumpy,namespace={namespace}}}"] == 2.0
    # one answers: only the other is named
    idle.serve(pods[0]["status"]["podIP"])
    got = wait_md(cluster, operator, namespace, "lumpy", unreadable(names[1:]), "one pod unreadable")
    assert "1 of 2 ready instances" in condition(got["status"], "Autoscaling")["message"]
    idle.serve(pods[1]["status"]["podIP"])
    got = wait_md(cluster, operator, namespace, "lumpy", unreadable([]), "every pod read")
    assert got["status"]["autoscaler"]["readPods"] == 2


def _namespaced_hpa_lists(cluster: Any) -> float:
    """LISTs of HorizontalPodAutoscalers in one namespace the API server has answered (its metrics)."""
    text = cluster.kubectl("get", "--raw", "/metrics", check=True).stdout
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("apiserver_request_total{")
        and all(
            label in line
            for label in ('resource="horizontalpodautoscalers"', 'verb="LIST"', 'scope="namespace"')
        )
    )


def _failures(op: OperatorProcess, reason: str) -> float:
    return op.metrics().get(f"berth_operator_metrics_scrape_failures_total{{reason={reason}}}", 0.0)


def test_a_dripping_pod_and_a_10_mb_pod_do_not_slow_the_autoscaler(
    cluster: Any, operator: OperatorProcess, namespace: str, idle: IdleMetrics
) -> None:
    """One instance drips its /metrics a byte at a time, another sends 10 MB: each is cut off (deadline,
    size cap) on every tick, so the loop keeps its 2 s interval, and both are named as unreadable."""
    autoscaling = {"enabled": True, "minCapacity": 2, "maxCapacity": 3, "scaleDownDelaySeconds": 2}
    apply(cluster, namespace, md("noisy", capacity=2, auth={"mode": "none"}, autoscaling=autoscaling))
    wait_md(cluster, operator, namespace, "noisy", lambda s: s.get("readyCapacity") == 2, "2 ready")
    drip, huge = _pods(cluster, namespace, "noisy")
    idle.serve(drip["status"]["podIP"], Drip)
    idle.serve(huge["status"]["podIP"], Huge)
    both = sorted([drip["metadata"]["name"], huge["metadata"]["name"]])
    wait_md(
        cluster,
        operator,
        namespace,
        "noisy",
        lambda s: (
            (s.get("autoscaler") or {}).get("unreadablePods") == both
            and condition(s, "Autoscaling").get("reason") == "UnreadableInstances"
        ),
        "both pods named unreadable",
    )
    before = (_failures(operator, "deadline"), _failures(operator, "too_large"))
    time.sleep(14)  # about five passes of the loop (2 s apart, plus the 0.5 s scrape deadline)
    after = (_failures(operator, "deadline"), _failures(operator, "too_large"))
    # a loop held by the drip would count none in this window; one read per pass counts about five
    assert after[0] - before[0] >= 3, (before, after)
    assert after[1] - before[1] >= 3, (before, after)


def test_an_hpa_on_the_model_deployment_is_reported_and_the_autoscaler_stands_aside(
    cluster: Any, operator: OperatorProcess, namespace: str, idle: IdleMetrics
) -> None:
    # the HPA first, so that the built-in autoscaler never gets a tick without it
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "team-hpa"},
        "spec": {
            "scaleTargetRef": {
                "apiVersion": "berth.dev/v1alpha1",
                "kind": "ModelDeployment",
                "name": "shared",
            },
            "minReplicas": 3,
            "maxReplicas": 3,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 80}},
                }
            ],
        },
    }
    apply(cluster, namespace, hpa)
    autoscaling = {"enabled": True, "minCapacity": 1, "maxCapacity": 3, "scaleDownDelaySeconds": 2}
    apply(cluster, namespace, md("shared", capacity=3, auth={"mode": "none"}, autoscaling=autoscaling))
    got = wait_md(
        cluster,
        operator,
        namespace,
        "shared",
        lambda s: (
            condition(s, "Autoscaling").get("reason") == "ExternalAutoscaler" and s.get("readyCapacity") == 3
        ),
        "Autoscaling False/ExternalAutoscaler with 3 ready",
    )
    c = condition(got["status"], "Autoscaling")
    assert c["status"] == "False"
    assert c["message"].startswith("HorizontalPodAutoscaler/team-hpa targets this ModelDeployment")
    assert got["status"]["autoscaler"]["externalAutoscaler"] == "HorizontalPodAutoscaler/team-hpa"
    (event,) = _events(cluster, namespace, "shared", "ExternalAutoscaler")
    assert event["type"] == "Warning" and "HorizontalPodAutoscaler/team-hpa" in event["message"]

    # every instance answers "idle": the built-in autoscaler would go down to 1 within a few ticks
    for p in _pods(cluster, namespace, "shared"):
        idle.serve(p["status"]["podIP"])
    lists = _namespaced_hpa_lists(cluster)
    time.sleep(10)  # five autoscaler intervals, five times the scale-down delay
    cluster.kubectl("get", "hpa", "-n", namespace, check=True)  # one LIST: the count counts
    # the ticks read the HPA from the operator's watch cache: no LIST of HPAs per tick (one a tick
    # would be about five more here; kube-controller-manager's informer lists cluster-wide)
    assert 1 <= _namespaced_hpa_lists(cluster) - lists <= 2
    current = get(cluster, namespace, "md", "shared") or {}
    assert current["spec"]["capacity"] == 3
    assert "desiredCapacity" not in current["status"] and "lastScaleTime" not in current["status"]
    assert not _events(cluster, namespace, "shared", "Autoscaled")
    assert len(_events(cluster, namespace, "shared", "ExternalAutoscaler")) == 1  # reported once

    # the HPA goes: the built-in autoscaler takes capacity back and follows the (idle) load
    cluster.kubectl("delete", "hpa", "team-hpa", "-n", namespace, check=True)
    got = wait_md(
        cluster,
        operator,
        namespace,
        "shared",
        lambda s: s.get("desiredCapacity") == 1 and condition(s, "Autoscaling").get("reason") == "Active",
        "the built-in autoscaler back, scaling down to 1",
        timeout=90,
    )
    assert (get(cluster, namespace, "md", "shared") or {})["spec"]["capacity"] == 1
