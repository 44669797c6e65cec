"""Autoscaling end to end: the operator reads real `berth serve` processes standing behind simulated pods.

kwok gives pods IPs on loopback (the harness's pod CIDR), so for every pod of the ModelDeployment the
test starts one real server on that pod's IP and the server port; the operator scrapes each ready
pod's /metrics exactly as in a cluster. Load is real streaming requests on the servers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .operator_proc import OperatorProcess, _free_port
from .test_operator import apply, condition, get, md, running, wait_md

pytestmark = pytest.mark.slow


class PodServers:
    """One `berth serve` per pod IP (started as pods appear, stopped when they go)."""

    def __init__(self, port: int, logdir: Path) -> None:
        self.port = port
        self.logdir = logdir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def sync(self, pods: list[dict[str, Any]]) -> None:
        ips = {p["status"].get("podIP") for p in pods if (p.get("status") or {}).get("podIP")}
        for ip in sorted(ips - set(self.procs)):
            assert ip.startswith("127."), (
                f"pod IP {ip} is not on loopback: the harness must give loopback pod IPs"
            )
            log = (self.logdir / f"server-{ip}.log").open("wb")
            self.procs[ip] = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "berth.cli",
                    "serve",
                    "--host",
                    ip,
                    "--port",
                    str(self.port),
                    "--served-model-name",
                    "scaled",
                    "--max-num-seqs",
                    "4",
                    "--max-queue",
                    "64",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
        for ip in sorted(set(self.procs) - ips):
            self.procs.pop(ip).terminate()

    def ready(self, ip: str) -> bool:
        try:
            return httpx.get(f"http://{ip}:{self.port}/health/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        for p in self.procs.values():
            p.terminate()
        for p in self.procs.values():
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture(scope="module")
def server_port() -> int:
    return _free_port()


@pytest.fixture(scope="module")
def operator(
    cluster: Any, tmp_path_factory: pytest.TempPathFactory, server_port: int
) -> Iterator[OperatorProcess]:
    env = {"BERTH_SERVER_PORT": str(server_port)}
    with OperatorProcess.running(cluster, tmp_path_factory.mktemp("operator-autoscale"), env) as op:
        yield op


def _pods(cluster: Any, ns: str, name: str) -> list[dict[str, Any]]:
    out = cluster.kubectl(
        "get", "pods", "-n", ns, "-l", f"berth.dev/model-deployment={name}", "-o", "json", check=True
    ).stdout
    return [p for p in json.loads(out)["items"] if not p["metadata"].get("deletionTimestamp")]


def _stream(url: str, stop: threading.Event, tokens: int) -> None:
    body = {
        "model": "scaled",
        "prompt": "Count to one hundred:",
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    while not stop.is_set():
        try:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
                for _ in r.iter_lines():
                    if stop.is_set():
                        break
        except httpx.HTTPError:
            time.sleep(0.2)


def test_load_raises_capacity_and_idling_lowers_it(
    cluster: Any, operator: OperatorProcess, namespace: str, server_port: int, tmp_path: Path
) -> None:
    apply(
        cluster,
        namespace,
        md(
            "scaled",
            capacity=1,
            auth={"mode": "none"},
            autoscaling={
                "enabled": True,
                "minCapacity": 1,
                "maxCapacity": 3,
                "targetInFlightPerInstance": 2,
                "scaleDownDelaySeconds": 8,
            },
        ),
    )
    wait_md(cluster, operator, namespace, "scaled", running(1), "Running with 1")
    servers = PodServers(server_port, tmp_path)
    stop = threading.Event()
    workers: list[threading.Thread] = []
    try:
        (pod,) = _pods(cluster, namespace, "scaled")
        servers.sync([pod])
        ip = pod["status"]["podIP"]
        deadline = time.monotonic() + 300
        while not servers.ready(ip):
            assert time.monotonic() < deadline, "server behind the pod never became ready"
            time.sleep(1)
        # 6 streams in flight on the one instance: 6 / 2 per instance -> capacity 3
        for _ in range(6):
            t = threading.Thread(target=_stream, args=(f"http://{ip}:{server_port}", stop, 400), daemon=True)
            t.start()
            workers.append(t)
        got = wait_md(
            cluster,
            operator,
            namespace,
            "scaled",
            lambda s: s.get("desiredCapacity") == 3,
            "desiredCapacity 3 under load",
            timeout=120,
        )
        assert got["spec"]["capacity"] == 3
        assert got["status"].get("lastScaleTime")
        events = json.loads(
            cluster.kubectl(
                "get",
                "events",
                "-n",
                namespace,
                "--field-selector",
                "involvedObject.name=scaled",
                "-o",
                "json",
                check=True,
            ).stdout
        )["items"]
        scaled = [e["message"] for e in events if e["reason"] == "Autoscaled"]
        assert any("over target 2 per instance -> capacity 3" in m for m in scaled), scaled
        servers.sync(_pods(cluster, namespace, "scaled"))
        wait_md(cluster, operator, namespace, "scaled", running(3), "Running with 3")
        metrics = operator.metrics()
        assert metrics[f"berth_operator_desired_capacity{{name=scaled,namespace={namespace}}}"] == 3.0

        # idle: after the scale-down delay, back to minCapacity
        stop.set()
        got = wait_md(
            cluster,
            operator,
            namespace,
            "scaled",
            lambda s: s.get("desiredCapacity") == 1,
            "desiredCapacity back to 1 when idle",
            timeout=120,
        )
        assert got["spec"]["capacity"] == 1
        wait_md(cluster, operator, namespace, "scaled", running(1), "Running with 1 after scale-down")
    finally:
        stop.set()
        servers.stop()

    # autoscaling off: kubectl scale is the user's and stays
    patch = json.dumps({"spec": {"autoscaling": {"enabled": False}}})
    cluster.kubectl("patch", "md", "scaled", "-n", namespace, "--type=merge", "-p", patch, check=True)
    cluster.kubectl("scale", "md/scaled", "-n", namespace, "--replicas=2", check=True)
    wait_md(cluster, operator, namespace, "scaled", running(2), "Running with 2 by hand")
    time.sleep(6)  # three autoscaler intervals
    current = get(cluster, namespace, "md", "scaled") or {}
    assert current["spec"]["capacity"] == 2
    assert condition(current["status"], "Ready")["status"] == "True"


def test_zero_is_idle_with_endpoint(
    cluster: Any, operator: OperatorProcess, namespace: str, server_port: int, tmp_path: Path
) -> None:
    apply(
        cluster,
        namespace,
        md(
            "sleepy",
            capacity=1,
            auth={"mode": "none"},
            autoscaling={"enabled": True, "minCapacity": 0, "maxCapacity": 2, "scaleDownDelaySeconds": 2},
        ),
    )
    wait_md(cluster, operator, namespace, "sleepy", running(1), "Running with 1")
    servers = PodServers(server_port, tmp_path)
    try:
        # a ready pod that does not answer counts as loaded; with its server up and idle, it scales to 0
        servers.sync(_pods(cluster, namespace, "sleepy"))
        got = wait_md(
            cluster,
            operator,
            namespace,
            "sleepy",
            lambda s: s.get("phase") == "Idle",
            "Idle at capacity 0 with no load",
            timeout=300,
        )
    finally:
        servers.stop()
    assert got["spec"]["capacity"] == 0
    assert got["status"]["endpoint"] == f"http://sleepy.{namespace}.svc.cluster.local/v1"
    assert condition(got["status"], "Degraded")["status"] == "False"
    assert (get(cluster, namespace, "deployment", "sleepy") or {})["spec"]["replicas"] == 0
