"""Rotating the gateway master key against the real API server, with the chart's RBAC: the operator
notices the new file content without a restart and rewrites each instance's `<name>-gateway-key`
Secret with the new credential (a JSON Patch whose first op tests the Secret's owner references), never
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
from berth.controller.plan import gateway_key_rewrite
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
    """plan.gateway_key_rewrite's patch as kube.KubeClient.json_patch sends it: the Secret's data never
    comes back; the owner test compares the whole ownerReferences list, so a Secret whose references
    are someone else's, or name the owner's uid in another reference, or are absent, is refused (422,
    the patch does not apply, nothing written); a Secret of ours without its data key is written."""
    client = KubeClient(cluster.api_client())
    refs = {}
    for name in ("owner", "someone-else"):  # real owners: the garbage collector keeps what they own
        configmap = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}}
        cluster.kubectl("-n", namespace, "create", "-f", "-", input=json.dumps(configmap), check=True)
        cm_uid = get(cluster, namespace, "configmap", name)["metadata"]["uid"]
        refs[name] = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "name": name,
            "uid": cm_uid,
            "controller": True,
        }
    owner, uid = refs["owner"], refs["owner"]["uid"]
    before = base64.b64encode(b"before").decode()
    after = base64.b64encode(b"after").decode()
    desired = {"metadata": {"ownerReferences": [owner]}, "data": {"berth-gateway": after}}
    ops = gateway_key_rewrite(desired, uid)
    assert ops is not None

    def secret(name: str, owners: list[dict[str, Any]] | None, data: dict[str, str] | None) -> None:
        meta: dict[str, Any] = {"name": name, "namespace": namespace}
        if owners is not None:
            meta["ownerReferences"] = owners
        body = {"apiVersion": "v1", "kind": "Secret", "metadata": meta, **({"data": data} if data else {})}
        assert client.create(SECRET, namespace, body) is not None

    for name, their_refs in (
        ("elsewhere", [refs["someone-else"]]),
        ("the-uid-not-as-controller", [{**owner, "controller": False}]),  # the uid, not the controller
        ("another-first", [{**refs["someone-else"], "controller": False}, owner]),
        ("unowned", None),
    ):
        secret(name, their_refs, {"berth-gateway": before})
        with pytest.raises(Rejected) as refused:
            client.json_patch(SECRET, namespace, name, ops)
        assert refused.value.status == 422 and refused.value.patch_not_applicable, refused.value
        assert "after" not in str(refused.value) and after not in str(refused.value)
        assert get(cluster, namespace, "secret", name)["data"]["berth-gateway"] == before
    secret("probe", [owner], {"berth-gateway": before})
    secret("emptied", [owner], None)
    for name in ("probe", "emptied"):
        answer = client.json_patch(SECRET, namespace, name, ops)
        assert answer["kind"] == "PartialObjectMetadata" and "data" not in answer
        assert answer["metadata"]["name"] == name
        assert get(cluster, namespace, "secret", name)["data"] == {"berth-gateway": after}
