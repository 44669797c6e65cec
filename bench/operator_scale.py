"""Operator at scale: N ModelDeployments applied at once -> time until all are Running, operator peak memory.

Runs against the local control plane (tests/cluster/harness.py: real kube-apiserver, controllers and
scheduler, kwok-simulated nodes) with the real `berth operator` process under the chart's RBAC, and
writes bench/results/operator-scale-<n>.json and .md with the machine it ran on.

    python bench/operator_scale.py [--count 200]      (make bench-operator)
"""

from __future__ import annotations

import argparse
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
from tests.cluster.operator_proc import OperatorProcess  # noqa: E402

from bench.common import RESULTS_DIR, cpu_name, memory_gib, write_results  # noqa: E402


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)

    nodes = [harness.NodeSpec(f"gpu-{i}", gpus=8, cpu="256", memory="2Ti", pods=250) for i in range(4)]
    nodes.append(harness.NodeSpec("cpu-0", gpus=0, cpu="256", memory="2Ti", pods=250))
    with harness.LocalCluster(nodes=nodes) as cluster, tempfile.TemporaryDirectory() as tmp:
        op = OperatorProcess(cluster, Path(tmp), env={"BERTH_RESYNC_SECONDS": "30"})
        op.install()
        op.start()
        assert op.proc is not None
        idle_rss = rss_kib(op.proc.pid)
        cluster.kubectl("create", "namespace", "bench", check=True)
        items = [
            {
                "apiVersion": "berth.dev/v1alpha1",
                "kind": "ModelDeployment",
                "metadata": {"name": f"md-{i:04d}", "namespace": "bench"},
                "spec": {"capacity": 1, "resources": {"cpu": "100m", "memory": "256Mi"}},
            }
            for i in range(args.count)
        ]
        peak = [idle_rss]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.5):
                peak[0] = max(peak[0], rss_kib(op.proc.pid))  # type: ignore[union-attr]

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.monotonic()
        cluster.kubectl(
            "apply",
            "-f",
            "-",
            input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}),
            check=True,
            timeout=300,
        )
        applied = time.monotonic() - t0
        running = 0
        first_all: float | None = None
        progress: list[tuple[float, int]] = []
        while time.monotonic() - t0 < args.timeout:
            out = cluster.kubectl("get", "md", "-n", "bench", "-o", "json", check=True, timeout=120).stdout
            phases = [(m.get("status") or {}).get("phase") for m in json.loads(out)["items"]]
            running = sum(1 for p in phases if p == "Running")
            progress.append((round(time.monotonic() - t0, 1), running))
            print(
                f"\r{running}/{args.count} Running after {time.monotonic() - t0:.0f}s",
                end="",
                file=sys.stderr,
            )
            if running == args.count:
                first_all = time.monotonic() - t0
                break
            time.sleep(2)
        print(file=sys.stderr)
        done.set()
        metrics = op.metrics()
        writes = op.writes()
        reconciles = sum(v for k, v in metrics.items() if k.startswith("berth_operator_reconciles_total{"))
        op.stop()

    result = {
        "benchmark": "operator-scale",
        "count": args.count,
        "all_running_seconds": round(first_all, 1) if first_all is not None else None,
        "running_at_end": running,
        "apply_seconds": round(applied, 1),
        "operator_rss_idle_mib": round(idle_rss / 1024, 1),
        "operator_rss_peak_mib": round(peak[0] / 1024, 1),
        "operator_api_writes": writes,
        "operator_reconciles": reconciles,
        "progress": progress,
        "machine": machine(),
        "kubernetes": "v1.37.2 local control plane (kube-apiserver, kube-controller-manager, kube-scheduler) + kwok",
        "date": time.strftime("%Y-%m-%d"),
    }
    m = result["machine"]
    md = write_results(
        args.out,
        f"operator-scale-{args.count}",
        result,
        f"# Operator at scale: {args.count} ModelDeployments applied at once\n\n"
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; Python {m['python']}; "
        f"{result['kubernetes']}; {result['date']}.\n\n"
        f"| measure | value |\n|---|---|\n"
        f"| all Running after | {result['all_running_seconds']} s |\n"
        f"| Running at the end | {running}/{args.count} |\n"
        f"| kubectl apply took | {result['apply_seconds']} s |\n"
        f"| operator RSS idle / peak | {result['operator_rss_idle_mib']} / {result['operator_rss_peak_mib']} MiB |\n"
        f"| operator API writes | {writes:.0f} ({writes / args.count:.1f} per ModelDeployment) |\n"
        f"| reconciles | {reconciles:.0f} |\n",
        indent=2,
    )
    print(md.read_text())
    return 0 if running == args.count else 1


if __name__ == "__main__":
    sys.exit(main())
