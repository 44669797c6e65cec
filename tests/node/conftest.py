"""End-to-end tests on real containers (docs/cluster.md, "A real node").

Prerequisites: root, a Docker engine with the images of `make images`, the control-plane binaries
(`make cluster-bin`) and the node binaries (`make node-bin`). Where one is missing the tests skip
with the reason, except under CI=true, where a missing prerequisite or a node that does not start
fails them (CI installs and builds everything first: .ci/run).

Fixtures:
  images         session: the image references (operator, server-cpu) as the chart names them
  node_cluster   session: a RealNodeCluster (control plane + kwok + the real node berth-node-0) with
                 the images loaded and the chart installed from charts/berth (release `berth` in
                 namespace berth-system), the operator running as its pod
Every test here gets the `node` marker.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster import harness, realnode

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
CHART = ROOT / "charts" / "berth"
RELEASE = "berth"
OPERATOR_NS = "berth-system"
IN_CI = os.environ.get("CI", "").lower() == "true"
# Operator settings for the tests, through the chart's values: a lost instance reads Degraded after
# 3 s (not 2 min), and the level-triggered resync runs every 5 s.
# The gateway is on, as the chart's default (its pods run from the operator image).
HELM_VALUES = {"reconcile": {"degradedGraceSeconds": 3, "resyncSeconds": 5}}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.node)


def unavailable(reason: str) -> None:
    """Skip, or fail under CI=true: CI builds every prerequisite, so a missing one is a failure there."""
    if IN_CI:
        pytest.fail(f"real-node prerequisite missing under CI=true: {reason}")
    pytest.skip(reason)


def chart_image(values: dict[str, Any], key: str | None) -> str:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    image = values["image"] if key is None else values["server"][key]
    return f"{image['repository']}:{image['tag'] or chart['appVersion']}"


@pytest.fixture(scope="session")
def images() -> dict[str, str]:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    return {"operator": chart_image(values, None), "server-cpu": chart_image(values, "cpuImage")}


def docker_ok() -> bool:
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def docker_images(images: dict[str, str]) -> dict[str, str]:
    """The images, present in the local Docker engine (else skip / fail under CI)."""
    if not docker_ok():
        unavailable("no Docker engine answers `docker info` (tools/docker/engine.sh start)")
    missing = [ref for ref in images.values() if realnode.docker_image_id(ref) is None]
    if missing:
        unavailable(f"images not built: {', '.join(missing)} (make images)")
    return images


def helm(
    cluster: Any, *args: str, check: bool = True, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "KUBECONFIG": str(cluster.kubeconfig),
        "HELM_CACHE_HOME": str(cluster.workdir / "helm-cache"),
        "HELM_CONFIG_HOME": str(cluster.workdir / "helm-config"),
        "HELM_DATA_HOME": str(cluster.workdir / "helm-data"),
    }
    r = subprocess.run(
        [str(cluster.bin_dir / "helm"), *args], capture_output=True, text=True, env=env, timeout=timeout
    )
    if check and r.returncode != 0:
        pytest.fail(f"helm {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


@pytest.fixture(scope="session")
def node_cluster(docker_images: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    missing = realnode.node_prerequisites()
    if missing:
        unavailable("a real node needs: " + "; ".join(missing))
    try:
        bin_dir = harness.ensure_binaries(build=False)
        node_bin = realnode.ensure_node_binaries(build=False)
    except FileNotFoundError as e:
        unavailable(str(e))
    cluster = realnode.RealNodeCluster(
        images=list(docker_images.values()), bin_dir=bin_dir, node_bin=node_bin
    )
    try:
        cluster.start()
    except realnode.NodeUnavailable as e:
        unavailable(str(e))
    except Exception as e:
        pytest.fail(f"the real node did not start: {e}")
    try:
        values = tmp_path_factory.mktemp("helm") / "values.yaml"
        values.write_text(yaml.safe_dump(HELM_VALUES))
        t0 = time.monotonic()
        helm(
            cluster,
            "install",
            RELEASE,
            str(CHART),
            "--namespace",
            OPERATOR_NS,
            "--create-namespace",
            "--values",
            str(values),
            "--wait",
            "--timeout",
            "180s",
        )
        cluster.helm_install_seconds = time.monotonic() - t0
        sys.stderr.write(
            f"\nreal node up in {cluster.startup_seconds + (cluster.node_startup_seconds or 0):.0f}s "
            f"(images loaded: {json.dumps({k: round(v) for k, v in cluster.image_load_seconds.items()})}); "
            f"helm install --wait {cluster.helm_install_seconds:.0f}s\n"
        )
        yield cluster
    finally:
        cluster.stop()


def wait_for(predicate: Callable[[], Any], timeout: float, message: str, interval: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {message} (last: {last!r})")


def kjson(cluster: Any, *args: str) -> Any:
    r = cluster.kubectl(*args, "-o", "json")
    if r.returncode != 0:
        pytest.fail(f"kubectl {' '.join(args)}: {r.stderr}")
    return json.loads(r.stdout)


def get_or_none(cluster: Any, *args: str) -> Any:
    r = cluster.kubectl(*args, "-o", "json")
    return json.loads(r.stdout) if r.returncode == 0 else None


@pytest.fixture
def make_namespace(node_cluster: Any) -> Iterator[Callable[[str | None], str]]:
    """make_namespace(name=None) -> a namespace deleted after the test (default: a random name)."""
    made: list[str] = []

    def make(name: str | None = None) -> str:
        ns = name or f"t-{uuid.uuid4().hex[:8]}"
        node_cluster.kubectl("create", "namespace", ns, check=True)
        wait_for(
            lambda: node_cluster.kubectl("get", "serviceaccount", "default", "-n", ns).returncode == 0,
            30,
            f"ServiceAccount default in {ns}",
        )
        made.append(ns)
        return ns

    yield make
    for ns in made:
        with contextlib.suppress(Exception):
            node_cluster.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found")
