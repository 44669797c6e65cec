"""Tenancy against the real API server: objects the operator does not own are never touched, and the
platform's policy is enforced in the reconcile (Failed/PolicyViolation, no child)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from .conftest import wait_for
from .operator_proc import OperatorProcess, render_chart
from .test_operator import apply, condition, get, md, wait_md


@pytest.fixture(scope="module")
def operator(cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    with OperatorProcess.running(cluster, tmp_path_factory.mktemp("operator-tenancy")) as op:
        yield op


FOREIGN: list[dict[str, Any]] = [
    {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "chat", "labels": {"app": "billing"}},
        "spec": {
            "ports": [{"name": "https", "port": 443, "targetPort": 8443}],
            "selector": {"app": "billing"},
        },
    },
    {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "chat"},
        "spec": {"podSelector": {"matchLabels": {"app": "billing"}}, "policyTypes": ["Ingress"]},
    },
    {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "chat-api-keys"},
        "type": "Opaque",
        "data": {"billing-db-password": "aHVudGVyMg=="},
    },
]


def _snapshot(obj: dict[str, Any]) -> dict[str, Any]:
    meta = obj["metadata"]
    return {
        "resourceVersion": meta["resourceVersion"],
        "uid": meta["uid"],
        "ownerReferences": meta.get("ownerReferences"),
        "labels": meta.get("labels"),
        "spec": obj.get("spec"),
        "data": obj.get("data"),
    }


def test_take_overs_leave_foreign_objects_unchanged_and_recover(
    cluster: Any, operator: OperatorProcess, namespace: str
) -> None:
    apply(cluster, namespace, *FOREIGN)
    kinds = {"Service": "service", "NetworkPolicy": "networkpolicy", "Secret": "secret"}
    before = {
        o["kind"]: _snapshot(get(cluster, namespace, kinds[o["kind"]], o["metadata"]["name"]) or {})
        for o in FOREIGN
    }

    apply(cluster, namespace, md("chat", capacity=1, access={"allowedNamespaces": ["apps"]}))
    got = wait_md(
        cluster,
        operator,
        namespace,
        "chat",
        lambda s: condition(s, "Ready").get("reason") == "ChildConflict",
        "Ready False ChildConflict",
    )
    ready = condition(got["status"], "Ready")
    assert ready["status"] == "False"
    for name in ("Service/chat", "NetworkPolicy/chat", "Secret/chat-api-keys"):
        assert name in ready["message"], ready["message"]
    time.sleep(8)  # a few resyncs (BERTH_RESYNC_SECONDS=3): still nothing touched
    after = {
        o["kind"]: _snapshot(get(cluster, namespace, kinds[o["kind"]], o["metadata"]["name"]) or {})
        for o in FOREIGN
    }
    assert after == before
    assert get(cluster, namespace, "deployment", "chat") is None  # the foreign Secret is not mounted as keys
    events = json.loads(cluster.kubectl("get", "events", "-n", namespace, "-o", "json").stdout)["items"]
    conflict_events = [e for e in events if e.get("reason") == "ChildConflict"]
    assert conflict_events and "Service/chat" in conflict_events[0]["message"]
    assert conflict_events[0]["involvedObject"]["name"] == "chat"

    # the owners remove their objects: the ModelDeployment recovers by itself
    for o in FOREIGN:
        cluster.kubectl("delete", kinds[o["kind"]], o["metadata"]["name"], "-n", namespace, check=True)
    wait_md(
        cluster,
        operator,
        namespace,
        "chat",
        lambda s: (
            condition(s, "Ready").get("reason") not in (None, "ChildConflict") and s.get("phase") != "Failed"
        ),
        "the conflict to clear",
    )
    uid = (get(cluster, namespace, "md", "chat") or {})["metadata"]["uid"]
    for kind in ("service", "networkpolicy", "deployment"):
        obj = get(cluster, namespace, kind, "chat") or {}
        refs = obj.get("metadata", {}).get("ownerReferences") or []
        assert [r["uid"] for r in refs if r.get("controller")] == [uid], (kind, refs)
    secret = get(cluster, namespace, "secret", "chat-api-keys") or {}
    assert "billing-db-password" not in (secret.get("data") or {})


# (spec, the field the message names): each is refused by the reconcile (no admission policy installed)
POLICY_VIOLATIONS: list[tuple[dict[str, Any], str]] = [
    ({"model": {"uri": "hostpath:////"}}, "spec.model.uri"),
    ({"image": "docker.io/evil/miner:latest"}, "spec.image"),
    ({"podTemplate": {"tolerations": [{"operator": "Exists"}]}}, "spec.podTemplate.tolerations[0].key"),
    (
        {"podTemplate": {"nodeSelector": {"kubernetes.io/hostname": "n1"}}},
        "spec.podTemplate.nodeSelector[kubernetes.io/hostname]",
    ),
    (
        {
            "podTemplate": {
                "annotations": {"container.apparmor.security.beta.kubernetes.io/server": "unconfined"}
            }
        },
        "spec.podTemplate.annotations[container.apparmor.security.beta.kubernetes.io/server]",
    ),
    (
        {
            "podTemplate": {
                "env": [{"name": "DB", "valueFrom": {"secretKeyRef": {"name": "billing-db", "key": "pw"}}}]
            }
        },
        "spec.podTemplate.env[0].valueFrom",
    ),
]


def test_policy_violations_end_failed_with_no_child(
    cluster: Any, operator: OperatorProcess, namespace: str
) -> None:
    names = [f"bad{i}" for i in range(len(POLICY_VIOLATIONS))]
    apply(
        cluster,
        namespace,
        *(md(n, capacity=1, **spec) for n, (spec, _) in zip(names, POLICY_VIOLATIONS, strict=True)),
    )
    for name, (_, field) in zip(names, POLICY_VIOLATIONS, strict=True):
        got = wait_md(cluster, operator, namespace, name, lambda s: s.get("phase") == "Failed", "Failed")
        ready = condition(got["status"], "Ready")
        assert ready["status"] == "False" and ready["reason"] == "PolicyViolation", ready
        assert ready["message"].startswith(field + ":"), ready["message"]
    for kind in ("deployments", "services", "secrets", "pods", "networkpolicies"):
        listed = json.loads(cluster.kubectl("get", kind, "-n", namespace, "-o", "json").stdout)["items"]
        ours = [o["metadata"]["name"] for o in listed if o["metadata"]["name"].startswith("bad")]
        assert ours == [], (kind, ours)


ADMISSION_VIOLATIONS: list[tuple[dict[str, Any], str]] = [
    ({"model": {"uri": "hostpath:////"}}, "spec.model.uri"),
    ({"model": {"uri": "pvc://m/base", "adapters": [{"name": "a", "uri": "hostpath:///etc"}]}}, "spec.model"),
    ({"image": "docker.io/evil/miner:latest"}, "spec.image"),
    ({"podTemplate": {"tolerations": [{"operator": "Exists"}]}}, "spec.podTemplate.tolerations"),
    (
        {"podTemplate": {"tolerations": [{"key": "node-role.kubernetes.io/control-plane"}]}},
        "spec.podTemplate.tolerations",
    ),
    ({"podTemplate": {"nodeSelector": {"kubernetes.io/hostname": "n1"}}}, "spec.podTemplate.nodeSelector"),
    (
        {"podTemplate": {"annotations": {"container.apparmor.security.beta.kubernetes.io/s": "u"}}},
        "spec.podTemplate.annotations",
    ),
    (
        {"podTemplate": {"env": [{"name": "D", "valueFrom": {"secretKeyRef": {"name": "db", "key": "pw"}}}]}},
        "spec.podTemplate.env",
    ),
    (
        {"podTemplate": {"env": [{"name": "D", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]}},
        "spec.podTemplate.env",
    ),
    ({"model": {"uri": "pvc://m/base", "trustRemoteCode": True}}, "spec.model.trustRemoteCode"),
]


@pytest.fixture
def admission_policy(cluster: Any, namespace: str) -> Iterator[str]:
    """The chart's ValidatingAdmissionPolicy + binding, bound to the test's namespace only."""
    docs = [
        d
        for d in render_chart(cluster, f"watchNamespaces={{{namespace}}}")
        if d["kind"].startswith("ValidatingAdmission")
    ]
    assert sorted(d["kind"] for d in docs) == [
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    ]
    for d in docs:
        d["metadata"]["name"] = f"{d['metadata']['name']}-{namespace}"
        if d["kind"] == "ValidatingAdmissionPolicyBinding":
            d["spec"]["policyName"] = f"{d['spec']['policyName']}-{namespace}"
    body = json.dumps({"apiVersion": "v1", "kind": "List", "items": docs})
    cluster.kubectl("apply", "-f", "-", input=body, check=True)
    name = (
        docs[0]["metadata"]["name"]
        if docs[0]["kind"] == "ValidatingAdmissionPolicy"
        else docs[1]["metadata"]["name"]
    )
    try:
        yield name
    finally:
        cluster.kubectl("delete", "-f", "-", input=body)


def _apply_result(cluster: Any, ns: str, obj: dict[str, Any]) -> Any:
    return cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(obj))


def test_admission_policy_refuses_each_violation_naming_the_field(
    cluster: Any, operator: OperatorProcess, namespace: str, admission_policy: str
) -> None:
    # the policy compiles against the CRD's schema without warnings
    def checked() -> dict[str, Any] | None:
        got = json.loads(
            cluster.kubectl("get", "validatingadmissionpolicy", admission_policy, "-o", "json").stdout
        )
        return got if (got.get("status") or {}).get("observedGeneration") else None

    policy = wait_for(checked, 30, message="the policy's type check")
    assert not ((policy["status"].get("typeChecking") or {}).get("expressionWarnings")), policy["status"]

    # a binding takes a moment to be enforced: wait until the first violation is refused
    first_spec = ADMISSION_VIOLATIONS[0][0]
    probes = iter(range(1000))
    wait_for(  # each probe a new object: kubectl sends nothing for an unchanged one
        lambda: (
            _apply_result(cluster, namespace, md(f"probe{next(probes)}", **first_spec)).returncode != 0
            or None
        ),
        30,
        message="the binding to be enforced",
    )
    for i, (spec, field) in enumerate(ADMISSION_VIOLATIONS):
        r = _apply_result(cluster, namespace, md(f"bad{i}", **spec))
        assert r.returncode != 0, f"{spec} was accepted"
        assert "ValidatingAdmissionPolicy" in r.stderr and field in r.stderr, r.stderr
    ok = md(
        "fine",
        image="ghcr.io/berth-dev/berth-server-cpu:0.1.0",
        podTemplate={
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "annotations": {"prometheus.io/scrape": "true"},
            "env": [
                {"name": "PLAIN", "value": "1"},
                {"name": "T", "valueFrom": {"secretKeyRef": {"name": "team-token", "key": "t"}}},
            ],
            "envSecrets": ["team-token"],
        },
    )
    r = _apply_result(cluster, namespace, ok)
    assert r.returncode == 0, r.stderr
    stored = get(cluster, namespace, "md", "fine") or {}
    env = stored["spec"]["podTemplate"]["env"]
    assert env[0] == {"name": "PLAIN", "value": "1"}  # the schema defaults no valueFrom into a plain value
    assert env[1]["valueFrom"] == {"secretKeyRef": {"name": "team-token", "key": "t"}}
