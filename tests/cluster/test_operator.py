"""The operator end to end against the local control plane: real API server, controllers, scheduler, kwok.

One `berth operator` process (the chart's ServiceAccount permissions) serves the whole module; each
test works in its own namespace.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml

from .conftest import wait_for
from .operator_proc import ROOT, OperatorProcess

EXAMPLES = ROOT / "examples"
VALID_EXAMPLES = sorted(p.name for p in EXAMPLES.glob("*.yaml") if not p.name.startswith("invalid-"))
INVALID_EXAMPLES = sorted(p.name for p in EXAMPLES.glob("invalid-*.yaml"))


@pytest.fixture(scope="module")
def operator(cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    with OperatorProcess.running(cluster, tmp_path_factory.mktemp("operator")) as op:
        yield op


def md(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "berth.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name},
        "spec": spec,
    }


def apply(cluster: Any, ns: str, *objs: dict[str, Any]) -> None:
    r = cluster.kubectl(
        "apply",
        "-n",
        ns,
        "-f",
        "-",
        input=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objs)}),
    )
    assert r.returncode == 0, r.stderr


def get(cluster: Any, ns: str, kind: str, name: str) -> dict[str, Any] | None:
    r = cluster.kubectl("get", kind, name, "-n", ns, "-o", "json")
    return json.loads(r.stdout) if r.returncode == 0 else None


def wait_md(
    cluster: Any,
    op: OperatorProcess,
    ns: str,
    name: str,
    check: Callable[[dict[str, Any]], bool],
    what: str,
    timeout: float = 60.0,
) -> dict[str, Any]:
    last: dict[str, Any] = {}

    def probe() -> dict[str, Any] | None:
        nonlocal last
        last = get(cluster, ns, "md", name) or {}
        return last if last and check(last.get("status") or {}) else None

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = probe()
        if got:
            return got
        time.sleep(0.5)
    pytest.fail(
        f"{ns}/{name}: timed out after {timeout}s waiting for {what}; status: "
        f"{json.dumps(last.get('status'), indent=1)}\noperator log:\n{op.log_tail()}"
    )


def running(capacity: int) -> Callable[[dict[str, Any]], bool]:
    return lambda s: (
        s.get("phase") == "Running" and s.get("readyCapacity") == capacity and bool(s.get("endpoint"))
    )


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c["type"] == type_), {})


def test_crd_is_accepted_and_explained(cluster: Any, operator: OperatorProcess) -> None:
    crd = json.loads(
        cluster.kubectl("get", "crd", "modeldeployments.berth.dev", "-o", "json", check=True).stdout
    )
    established = next(c for c in crd["status"]["conditions"] if c["type"] == "Established")
    assert established["status"] == "True"
    # the API server publishes a new CRD's OpenAPI a moment after it is Established
    explained = wait_for(
        lambda: cluster.kubectl("explain", "md.spec").stdout, timeout=60, message="kubectl explain md.spec"
    )
    out = str(explained)
    assert "Number of instances (pods)" in out
    assert "capacity" in out and "autoscaling" in out
    out = cluster.kubectl("explain", "md.spec.model.uri", check=True).stdout
    assert "builtin://smollm2-135m-instruct" in out


def _prerequisites(cluster: Any, ns: str, docs: list[dict[str, Any]]) -> None:
    """PersistentVolumes for the claims an example names but does not create (a local PV per claim)."""
    defined = {(d.get("kind"), d["metadata"]["name"]) for d in docs}
    claims: set[str] = set()
    for d in docs:
        if d.get("kind") != "ModelDeployment":
            continue
        model = (d.get("spec") or {}).get("model") or {}
        uris = [model.get("uri", "")] + [a.get("uri", "") for a in model.get("adapters") or []]
        claims |= {u.removeprefix("pvc://").split("/")[0] for u in uris if u.startswith("pvc://")}
    for claim in sorted(claims):
        if ("PersistentVolumeClaim", claim) in defined:
            continue
        pv = {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": f"{ns}-{claim}"[:63]},
            "spec": {
                "capacity": {"storage": "100Gi"},
                "accessModes": ["ReadOnlyMany"],
                "hostPath": {"path": f"/srv/models/{claim}"},
                "storageClassName": "manual",
                "claimRef": {"namespace": ns, "name": claim},
            },
        }
        pvc = {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim, "namespace": ns},
            "spec": {
                "accessModes": ["ReadOnlyMany"],
                "storageClassName": "manual",
                "volumeName": pv["metadata"]["name"],
                "resources": {"requests": {"storage": "100Gi"}},
            },
        }
        r = cluster.kubectl(
            "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [pv, pvc]})
        )
        assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("example", VALID_EXAMPLES)
def test_example_reaches_running(
    cluster: Any, operator: OperatorProcess, namespace: str, example: str
) -> None:
    path = EXAMPLES / example
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    _prerequisites(cluster, namespace, docs)
    r = cluster.kubectl("apply", "-n", namespace, "-f", str(path))
    assert r.returncode == 0, r.stderr
    mds = [d for d in docs if d.get("kind") == "ModelDeployment"]
    assert mds, f"{example} has no ModelDeployment"
    for d in mds:
        name = d["metadata"]["name"]
        capacity = (d.get("spec") or {}).get("capacity", 1)
        got = wait_md(cluster, operator, namespace, name, running(capacity), f"Running with {capacity} ready")
        assert got["status"]["endpoint"] == f"http://{name}.{namespace}.svc.cluster.local/v1"
        assert got["status"]["servedModelName"] == ((d["spec"].get("model") or {}).get("servedName") or name)
        ready = condition(got["status"], "Ready")
        assert ready["status"] == "True" and ready["reason"] == "AllInstancesReady"
    table = cluster.kubectl("get", "md", "-n", namespace, check=True).stdout
    header = table.splitlines()[0].split()
    assert header == ["NAME", "MODEL", "PHASE", "CAPACITY", "READY", "ENDPOINT", "AGE"]
    assert "Running" in table


INVALID = [
    ({"capacity": -1}, "spec.capacity"),
    ({"autoscaling": {"minCapacity": 3, "maxCapacity": 1}}, "spec.autoscaling.minCapacity"),
    ({"model": {"uri": "s3://bucket/model"}}, "spec.model.uri"),
    (
        {"model": {"adapters": [{"name": "a", "uri": "pvc://x/a"}, {"name": "a", "uri": "pvc://x/b"}]}},
        "spec.model.adapters",
    ),
]


@pytest.mark.parametrize(
    ("spec", "field"), INVALID, ids=["negative-capacity", "min-gt-max", "scheme", "dup-adapter"]
)
def test_invalid_manifest_rejected_naming_the_field(
    cluster: Any, operator: OperatorProcess, namespace: str, spec: dict[str, Any], field: str
) -> None:
    r = cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(md("bad", **spec)))
    assert r.returncode != 0
    assert field in r.stderr, r.stderr
    assert get(cluster, namespace, "md", "bad") is None


@pytest.mark.parametrize("example", INVALID_EXAMPLES)
def test_invalid_examples_are_rejected(
    cluster: Any, operator: OperatorProcess, namespace: str, example: str
) -> None:
    text = (EXAMPLES / example).read_text()
    expected = [
        line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("# expect-error:")
    ]
    assert expected, f"{example} has no '# expect-error:' line"
    r = cluster.kubectl("apply", "-n", namespace, "-f", str(EXAMPLES / example))
    assert r.returncode != 0
    for words in expected:
        assert words in r.stderr, r.stderr


def test_scale_subresource_and_hpa(cluster: Any, operator: OperatorProcess, namespace: str) -> None:
    apply(cluster, namespace, md("chat", capacity=1))
    wait_md(cluster, operator, namespace, "chat", running(1), "Running with 1")
    cluster.kubectl("scale", "md/chat", "-n", namespace, "--replicas=4", check=True)
    wait_for(
        lambda: (get(cluster, namespace, "deployment", "chat") or {}).get("spec", {}).get("replicas") == 4,
        timeout=30,
        message="Deployment replicas 4",
    )
    got = wait_md(cluster, operator, namespace, "chat", running(4), "Running with 4 ready")
    assert got["spec"]["capacity"] == 4
    assert got["status"]["selector"] == "berth.dev/model-deployment=chat"
    events = cluster.kubectl(
        "get",
        "events",
        "-n",
        namespace,
        "--field-selector",
        "involvedObject.name=chat",
        "-o",
        "json",
        check=True,
    ).stdout
    reasons = [e["reason"] for e in json.loads(events)["items"]]
    assert "Deployed" in reasons and "Ready" in reasons and "Scaled" in reasons

    scale = json.loads(
        cluster.kubectl(
            "get",
            "--raw",
            f"/apis/berth.dev/v1alpha1/namespaces/{namespace}/modeldeployments/chat/scale",
            check=True,
        ).stdout
    )
    assert scale["spec"]["replicas"] == 4 and scale["status"]["replicas"] == 4
    assert scale["status"]["selector"] == "berth.dev/model-deployment=chat"

    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "chat"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "berth.dev/v1alpha1", "kind": "ModelDeployment", "name": "chat"},
            "minReplicas": 1,
            "maxReplicas": 6,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 80}},
                }
            ],
        },
    }
    apply(cluster, namespace, hpa)

    def able_to_scale() -> dict[str, Any] | None:
        h = get(cluster, namespace, "hpa", "chat") or {}
        cond = next(
            (c for c in (h.get("status") or {}).get("conditions") or [] if c["type"] == "AbleToScale"), None
        )
        return h if cond and cond["status"] == "True" else None

    h = wait_for(able_to_scale, timeout=60, message="HPA AbleToScale (it read the scale subresource)")
    assert h["status"]["currentReplicas"] == 4


def test_more_gpus_than_nodes_is_pending_until_a_node_comes(
    cluster: Any, local_cluster: Any, operator: OperatorProcess, namespace: str
) -> None:
    apply(cluster, namespace, md("big", capacity=1, resources={"gpus": 8}))
    got = wait_md(
        cluster,
        operator,
        namespace,
        "big",
        lambda s: s.get("phase") == "Pending" and condition(s, "Ready").get("reason") == "Unschedulable",
        "Pending with reason Unschedulable",
    )
    message = condition(got["status"], "Ready")["message"]
    assert "Insufficient nvidia.com/gpu" in message and "nodes are available" in message
    events = json.loads(
        cluster.kubectl(
            "get",
            "events",
            "-n",
            namespace,
            "--field-selector",
            "involvedObject.name=big",
            "-o",
            "json",
            check=True,
        ).stdout
    )["items"]
    assert any(e["reason"] == "Unschedulable" for e in events)
    node = f"gpu-big-{namespace[-6:]}"
    local_cluster.add_gpu_node(node, gpus=8)
    try:
        wait_md(
            cluster, operator, namespace, "big", running(1), "Running after the 8-GPU node came", timeout=90
        )
    finally:
        cluster.kubectl("delete", "md", "big", "-n", namespace, "--wait=true")
        local_cluster.delete_node(node)


def test_invalid_edit_fails_without_losing_children(
    cluster: Any, operator: OperatorProcess, namespace: str
) -> None:
    apply(cluster, namespace, md("chat", capacity=2))
    wait_md(cluster, operator, namespace, "chat", running(2), "Running with 2")
    # allowedCIDRs passes the schema (a string) but is not a CIDR: the operator refuses it.
    apply(cluster, namespace, md("chat", capacity=2, access={"allowedCIDRs": ["10.1.0.0/99"]}))
    got = wait_md(cluster, operator, namespace, "chat", lambda s: s.get("phase") == "Failed", "Failed")
    ready = condition(got["status"], "Ready")
    assert ready["status"] == "False" and ready["reason"] == "InvalidSpec"
    assert "access.allowedCIDRs" in ready["message"] and "10.1.0.0/99" in ready["message"]
    dep = get(cluster, namespace, "deployment", "chat")
    assert dep is not None and dep["spec"]["replicas"] == 2
    assert get(cluster, namespace, "networkpolicy", "chat") is None
    apply(cluster, namespace, md("chat", capacity=2, access={"allowedCIDRs": ["10.1.0.0/16"]}))
    wait_md(cluster, operator, namespace, "chat", running(2), "Running again after the fix")
    assert get(cluster, namespace, "networkpolicy", "chat") is not None


def test_delete_removes_children_and_leaves_no_finalizer(
    cluster: Any, operator: OperatorProcess, namespace: str
) -> None:
    apply(cluster, namespace, md("chat", capacity=2, access={"allowedNamespaces": ["apps"]}))
    got = wait_md(cluster, operator, namespace, "chat", running(2), "Running with 2")
    assert not got["metadata"].get("finalizers")
    children = [
        ("deployment", "chat"),
        ("service", "chat"),
        ("secret", "chat-api-keys"),
        ("networkpolicy", "chat"),
        ("poddisruptionbudget", "chat"),
    ]
    for kind, name in children:
        child = get(cluster, namespace, kind, name)
        assert child is not None, f"{kind}/{name} missing"
        (ref,) = child["metadata"]["ownerReferences"]
        assert ref["uid"] == got["metadata"]["uid"] and ref["controller"] is True
    cluster.kubectl("delete", "md", "chat", "-n", namespace, "--wait=true", "--timeout=30s", check=True)
    for kind, name in children:
        wait_for(
            lambda k=kind, n=name: get(cluster, namespace, k, n) is None,
            timeout=60,
            message=f"{kind}/{name} garbage-collected",
        )
    wait_for(
        lambda: (
            not json.loads(cluster.kubectl("get", "pods", "-n", namespace, "-o", "json", check=True).stdout)[
                "items"
            ]
        ),
        timeout=60,
        message="pods gone",
    )


def test_operator_killed_mid_reconcile_converges(
    cluster: Any, operator: OperatorProcess, namespace: str
) -> None:
    names = [f"m{i}" for i in range(6)]
    apply(cluster, namespace, *[md(n, capacity=1) for n in names])
    time.sleep(0.5)  # some reconciles are under way
    operator.kill()
    operator.start()
    for n in names:
        wait_md(cluster, operator, namespace, n, running(1), "Running after the operator restart")
    keys = {n: (get(cluster, namespace, "secret", f"{n}-api-keys") or {})["data"] for n in names}
    operator.kill()
    operator.start()
    time.sleep(4)  # a resync with the new process
    for n in names:
        deployments = json.loads(
            cluster.kubectl(
                "get",
                "deployments",
                "-n",
                namespace,
                "-l",
                f"berth.dev/model-deployment={n}",
                "-o",
                "json",
                check=True,
            ).stdout
        )["items"]
        assert [d["metadata"]["name"] for d in deployments] == [n]
        assert (get(cluster, namespace, "secret", f"{n}-api-keys") or {})["data"] == keys[n], (
            "API key rotated"
        )
        events = json.loads(
            cluster.kubectl(
                "get",
                "events",
                "-n",
                namespace,
                "--field-selector",
                f"involvedObject.name={n}",
                "-o",
                "json",
                check=True,
            ).stdout
        )["items"]
        assert sum(1 for e in events if e["reason"] == "Deployed") <= 1


def test_apiserver_restart_is_survived(
    cluster: Any, local_cluster: Any, operator: OperatorProcess, namespace: str
) -> None:
    apply(cluster, namespace, md("before", capacity=1))
    wait_md(cluster, operator, namespace, "before", running(1), "Running")
    local_cluster.restart_apiserver(downtime=2)
    apply(cluster, namespace, md("after", capacity=2))
    wait_md(
        cluster, operator, namespace, "after", running(2), "Running after the API server restart", timeout=90
    )
    cluster.kubectl("scale", "md/before", "-n", namespace, "--replicas=2", check=True)
    wait_md(cluster, operator, namespace, "before", running(2), "scaled after the restart", timeout=60)
    assert operator.alive()


def test_nothing_changed_means_no_write(
    cluster: Any, local_cluster: Any, operator: OperatorProcess, namespace: str
) -> None:
    apply(cluster, namespace, md("quiet", capacity=2, access={"allowedNamespaces": ["apps"]}))
    wait_md(cluster, operator, namespace, "quiet", running(2), "Running")
    time.sleep(4)  # let the last status/event writes land
    since = time.time()
    before = operator.writes()
    time.sleep(10)  # three resync periods (BERTH_RESYNC_SECONDS=3) plus pod/deployment watch traffic
    events = [
        e
        for e in local_cluster.audit_events(since)
        if e.get("user", {}).get("username") == operator.user
        and (e.get("objectRef") or {}).get("namespace") == namespace
    ]
    assert events == [], [(e["verb"], e["objectRef"]) for e in events]
    reconciles = sum(
        v
        for k, v in operator.metrics().items()
        if k.startswith("berth_operator_reconciles_total{") and "trigger=timer" in k
    )
    assert reconciles > 0  # the timer did run
    assert operator.writes() - before <= 0 or _only_other_namespaces(
        local_cluster, since, operator, namespace
    )


def _only_other_namespaces(
    local_cluster: Any, since: float, operator: OperatorProcess, namespace: str
) -> bool:
    writes = [
        e for e in local_cluster.audit_events(since) if e.get("user", {}).get("username") == operator.user
    ]
    return all((e.get("objectRef") or {}).get("namespace") != namespace for e in writes)


def test_dropped_spec_entries_leave_the_deployment_and_then_nothing_is_written(
    cluster: Any, local_cluster: Any, operator: OperatorProcess, namespace: str
) -> None:
    apply(
        cluster,
        namespace,
        md(
            "edit",
            capacity=1,
            resources={"gpus": 1},
            podTemplate={
                "labels": {"team": "a", "cost": "x"},
                "nodeSelector": {"kubernetes.io/os": "linux", "node.kubernetes.io/instance-type": "gpu"},
            },
        ),
    )

    def server(dep: dict[str, Any] | None) -> dict[str, Any]:
        assert dep is not None
        container: dict[str, Any] = dep["spec"]["template"]["spec"]["containers"][0]
        return container

    dep = wait_for(lambda: get(cluster, namespace, "deployment", "edit"), 30, message="the Deployment")
    assert server(dep)["resources"]["limits"]["nvidia.com/gpu"] == "1"
    apply(
        cluster,
        namespace,
        md(
            "edit",
            capacity=1,
            podTemplate={"labels": {"team": "a"}, "nodeSelector": {"kubernetes.io/os": "linux"}},
        ),
    )

    def edited() -> dict[str, Any] | None:
        d = get(cluster, namespace, "deployment", "edit")
        if d is None or "nvidia.com/gpu" in server(d)["resources"]["limits"]:
            return None
        return d

    dep = wait_for(edited, 30, message="the GPU limit to go")
    resources = server(dep)["resources"]
    assert set(resources["limits"]) == set(resources["requests"]) == {"cpu", "memory"}
    template = dep["spec"]["template"]
    assert template["spec"]["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert template["metadata"]["labels"]["team"] == "a" and "cost" not in template["metadata"]["labels"]
    assert "nvidia.com/gpu" not in {t.get("key") for t in template["spec"].get("tolerations") or []}

    time.sleep(4)  # the status writes of the rollout
    since = time.time()
    time.sleep(7)  # two resync periods: the edited Deployment now matches, so no patch follows
    patches = [
        e
        for e in local_cluster.audit_events(since)
        if e.get("user", {}).get("username") == operator.user
        and (e.get("objectRef") or {}).get("namespace") == namespace
        and (e.get("objectRef") or {}).get("resource") == "deployments"
    ]
    assert patches == [], [(e["verb"], e["objectRef"]) for e in patches]
