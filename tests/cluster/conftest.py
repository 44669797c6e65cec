"""pytest integration of the cluster harness (see docs/cluster.md).

Options:
  --cluster=local        (default) start a LocalCluster from tools/cluster binaries, once per session
  --cluster=kind         a kind cluster through pytest-kind (needs Docker); skipped otherwise
  --kubeconfig=PATH      use an existing cluster; its current context must look like a test cluster

Fixtures:
  cluster        session: .kubeconfig, .kubectl(*args), .api_client(), .bin_dir, .kind ("local" | ...)
  local_cluster  session: the LocalCluster itself (add_gpu_node, restart_apiserver, audit_writes);
                 skips the test on other clusters
  namespace      function: a fresh namespace (name returned) deleted after the test
Every test under tests/cluster gets the `cluster` marker.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

try:  # tests/cluster as a package (tests.cluster.harness) or as a rootdir-less directory
    from tests.cluster import harness
    from tests.prerequisites import unavailable
except ImportError:  # pragma: no cover - depends on pytest's import mode
    sys.path.insert(0, str(Path(__file__).parent))
    sys.path.insert(0, str(Path(__file__).parents[1]))
    import harness  # type: ignore[no-redef]

    from prerequisites import unavailable  # type: ignore[no-redef]

HERE = Path(__file__).parent
TEST_CONTEXT = re.compile(r"kind|kwok|test|local|minikube", re.IGNORECASE)


def pytest_addoption(parser: pytest.Parser) -> None:
    harness.add_pytest_options(parser)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.cluster)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build the control-plane binaries before any test runs when cluster tests were selected:
    a build takes many minutes and must not count against a test's timeout."""
    if session.config.getoption("--collect-only"):
        return
    wants = any(item.get_closest_marker("cluster") for item in session.items)
    kubeconfig, mode = harness.cluster_options(session.config)
    if not wants or (mode == "kind" and not kubeconfig):
        return
    if harness.binaries_present(harness.default_bin_dir()):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(
            f"building the local cluster binaries into {harness.default_bin_dir()} "
            "(tools/cluster/build.sh; once, long on a small machine)"
        )
    try:
        harness.ensure_binaries(build=True, stream=sys.stderr)
    except (OSError, subprocess.CalledProcessError) as e:  # the cluster fixture reports it per test
        if reporter is not None:
            reporter.write_line(f"cluster binaries could not be built: {e}")


class ExternalCluster:
    """A cluster this session did not start (--kubeconfig, or kind): same interface as
    LocalCluster's kubectl/api_client/kubeconfig/bin_dir, without the local-only helpers."""

    def __init__(self, kubeconfig: Path, bin_dir: Path, kind: str, context: str | None = None) -> None:
        self.kubeconfig = kubeconfig
        self.bin_dir = bin_dir
        self.kind = kind
        self.context = context

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = False, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        ctx = [f"--context={self.context}"] if self.context else []
        return harness.run_kubectl(
            self.bin_dir, self.kubeconfig, [*ctx, *args], input=input, check=check, timeout=timeout
        )

    def api_client(self) -> Any:
        return harness.make_api_client(self.kubeconfig, context=self.context)


def _current_context(kubeconfig: Path) -> str:
    import yaml  # PyYAML is a runtime dependency of berth

    cfg = yaml.safe_load(kubeconfig.read_text()) or {}
    return str(cfg.get("current-context") or "")


def _bin_dir_or_skip() -> Path:
    """The binaries; a skip without them, a failure under CI=true or `make test` (tests/prerequisites.py)."""
    try:
        return harness.ensure_binaries(build=False)
    except FileNotFoundError as e:
        unavailable(f"local cluster binaries unavailable: {e}")


@pytest.fixture(scope="session")
def cluster(request: pytest.FixtureRequest) -> Iterator[Any]:
    """The cluster under test (a LocalCluster by default). Has .kubeconfig, .kubectl(*args),
    .api_client(), .bin_dir and .kind."""
    kubeconfig_opt, mode = harness.cluster_options(request.config)

    if kubeconfig_opt:
        path = Path(kubeconfig_opt).expanduser()
        context = _current_context(path)
        if not TEST_CONTEXT.search(context):
            pytest.exit(
                f"refusing --kubeconfig {path}: context {context!r} does not look like a test cluster "
                "(its name must contain kind, kwok, test, local or minikube)",
                returncode=4,
            )
        yield ExternalCluster(path, _bin_dir_or_skip(), kind="kubeconfig", context=context)
        return

    if mode == "kind":
        if importlib.util.find_spec("pytest_kind") is None:
            unavailable("--cluster=kind needs the pytest-kind package (pip install pytest-kind)")
        docker = shutil.which("docker")
        if docker is None or subprocess.run([docker, "info"], capture_output=True).returncode != 0:
            unavailable("--cluster=kind needs a working Docker engine (`docker info` failed or no docker)")
        from pytest_kind import KindCluster

        kind_cluster = KindCluster(os.environ.get("BERTH_KIND_CLUSTER", "berth-test"))
        kind_cluster.create()
        try:
            yield ExternalCluster(
                Path(kind_cluster.kubeconfig_path),
                _bin_dir_or_skip(),
                kind="kind",
                context=f"kind-{kind_cluster.name}",
            )
        finally:
            if os.environ.get("BERTH_CLUSTER_KEEP") != "1":
                kind_cluster.delete()
        return

    bin_dir = _bin_dir_or_skip()
    with harness.LocalCluster(bin_dir=bin_dir) as local:
        yield local


@pytest.fixture(scope="session")
def local_cluster(cluster: Any) -> Any:
    """The LocalCluster (simulated GPU nodes, apiserver restart, audit log); skips elsewhere."""
    if getattr(cluster, "kind", None) != "local":
        pytest.skip("needs the local control plane (--cluster=local without --kubeconfig)")
    return cluster


def wait_for(
    predicate: Any, timeout: float = 30.0, interval: float = 0.25, message: str = "condition"
) -> Any:
    """Poll predicate() until it returns a truthy value (returned) or fail after timeout."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {message} (last: {last!r})")


@pytest.fixture
def namespace(cluster: Any, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace for one test (its `default` ServiceAccount exists), deleted afterwards."""
    base = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    name = f"t-{base}-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", name, check=True)
    wait_for(
        lambda: cluster.kubectl("get", "serviceaccount", "default", "-n", name).returncode == 0,
        timeout=30,
        message=f"ServiceAccount default in {name}",
    )
    try:
        yield name
    finally:
        with contextlib.suppress(Exception):
            cluster.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found")


def kubectl_json(cluster: Any, *args: str) -> Any:
    """kubectl ... -o json, parsed; fails the test on a kubectl error."""
    r = cluster.kubectl(*args, "-o", "json")
    if r.returncode != 0:
        pytest.fail(f"kubectl {' '.join(args)} failed: {r.stderr}")
    return json.loads(r.stdout)


@pytest.fixture
def kjson(cluster: Any) -> Any:
    """kjson("get", "pods", "-n", ns) -> parsed JSON (kubectl ... -o json)."""

    def call(*args: str) -> Any:
        return kubectl_json(cluster, *args)

    return call


__all__: Sequence[str] = ("ExternalCluster", "kubectl_json", "wait_for")
