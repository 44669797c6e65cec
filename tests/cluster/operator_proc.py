"""Run the real `berth operator` against a test cluster with the chart's ServiceAccount permissions.

The chart's RBAC objects (from `helm template charts/berth`) are applied, a token for its
ServiceAccount is requested through the TokenRequest API, and the operator process talks to the API
server with that token only, so a rule missing from the chart fails the tests.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "berth"
OPERATOR_NAMESPACE = "berth-system"
RBAC_KINDS = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def render_chart(cluster: Any, *values: str) -> list[dict[str, Any]]:
    """`helm template` of the chart (the release in berth-system), as objects."""
    helm = Path(cluster.bin_dir) / "helm"
    args = [str(helm), "template", "berth", str(CHART), "--namespace", OPERATOR_NAMESPACE]
    for v in values:
        args += ["--set", v]
    out = subprocess.run(args, capture_output=True, text=True, check=True, timeout=60).stdout
    return [d for d in yaml.safe_load_all(out) if d]


class OperatorProcess:
    """`python -m berth.cli operator` with a ServiceAccount token kubeconfig; logs in `log_path`."""

    def __init__(self, cluster: Any, workdir: Path, env: dict[str, str] | None = None) -> None:
        self.cluster = cluster
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "operator.log"
        self.metrics_port = _free_port()
        self.health_port = _free_port()
        self.extra_env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.service_account = ""
        self.kubeconfig = workdir / "operator.kubeconfig"

    @property
    def user(self) -> str:
        return f"system:serviceaccount:{OPERATOR_NAMESPACE}:{self.service_account}"

    def install(self) -> None:
        """CRD, operator namespace, and the chart's RBAC; then a token kubeconfig for its ServiceAccount."""
        k = self.cluster.kubectl
        k("apply", "--server-side", "-f", str(ROOT / "crds" / "modeldeployments.berth.dev.yaml"), check=True)
        k(
            "wait",
            "--for=condition=Established",
            "crd/modeldeployments.berth.dev",
            "--timeout=60s",
            check=True,
        )
        if k("get", "namespace", OPERATOR_NAMESPACE).returncode != 0:
            k("create", "namespace", OPERATOR_NAMESPACE, check=True)
        rbac = [o for o in render_chart(self.cluster) if o.get("kind") in RBAC_KINDS]
        accounts = [
            o
            for o in rbac
            if o["kind"] == "ServiceAccount"
            and (o["metadata"].get("labels") or {}).get("app.kubernetes.io/component") == "operator"
        ]
        assert len(accounts) == 1, f"the chart should render one operator ServiceAccount, got {accounts}"
        self.service_account = accounts[0]["metadata"]["name"]
        k(
            "apply",
            "-f",
            "-",
            input=json.dumps({"apiVersion": "v1", "kind": "List", "items": rbac}),
            check=True,
        )
        token = k(
            "create", "token", self.service_account, "-n", OPERATOR_NAMESPACE, "--duration=4h", check=True
        ).stdout.strip()
        admin = yaml.safe_load(Path(self.cluster.kubeconfig).read_text())
        cluster_entry = admin["clusters"][0]["cluster"]
        ca = cluster_entry.get("certificate-authority-data")
        if ca is None and cluster_entry.get("certificate-authority"):
            ca = base64.b64encode(Path(cluster_entry["certificate-authority"]).read_bytes()).decode()
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "test",
                    "cluster": {"server": cluster_entry["server"], "certificate-authority-data": ca},
                }
            ],
            "users": [{"name": "operator", "user": {"token": token}}],
            "contexts": [{"name": "test-operator", "context": {"cluster": "test", "user": "operator"}}],
            "current-context": "test-operator",
        }
        self.kubeconfig.write_text(yaml.safe_dump(config))

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BERTH_")}
        env.update(
            {
                "KUBECONFIG": str(self.kubeconfig),
                "BERTH_METRICS_PORT": str(self.metrics_port),
                "BERTH_HEALTH_PORT": str(self.health_port),
                "BERTH_OPERATOR_NAMESPACE": OPERATOR_NAMESPACE,
                "BERTH_RESYNC_SECONDS": "3",
                "BERTH_DEGRADED_GRACE_SECONDS": "5",
                "BERTH_AUTOSCALE_INTERVAL_SECONDS": "2",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 60.0) -> OperatorProcess:
        with self.log_path.open("ab") as log:
            log.write(f"\n==== start {time.strftime('%H:%M:%S')} ====\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "berth.cli", "operator", "--verbose"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env(),
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"berth operator exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"berth operator not healthy after {timeout}s:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL: no chance to clean up (as a crashed or evicted pod)."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def metrics(self) -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}"] = float(s.value)
        return out

    def writes(self) -> float:
        """Write requests (POST/PUT/PATCH/DELETE) the operator has made, from its own metric."""
        return sum(
            v
            for k, v in self.metrics().items()
            if k.startswith("berth_operator_api_requests_total{")
            and any(f"verb={verb}" in k for verb in ("POST", "PUT", "PATCH", "DELETE"))
        )

    @classmethod
    @contextlib.contextmanager
    def running(
        cls, cluster: Any, workdir: Path, env: dict[str, str] | None = None
    ) -> Iterator[OperatorProcess]:
        """Install (CRD, RBAC, token), start, yield, stop."""
        op = cls(cluster, workdir, env)
        op.install()
        op.start()
        try:
            yield op
        finally:
            op.stop()

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
