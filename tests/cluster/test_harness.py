"""The local control plane itself: scheduling with GPU resources through kwok, garbage collection,
HPA v2, RBAC with impersonation, the audit log and an apiserver restart."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest

from tests.cluster.conftest import wait_for
from tests.cluster.harness import NodeSpec

pytestmark = pytest.mark.cluster

GPU = "nvidia.com/gpu"


def kget(cluster: Any, *args: str) -> Any:
    r = cluster.kubectl("get", *args, "-o", "json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def poll(predicate: Any, timeout: float = 60.0, interval: float = 0.25, what: str = "condition") -> Any:
    return wait_for(predicate, timeout=timeout, interval=interval, message=what)


def apply(cluster: Any, obj: dict[str, Any]) -> None:
    r = cluster.kubectl("apply", "-f", "-", input=json.dumps(obj))
    assert r.returncode == 0, r.stderr


def condition(obj: dict[str, Any], ctype: str) -> dict[str, Any] | None:
    for c in obj.get("status", {}).get("conditions", []) or []:
        if c.get("type") == ctype:
            return dict(c)
    return None


def gpu_pod_spec(gpus: int) -> dict[str, Any]:
    return {
        "containers": [
            {
                "name": "main",
                "image": "registry.example/berth-fake:0",
                "resources": {
                    "limits": {GPU: str(gpus)} if gpus else {},
                    "requests": {"cpu": "100m", "memory": "64Mi"},
                },
            }
        ]
    }


def test_nodes_ready_with_gpu_capacity(cluster: Any) -> None:
    nodes = {n["metadata"]["name"]: n for n in kget(cluster, "nodes")["items"]}
    gpu_nodes = [n for n in nodes.values() if GPU in n["status"].get("capacity", {})]
    cpu_nodes = [n for n in nodes.values() if GPU not in n["status"].get("capacity", {})]
    assert len(gpu_nodes) >= 2
    assert len(cpu_nodes) >= 1
    for name in ("kwok-gpu-0", "kwok-gpu-1"):
        status = nodes[name]["status"]
        assert status["capacity"][GPU] == "4"
        assert status["allocatable"][GPU] == "4"
        assert status["capacity"]["cpu"] == "32"
        assert status["capacity"]["memory"] == "256Gi"
        assert status["capacity"]["pods"] == "110"
    assert GPU not in nodes["kwok-cpu-0"]["status"]["capacity"]
    for n in nodes.values():
        ready = condition(n, "Ready")
        assert ready is not None and ready["status"] == "True", (n["metadata"]["name"], ready)
        assert n["metadata"]["annotations"]["kwok.x-k8s.io/node"] == "fake"


def test_server_version_is_the_pinned_release(cluster: Any) -> None:
    r = cluster.kubectl("version", "-o", "json")
    assert r.returncode == 0, r.stderr
    server = json.loads(r.stdout)["serverVersion"]
    assert server["gitVersion"] == "v1.37.2"
    assert (server["major"], server["minor"]) == ("1", "37")


def test_gpu_deployment_becomes_running_and_ready(cluster: Any, namespace: str) -> None:
    labels = {"app": "gpu-demo"}
    apply(
        cluster,
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "gpu-demo", "namespace": namespace},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": labels},
                "template": {"metadata": {"labels": labels}, "spec": gpu_pod_spec(1)},
            },
        },
    )
    poll(
        lambda: kget(cluster, "deployment", "gpu-demo", "-n", namespace)["status"].get("readyReplicas") == 2,
        what="Deployment gpu-demo readyReplicas == 2",
    )
    pods = kget(cluster, "pods", "-n", namespace, "-l", "app=gpu-demo")["items"]
    assert len(pods) == 2
    for pod in pods:
        assert pod["status"]["phase"] == "Running"
        assert condition(pod, "Ready")["status"] == "True"  # type: ignore[index]
        assert pod["spec"]["nodeName"].startswith("kwok-gpu"), pod["spec"]["nodeName"]
        # loopback pod IPs: a test can bind a real server to a simulated pod's address
        assert pod["status"]["podIP"].startswith("127.244."), pod["status"]["podIP"]
    assert len({p["status"]["podIP"] for p in pods}) == 2


def test_endpointslices_for_pods_on_a_routable_node(local_cluster: Any, namespace: str) -> None:
    """EndpointSlices reject loopback addresses, so a node with its own routable podCIDR (tainted, so
    that only this test's pods land there) shows the endpointslice controller at work."""
    c = local_cluster
    node = f"kwok-net-{uuid.uuid4().hex[:5]}"
    taint = {"key": "berth.test/routable", "value": "true", "effect": "NoSchedule"}
    c.apply_node(NodeSpec(node, cpu="8", memory="16Gi", pod_cidr="10.244.7.0/24", taints=(taint,)))
    labels = {"app": "web"}
    pod_spec = gpu_pod_spec(0) | {
        "nodeSelector": {"kubernetes.io/hostname": node},
        "tolerations": [{"key": "berth.test/routable", "operator": "Exists", "effect": "NoSchedule"}],
    }
    try:
        apply(
            c,
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": "web", "namespace": namespace},
                "spec": {
                    "replicas": 2,
                    "selector": {"matchLabels": labels},
                    "template": {"metadata": {"labels": labels}, "spec": pod_spec},
                },
            },
        )
        apply(
            c,
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "web", "namespace": namespace},
                "spec": {"selector": labels, "ports": [{"port": 80, "targetPort": 8000}]},
            },
        )
        poll(
            lambda: kget(c, "deployment", "web", "-n", namespace)["status"].get("readyReplicas") == 2,
            what="Deployment web readyReplicas == 2",
        )
        pods = kget(c, "pods", "-n", namespace, "-l", "app=web")["items"]
        assert all(p["spec"]["nodeName"] == node for p in pods)
        pod_ips = sorted(p["status"]["podIP"] for p in pods)
        assert all(ip.startswith("10.244.7.") for ip in pod_ips), pod_ips

        def ready_endpoints() -> list[str] | None:
            slices = kget(c, "endpointslices", "-n", namespace, "-l", "kubernetes.io/service-name=web")
            addrs = sorted(
                addr
                for sl in slices["items"]
                for ep in sl.get("endpoints") or []
                if ep.get("conditions", {}).get("ready")
                for addr in ep["addresses"]
            )
            return addrs if len(addrs) == 2 else None

        assert poll(ready_endpoints, what="2 ready endpoints in the EndpointSlice") == pod_ips
    finally:
        c.kubectl("delete", "deployment", "web", "-n", namespace, "--wait=true", "--timeout=60s")
        c.delete_node(node)


def test_too_many_gpus_pending_until_a_big_node_arrives(local_cluster: Any, namespace: str) -> None:
    c = local_cluster
    apply(
        c,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "big", "namespace": namespace},
            "spec": gpu_pod_spec(8),
        },
    )

    def unschedulable() -> dict[str, Any] | None:
        cond = condition(kget(c, "pod", "big", "-n", namespace), "PodScheduled")
        return cond if cond and cond["status"] == "False" else None

    cond = poll(unschedulable, what="PodScheduled=False")
    assert cond["reason"] == "Unschedulable"
    assert "Insufficient nvidia.com/gpu" in cond["message"], cond["message"]
    time.sleep(1)
    assert kget(c, "pod", "big", "-n", namespace)["status"]["phase"] == "Pending"

    node = f"kwok-gpu-big-{uuid.uuid4().hex[:5]}"
    c.add_gpu_node(node, gpus=8)
    try:
        pod = poll(
            lambda: (lambda p: p if p["status"].get("phase") == "Running" else None)(
                kget(c, "pod", "big", "-n", namespace)
            ),
            what="pod big Running on the new node",
        )
        assert pod["spec"]["nodeName"] == node
        assert condition(pod, "Ready")["status"] == "True"  # type: ignore[index]
    finally:
        c.kubectl("delete", "pod", "big", "-n", namespace, "--wait=true", "--timeout=60s")
        c.delete_node(node)


def test_garbage_collector_deletes_dependents(cluster: Any, namespace: str) -> None:
    r = cluster.kubectl("create", "configmap", "owner", "-n", namespace, "--from-literal=a=1")
    assert r.returncode == 0, r.stderr
    owner_uid = kget(cluster, "configmap", "owner", "-n", namespace)["metadata"]["uid"]
    apply(
        cluster,
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": "dependent",
                "namespace": namespace,
                "ownerReferences": [
                    {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner_uid}
                ],
            },
            "data": {"b": "2"},
        },
    )
    assert cluster.kubectl("get", "configmap", "dependent", "-n", namespace).returncode == 0
    r = cluster.kubectl("delete", "configmap", "owner", "-n", namespace)
    assert r.returncode == 0, r.stderr
    poll(
        lambda: "NotFound" in cluster.kubectl("get", "configmap", "dependent", "-n", namespace).stderr,
        what="the garbage collector to delete the dependent ConfigMap",
    )


def test_autoscaling_v2_hpa_is_accepted(cluster: Any, namespace: str) -> None:
    apply(
        cluster,
        {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": "demo", "namespace": namespace},
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "demo"},
                "minReplicas": 1,
                "maxReplicas": 5,
                "metrics": [
                    {
                        "type": "Resource",
                        "resource": {
                            "name": "cpu",
                            "target": {"type": "Utilization", "averageUtilization": 60},
                        },
                    }
                ],
            },
        },
    )
    hpa = kget(cluster, "horizontalpodautoscalers.v2.autoscaling", "demo", "-n", namespace)
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["maxReplicas"] == 5
    assert hpa["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"] == 60


def test_impersonated_service_account_is_bound_by_rbac(cluster: Any, namespace: str) -> None:
    sa = f"system:serviceaccount:{namespace}:robot"
    r = cluster.kubectl(f"--as={sa}", "auth", "can-i", "create", "deployments.apps", "-n", namespace)
    assert (r.returncode, r.stdout.strip()) == (1, "no")
    r = cluster.kubectl(f"--as={sa}", "create", "configmap", "nope", "-n", namespace)
    assert r.returncode != 0 and "forbidden" in r.stderr.lower()

    for args in (
        ("create", "serviceaccount", "robot", "-n", namespace),
        ("create", "role", "deployer", "--verb=create,get", "--resource=deployments.apps", "-n", namespace),
        (
            "create",
            "rolebinding",
            "robot-deployer",
            "--role=deployer",
            f"--serviceaccount={namespace}:robot",
            "-n",
            namespace,
        ),
    ):
        r = cluster.kubectl(*args)
        assert r.returncode == 0, r.stderr
    r = cluster.kubectl(f"--as={sa}", "auth", "can-i", "create", "deployments.apps", "-n", namespace)
    assert (r.returncode, r.stdout.strip()) == (0, "yes")
    r = cluster.kubectl(f"--as={sa}", "auth", "can-i", "delete", "deployments.apps", "-n", namespace)
    assert (r.returncode, r.stdout.strip()) == (1, "no")


def test_audit_log_counts_writes_per_user(local_cluster: Any, namespace: str) -> None:
    c = local_cluster
    since = time.time()
    sa = f"system:serviceaccount:{namespace}:writer"
    for args in (
        ("create", "serviceaccount", "writer", "-n", namespace),
        ("create", "role", "cm", "--verb=create,patch,get", "--resource=configmaps", "-n", namespace),
        (
            "create",
            "rolebinding",
            "writer-cm",
            "--role=cm",
            f"--serviceaccount={namespace}:writer",
            "-n",
            namespace,
        ),
    ):
        assert c.kubectl(*args).returncode == 0
    for i in range(3):
        r = c.kubectl(f"--as={sa}", "create", "configmap", f"w{i}", "-n", namespace)
        assert r.returncode == 0, r.stderr
    r = c.kubectl(f"--as={sa}", "patch", "configmap", "w0", "-n", namespace, "-p", '{"data":{"x":"1"}}')
    assert r.returncode == 0, r.stderr
    assert c.kubectl(f"--as={sa}", "get", "configmap", "w0", "-n", namespace).returncode == 0  # a read

    writes = c.audit_writes(since)
    assert writes[sa] == 4  # 3 creates + 1 patch; the get is not a write
    mine = [e for e in c.audit_events(since) if e.get("objectRef", {}).get("namespace") == namespace]
    admin_writes = [e for e in mine if e["user"]["username"] == "berth-admin" and "impersonatedUser" not in e]
    assert {e["objectRef"]["resource"] for e in admin_writes} >= {"serviceaccounts", "roles", "rolebindings"}
    assert c.audit_writes(time.time() + 3600) == {}


def test_apiserver_restart_keeps_state(local_cluster: Any, namespace: str) -> None:
    c = local_cluster
    assert c.kubectl("create", "configmap", "survivor", "-n", namespace).returncode == 0
    before = c.components["kube-apiserver"].pid
    t0 = time.monotonic()
    c.restart_apiserver()
    assert time.monotonic() - t0 < 60
    assert c.components["kube-apiserver"].pid != before
    assert c.kubectl("get", "configmap", "survivor", "-n", namespace).returncode == 0
    # the controllers reconnect: a new Deployment still gets ready pods
    labels = {"app": "after-restart"}
    apply(
        c,
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "after-restart", "namespace": namespace},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {"metadata": {"labels": labels}, "spec": gpu_pod_spec(0)},
            },
        },
    )
    poll(
        lambda: kget(c, "deployment", "after-restart", "-n", namespace)["status"].get("readyReplicas") == 1,
        timeout=90,
        what="Deployment after-restart ready after the apiserver restart",
    )


def test_helm_binary_runs(cluster: Any) -> None:
    import subprocess

    r = subprocess.run([str(cluster.bin_dir / "helm"), "version", "--short"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("v3.22.0")
