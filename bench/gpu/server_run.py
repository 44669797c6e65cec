"""(b) Berth's HTTP server: ``berth serve`` in a subprocess, loaded by ``berth bench`` in another.

Two runs on the same server: every request at once (throughput), then ``--concurrency``
concurrent streams (TTFT, TPOT, ITL).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import REPO


def server_args(model_dir: Path, name: str, args: argparse.Namespace, device: torch.device) -> list[str]:
    """``berth serve`` flags: the engine as the in-process run configures it."""
    return [
        *("--model", str(model_dir), "--served-model-name", name),
        *("--device", str(device), "--dtype", args.dtype, "--max-model-len", str(args.max_model_len)),
        *("--max-num-seqs", str(args.max_num_seqs), "--max-queue", str(max(4096, args.num_requests))),
        *("--max-num-batched-tokens", str(args.max_num_batched_tokens)),
        *("--kv-cache-memory-fraction", str(args.kv_cache_memory_fraction)),
        *("--kv-cache-cpu-gib", str(args.kv_cache_cpu_gib)),
        *("--log-level", "warning"),
    ]


def bench_server(
    model_dir: Path, name: str, args: argparse.Namespace, device: torch.device, workdir: Path
) -> dict[str, Any]:
    from berth.server.testing import ServerProcess

    env = {
        "PYTHONPATH": os.pathsep.join([str(REPO / "operator"), os.environ.get("PYTHONPATH", "")]).rstrip(
            os.pathsep
        )
    }
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    flags = server_args(model_dir, name, args, device)
    out: dict[str, Any] = {"server_args": flags}
    t0 = time.perf_counter()
    with ServerProcess(flags, log_dir=workdir / f"server-{name}", env=env) as server:
        out["ready_seconds"] = round(time.perf_counter() - t0, 2)
        common = [
            *("--base-url", server.base_url, "--model", name, "--endpoint", "completions"),
            *("--tokenizer", str(model_dir), "--input-len", str(args.input_len)),
            *("--output-len", str(args.output_len), "--num-prompts", str(args.num_requests)),
            *("--ignore-eos", "--temperature", "0", "--seed", str(args.seed), "--no-progress", "--quiet"),
        ]
        runs = {
            "throughput": ["--request-rate", "inf", "--num-warmups", "2"],
            f"concurrency_{args.concurrency}": [
                *("--max-concurrency", str(args.concurrency)),
                *("--num-warmups", "2"),
            ],
        }
        for key, extra in runs.items():
            out[key] = _bench_run([*common, *extra], workdir / f"bench-{name}-{key}.json", env, args.timeout)
    return out


def _bench_run(flags: list[str], result_file: Path, env: dict[str, str], timeout: int) -> dict[str, Any]:
    """One ``berth bench`` run: its summary figures (the per-request lists left out), or the error."""
    cmd = [sys.executable, "-m", "berth.cli", "bench", *flags, "--result-file", str(result_file)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env}, timeout=timeout)
    if proc.returncode != 0 or not result_file.exists():
        return {"error": f"berth bench exited {proc.returncode}: {(proc.stdout + proc.stderr)[-2000:]}"}
    r = json.loads(result_file.read_text())
    return {
        k: v for k, v in r.items() if not isinstance(v, list | dict) or k in ("error_counts", "percentiles")
    }
