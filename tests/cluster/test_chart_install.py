"""The Helm chart against a real API server: install, upgrade (the CRD changes), uninstall (nothing left).

Release `berth-chart` in its own namespace, so its cluster-scoped names (berth-chart-operator ...) never
clash with the RBAC other cluster tests apply. The ModelDeployment CRD is cluster-wide: when another
test applied it already, it is handed to the release for the test and re-applied afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import wait_for

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "berth"
CRD_FILE = ROOT / "crds" / "modeldeployments.berth.dev.yaml"
RELEASE = "berth-chart"
NS = "berth-chart-test"
CRD = "modeldeployments.berth.dev"
APIKEY_CRD = "apikeys.berth.dev"
APIKEY_CRD_FILE = ROOT / "crds" / "apikeys.berth.dev.yaml"
PEERING_CRDS = ("clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev")


def helm(cluster: Any, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "KUBECONFIG": str(cluster.kubeconfig),
        "HELM_CACHE_HOME": "/tmp/berth-helm-cache",
        "HELM_CONFIG_HOME": "/tmp/berth-helm-config",
        "HELM_DATA_HOME": "/tmp/berth-helm-data",
    }
    ctx = [f"--kube-context={cluster.context}"] if getattr(cluster, "context", None) else []
    r = subprocess.run(
        [str(Path(cluster.bin_dir) / "helm"), *ctx, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    if check and r.returncode != 0:
        pytest.fail(f"helm {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def get(cluster: Any, *args: str) -> dict[str, Any] | None:
    r = cluster.kubectl("get", *args, "-o", "json")
    return json.loads(r.stdout) if r.returncode == 0 else None


def released(cluster: Any, kind: str) -> list[str]:
    """Names of objects of `kind` labelled as this release's (all namespaces)."""
    r = cluster.kubectl("get", kind, "-A", "-l", f"app.kubernetes.io/instance={RELEASE}", "-o", "json")
    assert r.returncode == 0, r.stderr
    return [i["metadata"]["name"] for i in json.loads(r.stdout)["items"]]


def established(crd: dict[str, Any] | None) -> bool:
    conds = ((crd or {}).get("status") or {}).get("conditions") or []
    return any(c["type"] == "Established" and c["status"] == "True" for c in conds)


@pytest.fixture(scope="module")
def crd_handover(cluster: Any) -> Iterator[None]:
    """Let the release own the CRDs for this module; put the committed CRDs back afterwards."""
    files = {CRD: CRD_FILE, APIKEY_CRD: APIKEY_CRD_FILE}
    existed = [name for name in files if get(cluster, "crd", name) is not None]
    for name in existed:
        cluster.kubectl("delete", "crd", name, "--wait=true", "--timeout=60s", check=True)
    try:
        yield
    finally:
        helm(cluster, "uninstall", RELEASE, "--namespace", NS, "--wait", check=False)
        cluster.kubectl("delete", "namespace", NS, "--ignore-not-found", "--wait=false")
        for name in existed:
            wait_for(lambda n=name: get(cluster, "crd", n) is None, timeout=60, message=f"CRD {name} gone")  # type: ignore[misc]
            cluster.kubectl("apply", "-f", str(files[name]), check=True)
            wait_for(
                lambda n=name: established(get(cluster, "crd", n)), timeout=30, message="CRD re-established"
            )  # type: ignore[misc]


def test_install_upgrade_uninstall(cluster: Any, crd_handover: None, tmp_path: Path) -> None:
    # ---- install: CRD, RBAC, ServiceAccount, operator Deployment
    helm(cluster, "install", RELEASE, str(CHART), "--namespace", NS, "--create-namespace")
    wait_for(
        lambda: established(get(cluster, "crd", CRD)), timeout=30, message="ModelDeployment CRD established"
    )
    crd = get(cluster, "crd", CRD)
    assert crd is not None
    committed = yaml.safe_load(CRD_FILE.read_text())
    assert crd["spec"]["versions"][0]["schema"] == committed["spec"]["versions"][0]["schema"]
    assert crd["metadata"]["annotations"]["meta.helm.sh/release-name"] == RELEASE

    assert sorted(released(cluster, "clusterroles")) == [
        f"{RELEASE}-gateway",
        f"{RELEASE}-operator",
        f"{RELEASE}-operator-cluster",
    ]
    assert sorted(released(cluster, "clusterrolebindings")) == [
        f"{RELEASE}-gateway",
        f"{RELEASE}-operator",
        f"{RELEASE}-operator-cluster",
    ]
    # The gateway: Service berth-gateway; it may watch what it routes by and nothing more.
    assert get(cluster, "service", "berth-gateway", "-n", NS) is not None
    assert get(cluster, "deployment", f"{RELEASE}-gateway", "-n", NS) is not None
    gw_who = f"--as=system:serviceaccount:{NS}:{RELEASE}-gateway"
    for verb, resource, extra, want in (
        ("watch", "endpointslices.discovery.k8s.io", (), "yes"),
        ("watch", "apikeys.berth.dev", (), "yes"),
        ("patch", "modeldeployments.berth.dev", ("--subresource=scale",), "yes"),
        ("patch", "apikeys.berth.dev", ("--subresource=status",), "yes"),
        ("get", "secrets", (), "no"),
        ("patch", "modeldeployments.berth.dev", (), "no"),
    ):
        r = cluster.kubectl("auth", "can-i", verb, resource, *extra, gw_who, "-n", "default")
        assert r.stdout.strip() == want, (verb, resource, extra, r.stdout, r.stderr)
    sa = get(cluster, "serviceaccount", RELEASE, "-n", NS)
    assert sa is not None
    dep = get(cluster, "deployment", f"{RELEASE}-operator", "-n", NS)
    assert dep is not None
    pod = dep["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == RELEASE
    assert pod["containers"][0]["args"] == ["operator"]
    assert get(cluster, "service", f"{RELEASE}-operator-metrics", "-n", NS) is not None
    # The bound permissions are what the operator needs, as the API server evaluates them.
    who = f"--as=system:serviceaccount:{NS}:{RELEASE}"
    for verb, resource in (
        ("patch", "modeldeployments.berth.dev/status"),
        ("patch", "modeldeployments.berth.dev/scale"),
        ("create", "deployments.apps"),
        ("watch", "pods"),
        ("create", "events"),
    ):
        r = cluster.kubectl("auth", "can-i", verb, resource, who, "-n", "default")
        assert r.stdout.strip() == "yes", (verb, resource, r.stdout, r.stderr)
    for verb, resource in (
        ("list", "secrets"),
        ("delete", "deployments.apps"),
        ("update", "modeldeployments.berth.dev"),
    ):
        r = cluster.kubectl("auth", "can-i", verb, resource, who, "-n", "default")
        assert r.stdout.strip() == "no", (verb, resource, r.stdout)

    # A ModelDeployment is accepted by the installed CRD (defaults applied at admission).
    cluster.kubectl("apply", "-n", NS, "-f", str(ROOT / "examples" / "smollm2-cpu.yaml"), check=True)
    md = get(cluster, "modeldeployment", "smollm2", "-n", NS)
    assert md is not None and md["spec"]["autoscaling"]["maxCapacity"] == 4

    # ---- upgrade with a changed CRD field (a modified copy of the chart) and two replicas (peering)
    chart = tmp_path / "berth"
    shutil.copytree(CHART, chart)
    template = chart / "templates" / "crds" / "modeldeployments.berth.dev.yaml"
    text = template.read_text()
    assert "description: Lifecycle phase\n" in text
    template.write_text(
        text.replace("description: Lifecycle phase\n", "description: Lifecycle phase (upgraded)\n")
    )
    helm(cluster, "upgrade", RELEASE, str(chart), "--namespace", NS, "--set", "replicaCount=2")

    def column_description() -> str | None:
        c = get(cluster, "crd", CRD) or {}
        cols = c.get("spec", {}).get("versions", [{}])[0].get("additionalPrinterColumns", [])
        return next((col.get("description") for col in cols if col["name"] == "Phase"), None)

    wait_for(lambda: column_description() == "Lifecycle phase (upgraded)", timeout=30, message="CRD upgraded")
    assert get(cluster, "modeldeployment", "smollm2", "-n", NS) is not None  # data survives a CRD upgrade
    for name in PEERING_CRDS:
        wait_for(
            lambda n=name: established(get(cluster, "crd", n)), timeout=30, message=f"{name} established"
        )
    assert get(cluster, "clusterkopfpeering", "berth") is not None
    dep = get(cluster, "deployment", f"{RELEASE}-operator", "-n", NS)
    assert dep is not None and dep["spec"]["replicas"] == 2
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["BERTH_PEERING"] == "berth"
    r = cluster.kubectl("auth", "can-i", "patch", "clusterkopfpeerings.kopf.dev", who)
    assert r.stdout.strip() == "yes", r.stdout + r.stderr

    # ---- uninstall: nothing of the chart is left
    helm(cluster, "uninstall", RELEASE, "--namespace", NS, "--wait")
    for name in (CRD, *PEERING_CRDS):
        wait_for(lambda n=name: get(cluster, "crd", n) is None, timeout=60, message=f"CRD {name} deleted")
    for kind in (
        "clusterroles",
        "clusterrolebindings",
        "deployments",
        "services",
        "serviceaccounts",
        "configmaps",
    ):
        assert released(cluster, kind) == [], kind
    assert get(cluster, "serviceaccount", RELEASE, "-n", NS) is None
    assert helm(cluster, "list", "--namespace", NS, "-q").stdout.strip() == ""
