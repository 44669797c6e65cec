"""Rotating the gateway master key against the real API server, with the chart's RBAC: the operator
notices the new file content without a restart and rewrites each instance's `<name>-gateway-key`
Secret with the new credential (a JSON Patch whose first op tests the Secret's owner uid), never
reading a Secret; a Secret of that name that is not the ModelDeployment's is left untouched and
reported as a ChildConflict. The test reads Secrets with its admin client; the operator cannot."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from berth.controller.builders import GATEWAY_KEY_FINGERPRINT, gateway_key_fingerprint
from berth.controller.kube import SECRET, KubeClient, Rejected
from berth.gateway.registry import instance_credential

from .conftest import wait_for
from .operator_proc import OperatorProcess
from .test_operator import apply, get, md

OLD, NEW, NEWER = b"rotation-test-master-1", b"rotation-test-master-2", b"rotation-test-master-3"


@pytest.fixture(scope="module")
def master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("operator-rotation") / "master"
    path.write_bytes(OLD + b"\n")
    return path


@pytest.fixture(scope="module")
def operator(cluster: Any, master: Path) -> Iterator[OperatorProcess]:
    env = {"BERTH_GATEWAY_MASTER_KEY_FILE": str(master)}
    with OperatorProcess.running(cluster, master.parent, env) as op:
        yield op


def _credential(cluster: Any, ns: str, name: str) -> str | None:
    secret = get(cluster, ns, "secret", f"{name}-gateway-key")
    if secret is None:
        return None
    return base64.b64decode(secret["data"]["berth-gateway"]).decode()


def _ready(cluster: Any, ns: str, name: str) -> dict[str, Any]:
    status = (get(cluster, ns, "md", name) or {}).get("status") or {}
    return next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {})


def test_rotation_rewrites_the_secret_and_leaves_a_foreign_one(
    cluster: Any, operator: OperatorProcess, namespace: str, master: Path
) -> None:
    model = {"uri": "builtin://smollm2-135m-instruct"}
    apply(cluster, namespace, md("chat", model=model, capacity=1))
    apply(cluster, namespace, md("other", model=model, capacity=1))
    for name in ("chat", "other"):
        wait_for(
            lambda n=name: _credential(cluster, namespace, n) == instance_credential(OLD, namespace, n),
            timeout=60,
            message=f"{name}'s gateway key with the first master's credential",
        )
    deployment = wait_for(
        lambda: get(cluster, namespace, "deployment", "chat"), timeout=30, message="Deployment"
    )
    template = deployment["spec"]["template"]
    assert deployment["metadata"]["annotations"][GATEWAY_KEY_FINGERPRINT] == gateway_key_fingerprint(
        instance_credential(OLD, namespace, "chat")
    )
    chat_uid = get(cluster, namespace, "md", "chat")["metadata"]["uid"]

    # "other"'s Secret is replaced by one the ModelDeployment does not own (deleted, then re-made at once
    # by someone else under the same name: the operator only remembers having made one)
    k = cluster.kubectl
    k("-n", namespace, "delete", "secret", "other-gateway-key", check=True)
    foreign = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "other-gateway-key", "namespace": namespace},
        "data": {"berth-gateway": base64.b64encode(b"planted").decode()},
    }
    k("-n", namespace, "create", "-f", "-", input=json.dumps(foreign), check=True)

    master.write_bytes(NEW + b"\n")  # what the kubelet does to the mounted Secret; no operator restart
    new = instance_credential(NEW, namespace, "chat")
    wait_for(
        lambda: _credential(cluster, namespace, "chat") == new,
        timeout=60,
        message="chat's gateway key rewritten with the new master's credential",
    )
    secret = get(cluster, namespace, "secret", "chat-gateway-key")
    assert secret["metadata"]["ownerReferences"][0]["uid"] == chat_uid  # the same Secret, patched
    deployment = wait_for(
        lambda: (
            (d := get(cluster, namespace, "deployment", "chat"))
            and d["metadata"]["annotations"].get(GATEWAY_KEY_FINGERPRINT) == gateway_key_fingerprint(new)
            and d
        ),
        timeout=30,
        message="the Deployment records the new credential's fingerprint",
    )
    # the pods are not rolled: the template (and so its hash) is unchanged; the generation moves, as
    # for any Deployment annotation (the deployment controller copies them onto its ReplicaSet)
    assert deployment["spec"]["template"] == template

    ready = wait_for(
        lambda: (r := _ready(cluster, namespace, "other")).get("reason") == "ChildConflict" and r,
        timeout=60,
        message="other's foreign Secret reported",
    )
    assert "Secret/other-gateway-key" in ready["message"]
    assert _credential(cluster, namespace, "other") == "planted"  # untouched
    planted = get(cluster, namespace, "secret", "other-gateway-key")
    assert not planted["metadata"].get("ownerReferences")
    assert "other-gateway-key" in operator.log_tail(400) and "planted" not in operator.log_tail(400)

    # the foreign Secret goes: the operator makes its own, with the current credential, and the
    # conflict clears; a second rotation is picked up as well
    k("-n", namespace, "delete", "secret", "other-gateway-key", check=True)
    master.write_bytes(NEWER)
    for name in ("chat", "other"):
        wait_for(
            lambda n=name: _credential(cluster, namespace, n) == instance_credential(NEWER, namespace, n),
            timeout=60,
            message=f"{name}'s gateway key with the third master's credential",
        )
    wait_for(
        lambda: _ready(cluster, namespace, "other").get("reason") != "ChildConflict",
        timeout=60,
        message="other's conflict cleared",
    )
    for secret_key in (OLD, NEW, NEWER):
        assert secret_key.decode() not in operator.log_tail(2000)


def test_the_guarded_patch_answers_metadata_only_and_refuses_a_foreign_owner(
    cluster: Any, namespace: str
) -> None:
    """kube.KubeClient.json_patch as the operator sends it: the Secret's data never comes back, and a
    failing owner test writes nothing (422)."""
    client = KubeClient(cluster.api_client())
    configmap = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owner"}}
    cluster.kubectl("-n", namespace, "create", "-f", "-", input=json.dumps(configmap), check=True)
    uid = get(cluster, namespace, "configmap", "owner")["metadata"]["uid"]  # a real one: the GC keeps it
    owner = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "probe", "namespace": namespace, "ownerReferences": [owner]},
        "data": {"berth-gateway": base64.b64encode(b"before").decode()},
    }
    assert client.create(SECRET, namespace, secret) is not None
    after = base64.b64encode(b"after").decode()

    def ops(uid: str) -> list[dict[str, Any]]:
        return [
            {"op": "test", "path": "/metadata/ownerReferences/0/uid", "value": uid},
            {"op": "replace", "path": "/data/berth-gateway", "value": after},
        ]

    with pytest.raises(Rejected) as refused:
        client.json_patch(SECRET, namespace, "probe", ops("uid-someone-else"))
    assert refused.value.status == 422 and "after" not in str(refused.value)
    assert (
        get(cluster, namespace, "secret", "probe")["data"]["berth-gateway"] == secret["data"]["berth-gateway"]
    )
    answer = client.json_patch(SECRET, namespace, "probe", ops(uid))
    assert answer["kind"] == "PartialObjectMetadata" and "data" not in answer
    assert answer["metadata"]["name"] == "probe"
    assert get(cluster, namespace, "secret", "probe")["data"]["berth-gateway"] == after
