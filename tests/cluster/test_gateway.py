"""The gateway against the real API server: a real `berth gateway` process, authenticated as the chart's
gateway ServiceAccount with the chart's ClusterRole (so its RBAC is tested too), discovers ModelDeployments,
their EndpointSlices and ApiKeys by watching; the operator's ApiKey reconcile (its real code through
its real client) makes the Secret and publishes the hash; usage lands in ApiKey.status.

The instances are fake OpenAI upstreams (tests/gateway) listening on a non-loopback local address,
because EndpointSlice validation rejects the loopback pod IPs the harness gives kwok pods.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from berth.controller.apikeys import reconcile_apikey
from berth.controller.kube import KubeClient
from tests.gateway.conftest import Server, Upstream, free_port

from .conftest import wait_for
from .test_operator import apply, get

ROOT = Path(__file__).resolve().parents[2]


def _local_address() -> str:
    out = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    for addr in out:
        if ":" not in addr and not addr.startswith("127."):
            with socket.socket() as s:
                try:
                    s.bind((addr, 0))
                except OSError:
                    continue
            return addr
    pytest.fail("no non-loopback local IPv4 address to stand fake instances on")


def _slice(name: str, service: str, addr: str, port: int, ready: bool = True) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": [{"addresses": [addr], "conditions": {"ready": ready}}],
    }


def _md(name: str, served: str) -> dict[str, Any]:
    return {
        "apiVersion": "berth.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name},
        "spec": {"model": {"uri": "builtin://smollm2-135m-instruct", "servedName": served}, "capacity": 2},
    }


def _apikey(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "berth.dev/v1alpha1", "kind": "ApiKey", "metadata": {"name": name}, "spec": spec}


@pytest.fixture
def two_namespaces(cluster: Any) -> Iterator[tuple[str, str]]:
    k = cluster.kubectl
    for crd in ("modeldeployments.berth.dev.yaml", "apikeys.berth.dev.yaml"):
        k("apply", "--server-side", "-f", str(ROOT / "crds" / crd), check=True)
    k(
        "wait",
        "--for=condition=Established",
        "crd/apikeys.berth.dev",
        "crd/modeldeployments.berth.dev",
        check=True,
    )
    names = (f"gw-a-{uuid.uuid4().hex[:6]}", f"gw-b-{uuid.uuid4().hex[:6]}")
    for ns in names:
        k("create", "namespace", ns, check=True)
    try:
        yield names
    finally:
        for ns in names:
            k("delete", "namespace", ns, "--wait=false", "--ignore-not-found")


def _chart_gateway_kubeconfig(cluster: Any, ns: str, tmp_path: Path) -> tuple[Path, list[str]]:
    """The chart's gateway ServiceAccount and ClusterRole(Binding) (from `helm template`), and a
    kubeconfig with a token of that ServiceAccount; returns it and the cluster-scoped names to delete."""
    import yaml

    out = subprocess.run(
        [
            str(cluster.bin_dir / "helm"),
            "template",
            "berth",
            str(ROOT / "charts" / "berth"),
            "--namespace",
            ns,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    suffix = uuid.uuid4().hex[:6]
    objs = []
    for doc in yaml.safe_load_all(out):
        if (
            not doc
            or doc["metadata"]["name"] != "berth-gateway"
            or doc["kind"] not in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding")
        ):
            continue
        if doc["kind"] != "ServiceAccount":
            doc["metadata"]["name"] = f"berth-gateway-{suffix}"
        if doc["kind"] == "ClusterRoleBinding":
            doc["roleRef"]["name"] = f"berth-gateway-{suffix}"
        objs.append(doc)
    assert sorted(o["kind"] for o in objs) == ["ClusterRole", "ClusterRoleBinding", "ServiceAccount"]
    apply(cluster, ns, *objs)
    token = cluster.kubectl(
        "create", "token", "berth-gateway", "-n", ns, "--duration=1h", check=True
    ).stdout.strip()
    cfg = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    user = cfg["contexts"][0]["context"]["user"]
    cfg["users"] = [{"name": user, "user": {"token": token}}]
    path = tmp_path / "gateway.kubeconfig"
    path.write_text(json.dumps(cfg))
    return path, [f"clusterrole/berth-gateway-{suffix}", f"clusterrolebinding/berth-gateway-{suffix}"]


def _key(cluster: Any, ns: str, name: str) -> str:
    """Run the operator's ApiKey reconcile and read the key back from the Secret it made."""
    client = KubeClient(cluster.api_client())
    body = get(cluster, ns, "apikey", name)
    assert body is not None
    reconcile_apikey(body, client)
    secret = get(cluster, ns, "secret", f"{name}-apikey")
    assert secret is not None
    return base64.b64decode(secret["data"]["key"]).decode()


def test_gateway_routes_isolates_revokes_and_meters(
    cluster: Any, two_namespaces: tuple[str, str], tmp_path: Path
) -> None:
    ns_a, ns_b = two_namespaces
    addr = _local_address()
    upstreams: list[tuple[Upstream, Server]] = []

    def stand(ns: str, md: str, i: int) -> Upstream:
        up = Upstream(f"{ns}/{md}/{i}", prompt_tokens=4, completion_tokens=6)
        srv = Server(up.app(), host=addr)
        upstreams.append((up, srv))
        apply(cluster, ns, _slice(f"{md}-{i}", md, addr, srv.port))
        return up

    apply(
        cluster,
        ns_a,
        _md("chat", "chat"),
        _md("coder", "coder-7b"),
        _apikey("ci"),
        _apikey("limited", limits={"requestsPerMinute": 2}),
    )
    apply(cluster, ns_b, _md("chat", "chat"), _apikey("ci", models=["chat"]))
    for ns in (ns_a, ns_b):
        for md in ("chat",) + (("coder",) if ns == ns_a else ()):
            for i in range(2):
                stand(ns, md, i)
    key_a, key_b, key_lim = (
        _key(cluster, ns_a, "ci"),
        _key(cluster, ns_b, "ci"),
        _key(cluster, ns_a, "limited"),
    )
    status = (get(cluster, ns_a, "apikey", "ci") or {})["status"]
    assert status["keyHash"] and key_a not in json.dumps(status)

    kubeconfig, cluster_scoped = _chart_gateway_kubeconfig(cluster, ns_a, tmp_path)
    port = free_port()
    master = tmp_path / "master"
    master.write_text("gateway-master\n")
    log = (tmp_path / "gateway.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "berth.cli",
            "gateway",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--namespace",
            ns_a,
            "--namespace",
            ns_b,
            "--usage-flush-seconds",
            "1",
            "--master-key-file",
            str(master),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "KUBECONFIG": str(kubeconfig)},  # the chart's ServiceAccount, not admin
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def up() -> bool:
            assert proc.poll() is None, (tmp_path / "gateway.log").read_text()[-3000:]
            try:
                return httpx.get(url + "/health/ready", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, timeout=60, message="berth gateway up")

        def call(key: str, model: str) -> httpx.Response:
            return httpx.post(
                url + "/v1/chat/completions",
                json={"model": model, "messages": []},
                headers={"Authorization": f"Bearer {key}"},
                timeout=10,
            )

        # routing: full and bare names, balanced over both instances
        served = [
            call(key_a, m).json()["served_by"] for m in ("chat", f"{ns_a}/chat", "chat", f"{ns_a}/chat")
        ]
        assert sorted(served) == sorted([f"{ns_a}/chat/0", f"{ns_a}/chat/1"] * 2)
        assert call(key_a, "coder-7b").json()["served_by"].startswith(f"{ns_a}/coder/")
        assert call(key_b, "chat").json()["served_by"].startswith(f"{ns_b}/chat/")
        # isolation: another namespace's model is a 404 like a missing one
        for key, model in (
            (key_a, f"{ns_b}/chat"),
            (key_b, f"{ns_a}/chat"),
            (key_b, "coder-7b"),
            (key_a, "nothing"),
        ):
            r = call(key, model)
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", (model, r.text)
        models = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {key_b}"}).json()
        assert [m["id"] for m in models["data"]] == [f"{ns_b}/chat"]
        # quota from the ApiKey's spec
        assert [call(key_lim, "chat").status_code for _ in range(3)] == [200, 200, 429]
        # an endpoint going unready leaves the rotation
        apply(cluster, ns_a, _slice("chat-1", "chat", addr, upstreams[1][1].port, ready=False))
        before = len(upstreams[1][0].requests)
        time.sleep(1.0)
        for _ in range(4):
            assert call(key_a, "chat").status_code == 200
        assert len(upstreams[1][0].requests) == before

        # usage in ApiKey.status: 4 + 1 + 1 + 4 requests of 4 + 6 tokens for key_a (the 404s do not count)
        def usage() -> Any:
            u = ((get(cluster, ns_a, "apikey", "ci") or {}).get("status") or {}).get("usage") or {}
            return u if u.get("requests") == 9 else None

        u = wait_for(usage, timeout=15, message="usage flushed to ApiKey.status")
        assert (u["promptTokens"], u["completionTokens"]) == (36, 54) and u["lastUsed"]
        # revocation: disable, then delete, each within 5 s
        cluster.kubectl(
            "patch",
            "apikey",
            "ci",
            "-n",
            ns_b,
            "--type=merge",
            "-p",
            '{"spec":{"disabled":true}}',
            check=True,
        )
        t0 = time.monotonic()
        wait_for(
            lambda: call(key_b, "chat").status_code == 401,
            timeout=5,
            interval=0.1,
            message="disabled key refused",
        )
        disabled_after = time.monotonic() - t0
        cluster.kubectl("delete", "apikey", "ci", "-n", ns_a, check=True)
        wait_for(
            lambda: call(key_a, "chat").status_code == 401,
            timeout=5,
            interval=0.1,
            message="deleted key refused",
        )
        print(f"revocation by disable took {disabled_after:.2f} s")
    finally:
        proc.terminate()
        proc.wait(20)
        cluster.kubectl("delete", *cluster_scoped, "--ignore-not-found")
        for _, srv in upstreams:
            srv.stop()


def test_gateway_wakes_a_deployment_at_zero(
    cluster: Any, two_namespaces: tuple[str, str], tmp_path: Path
) -> None:
    """capacity 0 + autoscaling: the request scales it to 1 through /scale within 2 s and is held until
    an endpoint is ready, then answered."""
    import threading

    ns, _ = two_namespaces
    addr = _local_address()
    zero = _md("sleepy", "sleepy")
    zero["spec"].update(capacity=0, autoscaling={"enabled": True, "minCapacity": 0, "maxCapacity": 2})
    apply(cluster, ns, zero, _apikey("ci"))
    key = _key(cluster, ns, "ci")
    kubeconfig, cluster_scoped = _chart_gateway_kubeconfig(cluster, ns, tmp_path)  # /scale by its RBAC
    port = free_port()
    log = (tmp_path / "gateway.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "berth.cli",
            "gateway",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--namespace",
            ns,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "KUBECONFIG": str(kubeconfig)},
    )
    url = f"http://127.0.0.1:{port}"
    up = Upstream("sleepy/0")
    srv = Server(up.app(), host=addr)
    try:

        def ready() -> bool:
            assert proc.poll() is None, (tmp_path / "gateway.log").read_text()[-3000:]
            try:
                return httpx.get(url + "/health/ready", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, timeout=60, message="berth gateway up")
        result: dict[str, Any] = {}

        def call() -> None:
            r = httpx.post(
                url + "/v1/chat/completions",
                json={"model": "sleepy", "messages": []},
                headers={"Authorization": f"Bearer {key}"},
                timeout=60,
            )
            result["status"], result["body"] = r.status_code, r.json()

        t = threading.Thread(target=call)
        t0 = time.monotonic()
        t.start()
        wait_for(
            lambda: (get(cluster, ns, "md", "sleepy") or {})["spec"].get("capacity") == 1,
            timeout=2,
            interval=0.05,
            message="capacity woken to 1",
        )
        woke_after = time.monotonic() - t0
        time.sleep(0.5)
        assert t.is_alive() and not result  # held
        apply(cluster, ns, _slice("sleepy-0", "sleepy", addr, srv.port))
        t.join(20)
        assert result["status"] == 200 and result["body"]["served_by"] == "sleepy/0"
        print(f"woken after {woke_after:.2f} s")
    finally:
        proc.terminate()
        proc.wait(20)
        srv.stop()
        cluster.kubectl("delete", *cluster_scoped, "--ignore-not-found")
