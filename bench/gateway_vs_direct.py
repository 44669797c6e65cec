#!/usr/bin/env python3
"""What the gateway costs a client: `berth bench` against one `berth serve` (the built-in SmolLM2,
CPU) direct and through `berth gateway`, at 8 and 32 concurrent streams, in one run.

    PYTHONPATH=operator python bench/gateway_vs_direct.py

The same client (`berth bench`, chat completions, streamed, greedy, ignore_eos so every request
runs to --output-len) and the same server process for both paths; direct and gateway runs alternate
(direct, gateway at 8, then gateway, direct at 32) so slow drift in the machine's load does not
favour one path. Reported: added TTFT p50 (gateway minus direct, ms) and the output tokens/s ratio
(gateway / direct), with the machine and its load average when the run started and ended.
The gateway runs in its own process with the per-instance credential, a tenant key and its default
quotas, as in a cluster; everything is on loopback.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "operator")]

from bench.common import RESULTS_DIR, cpu_name, memory_gib, write_results  # noqa: E402
from berth.gateway.registry import instance_credential  # noqa: E402
from berth.server.testing import ServerProcess, free_port  # noqa: E402

MASTER = b"bench-master-key"
TENANT = "bk-bench-tenant"
DIRECT = "sk-bench-direct"

GATEWAY = """
import sys, uvicorn
from pathlib import Path
from berth.gateway.main import build
from berth.gateway.registry import Endpoint, Instance, Key, Limits, hash_key
from berth.gateway.settings import GatewaySettings
app, gw = build(GatewaySettings(kubernetes=False, master_key_file=Path(sys.argv[3])))
gw.registry.put_instance(Instance("bench", "chat", "smol"))
gw.registry.put_slice("bench", "chat", "s", (Endpoint("127.0.0.1", int(sys.argv[1])),))
gw.registry.put_key(Key("bench", "k", "ak-bench", hash_key(sys.argv[4]), limits=Limits(100000, 10**9, 1000)))
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning", access_log=False)
"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def bench(
    base_url: str, key: str, model: str, concurrency: int, args: argparse.Namespace, out: Path
) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "berth.cli",
        "bench",
        "--base-url",
        base_url,
        "--api-key",
        key,
        "--model",
        model,
        "--endpoint",
        "chat",
        "--tokenizer",
        "builtin",
        "--num-prompts",
        str(concurrency * args.rounds),
        "--max-concurrency",
        str(concurrency),
        "--input-len",
        str(args.input_len),
        "--output-len",
        str(args.output_len),
        "--ignore-eos",
        "--temperature",
        "0",
        "--num-warmups",
        str(min(concurrency, 4)),
        "--seed",
        "0",
        "--result-file",
        str(out),
        "--no-progress",
        "--quiet",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "operator")}
    if args.pin:
        cmd = ["taskset", "-c", "1", *cmd]
    subprocess.run(cmd, check=True, env=env, timeout=3600)
    result: dict[str, Any] = json.loads(out.read_text())
    assert result["failed"] == 0, result["error_counts"]
    return result


def _row(r: dict[str, Any]) -> dict[str, float]:
    return {
        "ttft_p50_ms": r["median_ttft_ms"],
        "ttft_p99_ms": r["p99_ttft_ms"],
        "itl_p50_ms": r["median_itl_ms"],
        "output_tok_s": r["output_throughput"],
        "completed": r["completed"],
        "duration_s": r["duration"],
        "gateway_cpu_s": r["gateway_cpu_s"],
        "server_cpu_s": r["server_cpu_s"],
        "loadavg_after": r["loadavg_after"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    p.add_argument(
        "--rounds", type=int, default=3, help="requests per stream slot (num-prompts = rounds x c)"
    )
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument(
        "--threads", type=int, default=0, help="BERTH_TORCH_THREADS of the server (0: its default)"
    )
    p.add_argument(
        "--pin",
        action="store_true",
        help="the server's threads on CPU 0, the gateway and the client on CPU 1 (with --threads 1: the "
        "gateway's cost without the server's decode taking its CPU)",
    )
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = p.parse_args()

    started = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "loadavg": load()}
    work = Path(tempfile.mkdtemp(prefix="berth-gw-bench-"))
    (work / "master").write_bytes(MASTER)
    cred = instance_credential(MASTER, "bench", "chat")
    env = {"BERTH_API_KEYS": f"berth-gateway:{cred},direct:{DIRECT}"}
    if args.threads:
        env["BERTH_TORCH_THREADS"] = str(args.threads)
    server = ServerProcess(
        ["--device", "cpu", "--served-model-name", "smol", "--max-num-seqs", str(max(args.concurrency))],
        log_dir=work / "server",
        env=env,
    )
    runs: dict[str, dict[str, Any]] = {}
    with server:
        gw_port = free_port()
        gw_env = {**os.environ, "PYTHONPATH": str(ROOT / "operator")}
        gateway = subprocess.Popen(
            [sys.executable, "-c", GATEWAY, str(server.port), str(gw_port), str(work / "master"), TENANT],
            env=gw_env,
        )
        try:
            gw_url = f"http://127.0.0.1:{gw_port}"
            for _ in range(300):
                try:
                    if httpx.get(gw_url + "/health/live", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            assert server.proc is not None
            if args.pin:  # every thread of each process (-a)
                subprocess.run(
                    ["taskset", "-apc", "0", str(server.proc.pid)], check=True, capture_output=True
                )
                subprocess.run(["taskset", "-apc", "1", str(gateway.pid)], check=True, capture_output=True)
            for c in args.concurrency:  # unmeasured: the server's first batches of each size are slow
                print(f"warm-up c={c} (load {load()})", flush=True)
                bench(server.base_url, DIRECT, "smol", c, args, work / f"warmup-{c}.json")
            for i, c in enumerate(args.concurrency):
                order = ["direct", "gateway"] if i % 2 == 0 else ["gateway", "direct"]
                for path in order:
                    url, key, model = (
                        (server.base_url, DIRECT, "smol")
                        if path == "direct"
                        else (gw_url, TENANT, "bench/smol")
                    )
                    print(f"{path} c={c} (load {load()})", flush=True)
                    gw0, srv0 = cpu_seconds(gateway.pid), cpu_seconds(server.proc.pid)
                    run = bench(url, key, model, c, args, work / f"{path}-{c}.json")
                    run["gateway_cpu_s"] = cpu_seconds(gateway.pid) - gw0
                    run["server_cpu_s"] = cpu_seconds(server.proc.pid) - srv0
                    run["loadavg_after"] = load()
                    runs[f"{path}-{c}"] = run
        finally:
            gateway.terminate()
            gateway.wait(10)
    ended = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "loadavg": load()}

    table = []
    for c in args.concurrency:
        d, g = _row(runs[f"direct-{c}"]), _row(runs[f"gateway-{c}"])
        table.append(
            {
                "concurrency": c,
                "direct": d,
                "gateway": g,
                "added_ttft_p50_ms": g["ttft_p50_ms"] - d["ttft_p50_ms"],
                "output_tok_s_ratio": g["output_tok_s"] / d["output_tok_s"],
            }
        )
    machine = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "memory_gib": memory_gib(),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }
    result = {
        "benchmark": "gateway-vs-direct",
        "model": "builtin://smollm2-135m-instruct (CPU, the server's default weight format)",
        "client": "berth bench --endpoint chat (streamed, greedy, ignore_eos)",
        "input_len": args.input_len,
        "output_len": args.output_len,
        "rounds": args.rounds,
        "torch_threads": args.threads or "default",
        "pinned": "server on CPU 0, gateway and client on CPU 1" if args.pin else "no",
        "machine": machine,
        "started": started,
        "ended": ended,
        "results": table,
    }
    lines = [
        "# Gateway vs direct: `berth bench` on one `berth serve` (SmolLM2-135M, CPU)",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB; "
        f"load average (1, 5, 15 min) {started['loadavg']} at the start ({started['time']}), "
        f"{ended['loadavg']} at the end. Same server process for both paths; runs alternate.",
        f"Requests: chat, {args.input_len} prompt tokens, {args.output_len} output tokens (ignore_eos, greedy), "
        f"{args.rounds} x concurrency per run. Server torch threads: {args.threads or 'default'}; pinned: "
        f"{'server on CPU 0, gateway and client on CPU 1' if args.pin else 'no'}.",
        "",
        "| streams | TTFT p50 direct (ms) | TTFT p50 gateway (ms) | added TTFT p50 (ms) "
        "| output tok/s direct | output tok/s gateway | ratio | gateway CPU (s) | gateway CPU per token (ms) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in table:
        d, g = row["direct"], row["gateway"]
        lines.append(
            f"| {row['concurrency']} | {d['ttft_p50_ms']:.1f} | {g['ttft_p50_ms']:.1f} | "
            f"{row['added_ttft_p50_ms']:+.1f} | {d['output_tok_s']:.1f} | {g['output_tok_s']:.1f} | "
            f"{row['output_tok_s_ratio']:.3f} | {g['gateway_cpu_s']:.2f} | "
            f"{1000 * g['gateway_cpu_s'] / max(1.0, g['output_tok_s'] * g['duration_s']):.2f} |"
        )
    lines += [
        "",
        (
            "The server's threads run on CPU 0, the gateway and the client on CPU 1: the gateway's work does "
            "not take the server's CPU (a differing TTFT between the paths is then mostly the run order and "
            "noise). "
            if args.pin
            else "The gateway runs on the same cores as the server here: its CPU time (last columns) is taken "
            "from the server's decode on a 2-core machine shared with other work. "
        )
        + "The load average says how busy the machine was. Raw figures (p99 TTFT, ITL, server CPU, load after "
        "each run) are in the JSON file.",
        "",
    ]
    path = write_results(args.out, "gateway-vs-direct", result, "\n".join(lines))
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
