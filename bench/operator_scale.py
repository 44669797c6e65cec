"""Operator at scale: N ModelDeployments applied at once, measured against the control plane's own floor.

Runs against the local control plane (tests/cluster/harness.py: real kube-apiserver, controllers and
scheduler, kwok-simulated nodes) and, in the same run and the same way:

1. the **floor**: the N Deployments + Services the operator would create (its own builders, without
   the owner reference) applied directly with one `kubectl apply`, timed until every Deployment has
   its instance available; then deleted (and waited on until gone);
2. the **operator**: the real `berth operator` process under the chart's RBAC; N ModelDeployments
   applied with one `kubectl apply`, timed until every one is Running;
3. **idle**: the operator with N Running ModelDeployments left alone for `--idle` seconds.

The API server's audit log (every request of the operator's ServiceAccount at Metadata level, watches
excluded) gives the requests (reads and writes) from apply to all Running and while idle. Also the
operator's reconciles (its metric) and peak RSS. Results: bench/results/operator-scale-<n>.json and .md.

    python bench/operator_scale.py [--count 200] [--idle 300]      (make bench-operator)
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.cluster import harness  # noqa: E402
from tests.cluster.operator_proc import OPERATOR_NAMESPACE, OperatorProcess  # noqa: E402

from bench.common import RESULTS_DIR, cpu_name, memory_gib, write_results  # noqa: E402

# Every request of the operator's ServiceAccounts (not watches) and, as the harness does, every write
# of everyone else; nothing more, so the audit log costs the floor and the operator runs alike.
AUDIT_POLICY = f"""\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
  - level: None
    verbs: ["watch"]
  - level: Metadata
    userGroups: ["system:serviceaccounts:{OPERATOR_NAMESPACE}"]
  - level: Metadata
    verbs: ["create", "update", "patch", "delete", "deletecollection"]
  - level: None
"""
WRITE_VERBS = {"create", "update", "patch", "delete", "deletecollection"}
SPEC = {"capacity": 1, "resources": {"cpu": "100m", "memory": "256Mi"}}


class BenchCluster(harness.LocalCluster):
    """The local control plane with an audit policy that also logs the operator's reads."""

    def _prepare(self) -> None:
        super()._prepare()
        (self.workdir / "audit-policy.yaml").write_text(AUDIT_POLICY)


def rss_kib(pid: int) -> int:
    """Resident memory of a process and its children, from /proc (KiB)."""
    total = 0
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(c) for c in children]
    except OSError:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def machine() -> dict[str, Any]:
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "memory_gib": memory_gib(),
        "python": platform.python_version(),
    }


def kubectl_json(cluster: harness.LocalCluster, *args: str) -> dict[str, Any]:
    out = cluster.kubectl(*args, "-o", "json", check=True, timeout=300).stdout
    parsed: dict[str, Any] = json.loads(out)
    return parsed


def apply_list(cluster: harness.LocalCluster, items: list[dict[str, Any]]) -> None:
    cluster.kubectl(
        "apply",
        "-f",
        "-",
        input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}),
        check=True,
        timeout=900,
    )


def wait_until(
    count: int, probe: Any, timeout: float, t0: float, label: str
) -> tuple[float | None, int, list[tuple[float, int]]]:
    """Poll `probe()` (how many are done) every 2 s until `count`; (seconds since t0 or None, last, progress)."""
    progress: list[tuple[float, int]] = []
    done = 0
    while time.monotonic() - t0 < timeout:
        done = probe()
        progress.append((round(time.monotonic() - t0, 1), done))
        print(f"\r{label}: {done}/{count} after {time.monotonic() - t0:.0f}s", end="", file=sys.stderr)
        if done >= count:
            print(file=sys.stderr)
            return time.monotonic() - t0, done, progress
        time.sleep(2)
    print(file=sys.stderr)
    return None, done, progress


def floor_objects(count: int, namespace: str) -> list[dict[str, Any]]:
    """What the operator would create for `count` ModelDeployments: its own Deployment and Service."""
    from berth.api.models import ModelDeployment
    from berth.controller import builders
    from berth.controller.settings import OperatorSettings

    settings = OperatorSettings()
    items: list[dict[str, Any]] = []
    for i in range(count):
        md = ModelDeployment.model_validate(
            {
                "apiVersion": "berth.dev/v1alpha1",
                "kind": "ModelDeployment",
                "metadata": {"name": f"md-{i:04d}", "namespace": namespace, "uid": f"floor-{i}"},
                "spec": SPEC,
            }
        )
        for obj in (builders.build_deployment(md, settings), builders.build_service(md)):
            obj["metadata"].pop("ownerReferences", None)  # no owner: the garbage collector would take it
            items.append(obj)
    return items


def run_floor(cluster: harness.LocalCluster, count: int, timeout: float) -> dict[str, Any]:
    ns = "floor"
    cluster.kubectl("create", "namespace", ns, check=True)
    items = floor_objects(count, ns)
    t0 = time.monotonic()
    apply_list(cluster, items)
    applied = time.monotonic() - t0

    def available() -> int:
        deps = kubectl_json(cluster, "get", "deployments", "-n", ns)["items"]
        return sum(1 for d in deps if int((d.get("status") or {}).get("availableReplicas") or 0) >= 1)

    seconds, done, progress = wait_until(count, available, timeout, t0, "floor: Deployments available")
    t_del = time.monotonic()
    cluster.kubectl("delete", "namespace", ns, "--wait=true", "--timeout=900s", check=True, timeout=960)
    return {
        "all_ready_seconds": round(seconds, 1) if seconds is not None else None,
        "ready_at_end": done,
        "apply_seconds": round(applied, 1),
        "objects": len(items),
        "delete_seconds": round(time.monotonic() - t_del, 1),
        "progress": progress,
    }


def _what(event: dict[str, Any]) -> str:
    """The resource (and subresource) an audit event names; a non-resource request by its path."""
    ref = event.get("objectRef") or {}
    if not ref.get("resource"):
        return str(event.get("requestURI", "")).split("?", 1)[0]
    return str(ref["resource"]) + (f"/{ref['subresource']}" if ref.get("subresource") else "")


def operator_requests(events: list[dict[str, Any]], user: str) -> dict[str, Any]:
    mine = [e for e in events if harness.effective_user(e) == user and e.get("verb") != "watch"]
    by = collections.Counter(f"{e.get('verb')} {_what(e)}" for e in mine)
    writes = sum(1 for e in mine if e.get("verb") in WRITE_VERBS)
    lease = sum(1 for e in mine if (e.get("objectRef") or {}).get("resource") == "leases")
    return {
        "total": len(mine),
        "reads": len(mine) - writes,
        "writes": writes,
        "lease": lease,
        "by_verb_resource": dict(by.most_common()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--idle", type=float, default=300, help="seconds of the idle measurement")
    parser.add_argument("--no-floor", action="store_true", help="skip the floor (not for recorded results)")
    parser.add_argument(
        "--operator-env",
        action="append",
        default=[],
        metavar="BERTH_X=VALUE",
        help="an operator setting for this run (repeatable; recorded in the results)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    operator_env = {"BERTH_RESYNC_SECONDS": "30", **dict(e.split("=", 1) for e in args.operator_env)}

    per_node = 250
    nodes = [
        harness.NodeSpec(f"gpu-{i}", gpus=8, cpu="256", memory="2Ti", pods=per_node)
        for i in range(max(4, -(-args.count * 5 // 4 // per_node)))
    ]
    nodes.append(harness.NodeSpec("cpu-0", gpus=0, cpu="256", memory="2Ti", pods=per_node))
    with BenchCluster(nodes=nodes) as cluster, tempfile.TemporaryDirectory() as tmp:
        floor = None if args.no_floor else run_floor(cluster, args.count, args.timeout)
        op = OperatorProcess(cluster, Path(tmp), env=operator_env)
        op.install()
        op.start()
        assert op.proc is not None
        pid = op.proc.pid
        idle_rss = rss_kib(pid)
        cluster.kubectl("create", "namespace", "bench", check=True)
        items = [
            {
                "apiVersion": "berth.dev/v1alpha1",
                "kind": "ModelDeployment",
                "metadata": {"name": f"md-{i:04d}", "namespace": "bench"},
                "spec": SPEC,
            }
            for i in range(args.count)
        ]
        peak = [idle_rss]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.5):
                peak[0] = max(peak[0], rss_kib(pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        since = time.time()
        t0 = time.monotonic()
        apply_list(cluster, items)
        applied = time.monotonic() - t0

        def running() -> int:
            mds = kubectl_json(cluster, "get", "md", "-n", "bench")["items"]
            return sum(1 for m in mds if (m.get("status") or {}).get("phase") == "Running")

        first_all, running_n, progress = wait_until(args.count, running, args.timeout, t0, "Running")
        until = time.time()
        metrics = op.metrics()
        reconciles = sum(v for k, v in metrics.items() if k.startswith("berth_operator_reconciles_total{"))
        to_running = operator_requests(cluster.audit_events(since, verbs=None), op.user)
        to_running = {**to_running, "window_seconds": round(until - since, 1)}
        # ---- idle: every ModelDeployment Running, nothing changes
        time.sleep(20)  # the last status writes and events land
        idle_since = time.time()
        idle_reconciles0 = reconciles
        time.sleep(args.idle)
        idle_events = cluster.audit_events(idle_since, verbs=None)
        idle = operator_requests(idle_events, op.user)
        idle_writes_bench = sum(
            1
            for e in idle_events
            if harness.effective_user(e) == op.user
            and e.get("verb") in WRITE_VERBS
            and (e.get("objectRef") or {}).get("namespace") == "bench"
        )
        idle_reconciles = (
            sum(v for k, v in op.metrics().items() if k.startswith("berth_operator_reconciles_total{"))
            - idle_reconciles0
        )
        done.set()
        op.stop()

    idle_seconds = args.idle
    result: dict[str, Any] = {
        "benchmark": "operator-scale",
        "count": args.count,
        "all_running_seconds": round(first_all, 1) if first_all is not None else None,
        "running_at_end": running_n,
        "apply_seconds": round(applied, 1),
        "floor": floor,
        "ratio_to_floor": (
            round(first_all / floor["all_ready_seconds"], 2)
            if floor and first_all is not None and floor["all_ready_seconds"]
            else None
        ),
        "operator_env": operator_env,
        "operator_rss_idle_mib": round(idle_rss / 1024, 1),
        "operator_rss_peak_mib": round(peak[0] / 1024, 1),
        "operator_reconciles": reconciles,
        "requests_apply_to_running": to_running,
        "requests_per_model_deployment": round(to_running["total"] / args.count, 2),
        "idle": {
            "seconds": idle_seconds,
            **idle,
            "requests_per_second": round(idle["total"] / idle_seconds, 3),
            "writes_in_model_deployment_namespace": idle_writes_bench,
            "reconciles": idle_reconciles,
        },
        "progress": progress,
        "machine": machine(),
        "kubernetes": f"{harness.K8S_VERSION} local control plane (kube-apiserver, kube-controller-manager, kube-scheduler) + kwok",
        "date": time.strftime("%Y-%m-%d"),
    }
    m = result["machine"]
    fl = floor or {}
    req = to_running
    md = write_results(
        args.out,
        f"operator-scale-{args.count}",
        result,
        f"# Operator at scale: {args.count} ModelDeployments applied at once, against the floor\n\n"
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; Python {m['python']}; "
        f"{result['kubernetes']}; {result['date']}. One run; the floor is measured in the same run. "
        f"Operator settings: {', '.join(f'{k}={v}' for k, v in operator_env.items())}, the rest defaults.\n\n"
        f"| measure | value |\n|---|---|\n"
        f"| floor: {args.count} Deployments + Services applied directly, all available after | "
        f"{fl.get('all_ready_seconds')} s (apply {fl.get('apply_seconds')} s) |\n"
        f"| operator: {args.count} ModelDeployments, all Running after | {result['all_running_seconds']} s "
        f"(apply {result['apply_seconds']} s) |\n"
        f"| ratio to the floor | {result['ratio_to_floor']} |\n"
        f"| Running at the end | {running_n}/{args.count} |\n"
        f"| operator API requests, apply to all Running (watches excluded) | {req['total']} "
        f"({result['requests_per_model_deployment']} per ModelDeployment: {req['reads']} reads, "
        f"{req['writes']} writes, of them {req['lease']} Lease) |\n"
        f"| reconciles | {reconciles:.0f} |\n"
        f"| operator RSS at start / peak | {result['operator_rss_idle_mib']} / {result['operator_rss_peak_mib']} MiB |\n"
        f"| idle {idle_seconds:.0f} s: requests | {idle['total']} ({result['idle']['requests_per_second']} /s; "
        f"{idle['writes']} writes, {idle['lease']} of them Lease renewals; "
        f"{idle_writes_bench} writes to ModelDeployments or their children) |\n"
        f"| idle: reconciles (resync from the caches) | {idle_reconciles:.0f} |\n\n"
        f"Idle requests by verb and resource: "
        + (", ".join(f"{k} {v}" for k, v in idle["by_verb_resource"].items()) or "none")
        + "\n\n"
        "Requests from apply to all Running by verb and resource: "
        + ", ".join(f"{k} {v}" for k, v in req["by_verb_resource"].items())
        + "\n",
        indent=2,
    )
    print(md.read_text())
    return 0 if running_n == args.count else 1


if __name__ == "__main__":
    sys.exit(main())
