"""Lifecycle against the real API server and controllers: a pod that is still downloading or loading its
model never turns the ModelDeployment Failed, a Multi-Attach error surfaces as the reason, the resolved
commit of an hf:// model reaches status.modelRevision.

The pods run on a node that no kubelet (and no kwok) manages: the test keeps the node Ready by renewing
its Lease and writes the pods' status itself, exactly as a kubelet would report an init container that
downloads for minutes and a server still inside its startup budget. The Deployment controller, the
scheduler and the operator are the real ones, so the Deployment's own ProgressDeadlineExceeded comes
when it would in a cluster.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from .conftest import wait_for
from .operator_proc import OperatorProcess
from .test_operator import apply, condition, get, md, wait_md

pytestmark = pytest.mark.slow

STARTUP_SECONDS = 60  # the smallest budget the operator accepts; progressDeadlineSeconds is twice it
INSTANCE_TYPE = "berth-manual"  # node.kubernetes.io/instance-type: on the policy's nodeSelector allow-list
COMMIT = "4f2c9e0b7d1a3c5e8f6a2b4d0c9e7f1a3b5d7c9e"


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _now_micro() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class ManualNode:
    """A Node without kubelet or kwok: Ready while this object renews its Lease; pods bound to it keep
    whatever status the test writes."""

    def __init__(self, cluster: Any, name: str) -> None:
        self.cluster = cluster
        self.name = name
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._renew, daemon=True)

    def _kubectl(self, *args: str, input: str | None = None) -> None:
        self.cluster.kubectl(*args, input=input, check=True)

    def __enter__(self) -> ManualNode:
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.name,
                "labels": {
                    "kubernetes.io/hostname": self.name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "node.kubernetes.io/instance-type": INSTANCE_TYPE,
                },
            },
        }
        self._kubectl("create", "-f", "-", input=json.dumps(node))
        capacity = {"cpu": "8", "memory": "32Gi", "ephemeral-storage": "200Gi", "pods": "20"}
        self._heartbeat(capacity)
        lease = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.name, "namespace": "kube-node-lease"},
            "spec": {"holderIdentity": self.name, "leaseDurationSeconds": 40, "renewTime": _now_micro()},
        }
        self._kubectl("apply", "-f", "-", input=json.dumps(lease))
        self.thread.start()
        return self

    def _heartbeat(self, capacity: dict[str, str] | None = None) -> None:
        now = _now()
        status: dict[str, Any] = {
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "the test plays the kubelet",
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": now,
                }
            ]
        }
        if capacity:
            status.update(capacity=capacity, allocatable=capacity)
        patch = json.dumps({"status": status})
        self._kubectl("patch", "node", self.name, "--subresource=status", "--type=merge", "-p", patch)

    def _renew(self) -> None:
        while not self.stop.wait(5):
            with contextlib.suppress(Exception):
                patch = json.dumps({"spec": {"renewTime": _now_micro()}})
                self._kubectl(
                    "patch", "lease", self.name, "-n", "kube-node-lease", "--type=merge", "-p", patch
                )
                self._heartbeat()

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)
        self.cluster.kubectl("delete", "node", self.name, "--wait=false", "--ignore-not-found")
        self.cluster.kubectl("delete", "lease", self.name, "-n", "kube-node-lease", "--ignore-not-found")


@pytest.fixture(scope="module")
def operator(cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    env = {"BERTH_STARTUP_SECONDS": str(STARTUP_SECONDS)}
    with OperatorProcess.running(cluster, tmp_path_factory.mktemp("operator-lifecycle"), env) as op:
        yield op


@pytest.fixture(scope="module")
def manual_node(cluster: Any, local_cluster: Any) -> Iterator[ManualNode]:
    with ManualNode(cluster, f"manual-{uuid.uuid4().hex[:6]}") as node:
        yield node


def _pod(cluster: Any, ns: str, name: str) -> dict[str, Any]:
    def bound() -> dict[str, Any] | None:
        r = cluster.kubectl("get", "pods", "-n", ns, "-l", f"berth.dev/model-deployment={name}", "-o", "json")
        items = json.loads(r.stdout)["items"] if r.returncode == 0 else []
        live = [p for p in items if p["spec"].get("nodeName") and not p["metadata"].get("deletionTimestamp")]
        return live[0] if len(live) == 1 else None

    found: dict[str, Any] = wait_for(bound, timeout=60, message=f"one pod of {name} bound to the manual node")
    return found


def _set_pod_status(cluster: Any, ns: str, pod: str, status: dict[str, Any]) -> None:
    patch = json.dumps({"status": status})
    cluster.kubectl(
        "patch", "pod", pod, "-n", ns, "--subresource=status", "--type=merge", "-p", patch, check=True
    )


def _conditions(ready: bool, initialized: bool) -> list[dict[str, Any]]:
    now = _now()
    return [
        {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
        {"type": "Initialized", "status": str(initialized), "lastTransitionTime": now},
        {"type": "ContainersReady", "status": str(ready), "lastTransitionTime": now},
        {"type": "Ready", "status": str(ready), "lastTransitionTime": now},
    ]


def _container_status(name: str, image: str, state: dict[str, Any]) -> dict[str, Any]:
    """A not-ready container's status in ``state`` (started when it is running)."""
    return {
        "name": name,
        "image": image,
        "imageID": "",
        "ready": False,
        "restartCount": 0,
        "started": "running" in state,
        "state": state,
    }


def _hf_md(name: str, **extra: Any) -> dict[str, Any]:
    return md(
        name,
        model={"uri": "hf://acme/big-model", "revision": "main", "cacheSize": "20Gi"},
        auth={"mode": "none"},
        resources={"cpu": "1", "memory": "1Gi"},
        podTemplate={"nodeSelector": {"node.kubernetes.io/instance-type": INSTANCE_TYPE}},
        **extra,
    )


def test_a_pod_inside_its_startup_budget_never_makes_the_phase_failed(
    cluster: Any, operator: OperatorProcess, manual_node: ManualNode, namespace: str
) -> None:
    """A download that takes longer than a startup budget, then a load inside the budget: the Deployment
    reports ProgressDeadlineExceeded meanwhile, the phase is never Failed. Once the server is past its
    budget with nothing on its way, the same deadline makes it Failed (so the check can fail)."""
    apply(cluster, namespace, _hf_md("big"))
    pod = _pod(cluster, namespace, "big")
    name = pod["metadata"]["name"]
    assert pod["spec"]["nodeName"] == manual_node.name
    (init,) = pod["spec"]["initContainers"]
    assert init["name"] == "download-model"
    assert init["resources"]["requests"]["ephemeral-storage"] == "20Gi"
    assert init["command"][4:] == ["model", "acme/big-model", "main", "/models/hf"]
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "model")
    assert volume["emptyDir"] == {"sizeLimit": "20Gi"}
    dep = get(cluster, namespace, "deployment", "big") or {}
    deadline = dep["spec"]["progressDeadlineSeconds"]
    assert deadline == 2 * STARTUP_SECONDS

    started = time.monotonic()
    downloading: dict[str, Any] = {
        "phase": "Pending",
        "conditions": _conditions(ready=False, initialized=False),
        "initContainerStatuses": [
            _container_status("download-model", init["image"], {"running": {"startedAt": _now()}})
        ],
        "containerStatuses": [
            _container_status(
                "server", pod["spec"]["containers"][0]["image"], {"waiting": {"reason": "PodInitializing"}}
            )
        ],
    }
    _set_pod_status(cluster, namespace, name, downloading)

    phases: list[str] = []

    def watch(until: float) -> dict[str, Any]:
        last: dict[str, Any] = {}
        while time.monotonic() < until:
            last = get(cluster, namespace, "md", "big") or {}
            status = last.get("status") or {}
            phases.append(str(status.get("phase")))
            assert status.get("phase") != "Failed", (
                f"Failed while a pod was on its way: {json.dumps(status, indent=1)}\n{operator.log_tail()}"
            )
            time.sleep(1)
        return last

    # downloading for a full startup budget and half another (the budget alone would have run out), so
    # that the Deployment's deadline (two budgets) falls well inside the server's own budget
    got = watch(started + STARTUP_SECONDS + 30)
    ready = condition(got["status"], "Ready")
    assert ready["reason"] == "InstancesNotReady" and "1 downloading the model" in ready["message"], ready

    # the download finishes with its commit; the server loads, inside its own budget
    loading = {
        **downloading,
        "phase": "Running",
        "conditions": _conditions(ready=False, initialized=True),
        "initContainerStatuses": [
            {
                **downloading["initContainerStatuses"][0],
                "started": False,
                "state": {
                    "terminated": {
                        "exitCode": 0,
                        "reason": "Completed",
                        "message": json.dumps({"model": COMMIT}),
                        "startedAt": _now(),
                        "finishedAt": _now(),
                    }
                },
            }
        ],
        "containerStatuses": [
            {
                **downloading["containerStatuses"][0],
                "state": {"running": {"startedAt": _now()}},
            }
        ],
    }
    server_started = time.monotonic()
    _set_pod_status(cluster, namespace, name, loading)
    got = wait_md(
        cluster, operator, namespace, "big", lambda s: s.get("modelRevision") == COMMIT, "the resolved commit"
    )
    assert "1 starting (loading the model)" in condition(got["status"], "Ready")["message"]

    # past the Deployment's progress deadline, still inside the server's budget: not Failed
    def deadline_exceeded() -> bool:
        d = get(cluster, namespace, "deployment", "big") or {}
        progressing = condition(d.get("status") or {}, "Progressing")
        return progressing.get("reason") == "ProgressDeadlineExceeded"

    while not deadline_exceeded():
        assert time.monotonic() < started + deadline + 30, "the Deployment never exceeded its deadline"
        watch(time.monotonic() + 2)
    assert time.monotonic() < server_started + STARTUP_SECONDS - 5, "the test was too slow to show it"
    watch(server_started + STARTUP_SECONDS - 3)
    assert set(phases) <= {"Pending", "Deploying", "None"}, phases

    # past the budget, nothing on its way: now the deadline counts
    got = wait_md(
        cluster,
        operator,
        namespace,
        "big",
        lambda s: s.get("phase") == "Failed",
        "Failed once the server's budget ran out",
        timeout=STARTUP_SECONDS,
    )
    assert condition(got["status"], "Ready")["reason"] == "ProgressDeadlineExceeded"


def test_multi_attach_error_is_the_reason(
    cluster: Any, operator: OperatorProcess, manual_node: ManualNode, namespace: str
) -> None:
    """A pod held in ContainerCreating by the attach/detach controller's Multi-Attach error: the
    ModelDeployment says so, with the controller's message."""
    claim = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "models"},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": "",
            "volumeName": f"models-{namespace}",
            "resources": {"requests": {"storage": "10Gi"}},
        },
    }
    volume = {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": f"models-{namespace}"},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": "",
            "capacity": {"storage": "10Gi"},
            "hostPath": {"path": "/srv/models"},
            "claimRef": {"namespace": namespace, "name": "models"},
        },
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(volume), check=True)
    try:
        spec = _hf_md("rwo")["spec"]
        spec["model"] = {"uri": "pvc://models/qwen"}
        apply(cluster, namespace, claim, {**md("rwo"), "spec": spec})
        pod = _pod(cluster, namespace, "rwo")
        _set_pod_status(
            cluster,
            namespace,
            pod["metadata"]["name"],
            {
                "phase": "Pending",
                "conditions": _conditions(ready=False, initialized=True),
                "containerStatuses": [
                    _container_status(
                        "server",
                        pod["spec"]["containers"][0]["image"],
                        {"waiting": {"reason": "ContainerCreating"}},
                    )
                ],
            },
        )
        got = wait_md(
            cluster,
            operator,
            namespace,
            "rwo",
            lambda s: "1 creating containers" in condition(s, "Ready").get("message", ""),
            "creating containers",
        )
        message = 'Multi-Attach error for volume "pvc-1f2e" Volume is already used by pod(s) other-5d8-abc'
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{pod['metadata']['name']}.multiattach"},
            "involvedObject": {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": pod["metadata"]["name"],
                "namespace": namespace,
                "uid": pod["metadata"]["uid"],
            },
            "reason": "FailedAttachVolume",
            "message": message,
            "type": "Warning",
            "source": {"component": "attachdetach-controller"},
            "firstTimestamp": _now(),
            "lastTimestamp": _now(),
            "count": 1,
        }
        apply(cluster, namespace, event)
        got = wait_md(
            cluster,
            operator,
            namespace,
            "rwo",
            lambda s: condition(s, "Ready").get("reason") == "MultiAttachError",
            "Ready reason MultiAttachError",
        )
        assert message in condition(got["status"], "Ready")["message"]
        assert got["status"]["phase"] == "Pending"
        assert condition(got["status"], "Available")["status"] == "False"
    finally:
        cluster.kubectl("delete", "pv", f"models-{namespace}", "--wait=false", "--ignore-not-found")
