"""Tenancy against the real API server: objects the operator does not own are never touched, and the
platform's policy is enforced in the reconcile (Failed/PolicyViolation, no child)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from .operator_proc import OperatorProcess
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
