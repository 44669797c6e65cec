"""Berth end to end on the real node: the chart's operator as its pod, examples/smollm2-cpu.yaml as a
real pod of the server-cpu image behind its real probes, reached by DNS name from another namespace,
a stream that survives a scale-down, recovery from a deleted container.

The tests of this module share one ModelDeployment (the real node has 2 CPUs: one instance at a time)
and run in file order.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.cluster import realnode

from . import clients
from .conftest import OPERATOR_NS, ROOT, get_or_none, kjson, wait_for

EXAMPLE = ROOT / "examples" / "smollm2-cpu.yaml"
MD = "smollm2"


def md_status(cluster: Any, ns: str, name: str = MD) -> dict[str, Any]:
    md = get_or_none(cluster, "get", "md", name, "-n", ns) or {}
    return dict(md.get("status") or {})


def server_pods(cluster: Any, ns: str) -> list[dict[str, Any]]:
    items = kjson(cluster, "get", "pods", "-n", ns, "-l", f"berth.dev/model-deployment={MD}")["items"]
    return [p for p in items if not p["metadata"].get("deletionTimestamp")]


def ready(pod: dict[str, Any]) -> bool:
    return any(
        c["type"] == "Ready" and c["status"] == "True"
        for c in (pod.get("status") or {}).get("conditions") or []
    )


def wait_phase(cluster: Any, ns: str, phase: str, timeout: float, name: str = MD) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        st = md_status(cluster, ns, name)
        return st if st.get("phase") == phase else None

    try:
        return dict(wait_for(reached, timeout, f"ModelDeployment {ns}/{name} phase {phase}"))
    except pytest.fail.Exception:
        pods = cluster.kubectl("get", "pods", "-n", ns, "-o", "wide").stdout
        events = cluster.kubectl("get", "events", "-n", ns, "--sort-by=.lastTimestamp").stdout[-3000:]
        print(
            f"status: {json.dumps(md_status(cluster, ns, name), indent=1)}\npods:\n{pods}\nevents:\n{events}"
        )
        raise


@pytest.fixture(scope="module")
def smollm2(node_cluster: Any) -> Iterator[dict[str, Any]]:
    """examples/smollm2-cpu.yaml applied unchanged in its own namespace, Running."""
    ns = "smollm2-e2e"
    node_cluster.kubectl("create", "namespace", ns, check=True)
    wait_for(
        lambda: node_cluster.kubectl("get", "serviceaccount", "default", "-n", ns).returncode == 0,
        30,
        "default ServiceAccount",
    )
    t0 = time.monotonic()
    node_cluster.kubectl("apply", "-n", ns, "-f", str(EXAMPLE), check=True)
    status = wait_phase(node_cluster, ns, "Running", 420)
    print(f"\n{MD}: applied -> Running in {time.monotonic() - t0:.0f}s")
    secret = kjson(node_cluster, "get", "secret", status["apiKeySecret"], "-n", ns)
    key = base64.b64decode(next(iter(secret["data"].values()))).decode()
    yield {"ns": ns, "status": status, "key": key}
    node_cluster.kubectl("delete", "namespace", ns, "--wait=true", "--timeout=180s")


def test_operator_runs_as_its_pod(node_cluster: Any, images: dict[str, str]) -> None:
    pods = kjson(
        node_cluster, "get", "pods", "-n", OPERATOR_NS, "-l", "app.kubernetes.io/component=operator"
    )["items"]
    assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
    pod = pods[0]
    assert pod["spec"]["nodeName"] == realnode.NODE_NAME
    assert ready(pod) and pod["status"]["phase"] == "Running"
    (container,) = pod["status"]["containerStatuses"]
    assert container["image"].endswith(images["operator"].split("/", 1)[1]) and container["restartCount"] == 0
    uid = node_cluster.kubectl(
        "exec", "-n", OPERATOR_NS, pod["metadata"]["name"], "--", "id", "-u", check=True
    )
    assert uid.stdout.strip() == "1000"


def test_example_runs_as_a_real_pod(
    node_cluster: Any, smollm2: dict[str, Any], images: dict[str, str]
) -> None:
    ns, status = smollm2["ns"], smollm2["status"]
    assert status["readyCapacity"] == 1 and status["endpoint"] == f"http://{MD}.{ns}.svc.cluster.local/v1"
    (pod,) = server_pods(node_cluster, ns)
    assert pod["spec"]["nodeName"] == realnode.NODE_NAME
    assert ipaddress.ip_address(pod["status"]["podIP"]) in ipaddress.ip_network(realnode.POD_CIDR)
    (cs,) = pod["status"]["containerStatuses"]
    # kubelet ran the real startup probe (started) and readiness probe (ready) against the server
    assert cs["started"] is True and cs["ready"] is True and "running" in cs["state"], cs
    assert cs["image"].endswith(images["server-cpu"].split("/", 1)[1])
    ps = node_cluster.crictl("ps", "--name", "server", "-o", "json", check=True)
    assert [c["labels"]["io.kubernetes.pod.name"] for c in json.loads(ps.stdout)["containers"]] == [
        pod["metadata"]["name"]
    ]


def test_client_in_another_namespace_calls_the_endpoint_by_dns_name(
    node_cluster: Any, smollm2: dict[str, Any], images: dict[str, str], make_namespace: Any
) -> None:
    apps = make_namespace(None)
    out = clients.call(
        node_cluster,
        apps,
        images["operator"],
        smollm2["status"]["endpoint"],
        smollm2["status"]["servedModelName"],
        smollm2["key"],
    )
    assert out.get("status") == 200, out
    assert "Paris" in out["body"]["choices"][0]["message"]["content"], out
    denied = clients.call(
        node_cluster,
        apps,
        images["operator"],
        smollm2["status"]["endpoint"],
        smollm2["status"]["servedModelName"],
        "sk-not-a-key",
    )
    assert denied.get("status") == 401, denied


def test_client_calls_the_instance_through_the_gateway_with_a_team_key(
    node_cluster: Any, smollm2: dict[str, Any], images: dict[str, str], make_namespace: Any
) -> None:
    """The chart's gateway (its pods from the operator image) answers for the instance: a team key from
    an ApiKey in the instance's namespace, `model: <namespace>/<servedName>` at Service berth-gateway,
    from a client pod in another namespace; the key's usage lands in ApiKey.status."""
    ns = smollm2["ns"]
    key = clients.apikey(node_cluster, ns, "e2e-team", [MD])
    apps = make_namespace()
    model = f"{ns}/{smollm2['status']['servedModelName']}"
    out = clients.call(node_cluster, apps, images["operator"], clients.GATEWAY, model, key)
    assert out.get("status") == 200, out
    assert "Paris" in out["body"]["choices"][0]["message"]["content"], out
    denied = clients.call(node_cluster, apps, images["operator"], clients.GATEWAY, model, smollm2["key"])
    assert denied.get("status") == 401, denied  # the instance's own key is not a gateway key
    tokens = out["body"]["usage"]["prompt_tokens"] + out["body"]["usage"]["completion_tokens"]

    def booked() -> dict[str, Any] | None:
        usage = (
            (get_or_none(node_cluster, "get", "apikey", "e2e-team", "-n", ns) or {})
            .get("status", {})
            .get("usage")
        )
        return usage if usage and int(usage.get("requests") or 0) >= 1 else None

    usage = wait_for(booked, 60, "the gateway's usage in ApiKey.status")
    assert int(usage["promptTokens"]) + int(usage["completionTokens"]) == tokens, usage


def test_instance_runs_as_uid_1000_with_a_read_only_root(node_cluster: Any, smollm2: dict[str, Any]) -> None:
    ns = smollm2["ns"]
    (pod,) = server_pods(node_cluster, ns)
    name = pod["metadata"]["name"]
    ids = node_cluster.kubectl(
        "exec", "-n", ns, name, "-c", "server", "--", "sh", "-c", "id -u; id -g", check=True
    )
    assert ids.stdout.split() == ["1000", "1000"], ids.stdout
    write = node_cluster.kubectl("exec", "-n", ns, name, "-c", "server", "--", "sh", "-c", "echo x > /probe")
    assert write.returncode != 0 and "Read-only file system" in write.stderr, write
    tmp = node_cluster.kubectl(
        "exec", "-n", ns, name, "-c", "server", "--", "sh", "-c", "echo x > /tmp/probe && rm /tmp/probe"
    )
    assert tmp.returncode == 0, tmp.stderr  # the emptyDir is writable


def server_container(cluster: Any, pod_name: str) -> str | None:
    """The id of the pod's running server container, from the node's runtime (crictl)."""
    ps = json.loads(cluster.crictl("ps", "--name", "server", "-o", "json", check=True).stdout)["containers"]
    ids = [c["id"] for c in ps if c["labels"]["io.kubernetes.pod.name"] == pod_name]
    return ids[0] if ids else None


def test_deleted_container_degrades_and_recovers(node_cluster: Any, smollm2: dict[str, Any]) -> None:
    """The instance's container is stopped in the runtime, under kubelet's feet. kubelet starts a new
    one at once, which reloads the model: the operator reads that as starting (Ready False, 0/1,
    "1 starting"). Stopped again as soon as it runs, kubelet backs off before the next start
    (CrashLoopBackOff): an instance that served and stays down past the grace is Degraded. When
    kubelet starts it again and it loads, the ModelDeployment is Running again.

    Stopped, not removed: kubelet's restart backoff reads the exit of the container it last ran, so
    a container removed at once (`crictl rm --force`) leaves nothing to back off from and is restarted
    at once every time; whether kubelet saw the exit before the removal was a race."""
    ns = smollm2["ns"]
    (pod,) = server_pods(node_cluster, ns)
    name = pod["metadata"]["name"]
    phases: list[str] = []
    degraded: dict[str, Any] = {}
    stops = 0
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not degraded:
        cid = server_container(node_cluster, name)
        if cid is not None and stops < 5:
            node_cluster.crictl("stop", "--timeout", "0", cid, check=True)
            stops += 1
        status = md_status(node_cluster, ns)
        phases.append(str(status.get("phase")))
        degraded = status if status.get("phase") == "Degraded" else {}
        time.sleep(0.5)
    assert degraded, f"phases after {stops} stops: {phases}"
    assert phases[0] != "Degraded" and "Updating" in phases, phases  # the first restart reads as starting
    cond = {c["type"]: c for c in degraded["conditions"]}
    assert degraded["readyCapacity"] == 0 and cond["Ready"]["status"] == "False", degraded
    assert cond["Degraded"]["status"] == "True", cond
    recovered = wait_phase(node_cluster, ns, "Running", 300)
    assert recovered["readyCapacity"] == 1
    (after,) = server_pods(node_cluster, ns)
    assert after["metadata"]["uid"] == pod["metadata"]["uid"]  # the same pod, its container restarted
    assert after["status"]["containerStatuses"][0]["restartCount"] >= stops  # each stop ended one run


def test_scale_down_during_a_stream_lets_the_stream_complete(
    node_cluster: Any, smollm2: dict[str, Any], images: dict[str, str], make_namespace: Any
) -> None:
    ns = smollm2["ns"]
    wait_phase(node_cluster, ns, "Running", 300)
    (server,) = server_pods(node_cluster, ns)
    apps = make_namespace(None)
    client = clients.start_client(
        node_cluster,
        apps,
        images["operator"],
        smollm2["status"]["endpoint"],
        smollm2["status"]["servedModelName"],
        smollm2["key"],
        mode="stream",
        prompt="Tell me a long story about a lighthouse keeper.",
        max_tokens=160,
        ignore_eos=True,
    )
    wait_for(
        lambda: "FIRST-CHUNK" in clients.logs(node_cluster, apps, client),
        180,
        "the first streamed chunk",
        interval=0.5,
    )
    node_cluster.kubectl("scale", "md", MD, "-n", ns, "--replicas=0", check=True)

    def terminating() -> bool:
        p = get_or_none(node_cluster, "get", "pod", server["metadata"]["name"], "-n", ns)
        return p is None or bool(p["metadata"].get("deletionTimestamp"))

    wait_for(terminating, 60, "the server pod to terminate", interval=0.5)
    assert "RESULT" not in clients.logs(node_cluster, apps, client), "the stream ended before the pod stopped"
    out = clients.result(node_cluster, apps, client)
    assert out.get("status") == 200 and "error" not in out and "error_event" not in out, out
    assert out["done"] is True and out["finish_reason"] == "length", out
    assert out["chunks"] >= 100, out
    wait_phase(node_cluster, ns, "Idle", 180)
