"""The command line of ``bench/gpu_engine.py``: the flags, then every section for every model shape."""

from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

import bench.gpu
from bench.common import RESULTS_DIR
from bench.gpu.device import env_info, free
from bench.gpu.engine_run import bench_engine
from bench.gpu.hf_baselines import (
    bench_generate,
    bench_generate_batch,
    bench_static_b1,
    greedy_reference,
    load_hf,
)
from bench.gpu.models import MODEL_SHAPES, SMOKE_SHAPES, build_model_dir
from bench.gpu.report import failed_sections, markdown, new_report, ratios, write_report
from bench.gpu.server_run import bench_server

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
TRANSFORMERS_SECTIONS = frozenset({"generate_batch", "generate", "static_b1"})


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=(bench.gpu.__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = p.add_argument
    add("--smoke", action="store_true", help="CPU, tiny models, few requests (proves the script runs)")
    add(
        "--models",
        default=None,
        help=f"comma-separated shapes: {', '.join(MODEL_SHAPES)} (default: the first two)",
    )
    add("--device", default=None, help="cuda (default) or cpu")
    add("--dtype", default=None, help="bfloat16 (default on CUDA) or float32")
    add("--num-requests", type=int, default=None, help="requests per workload (default 256)")
    add("--input-len", type=int, default=None, help="prompt tokens (default 128)")
    add("--output-len", type=int, default=None, help="output tokens, EOS ignored (default 256)")
    add("--b1-output-len", type=int, default=None, help="tokens for the batch-1 decode runs (default 256)")
    add(
        "--concurrency",
        type=int,
        default=None,
        help="concurrent streams for the server latency run (default 64)",
    )
    add("--generate-batch", type=int, default=None, help="batch size of the generate baseline (default 128)")
    add(
        "--max-num-seqs",
        type=int,
        default=None,
        help="engine and server running batch (default: --num-requests)",
    )
    add("--max-num-batched-tokens", type=int, default=None, help="engine tokens per step (default 2048)")
    add("--max-model-len", type=int, default=2048)
    add("--kv-cache-memory-fraction", type=float, default=0.6)
    add("--kv-cache-cpu-gib", type=float, default=1.0)
    add(
        "--engine-arg",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override an EngineConfig field",
    )
    add(
        "--reference-repeats",
        type=int,
        default=None,
        help="generate_batch runs; the best is reported (default 2)",
    )
    add(
        "--skip",
        default="",
        help="comma-separated sections to skip: engine,engine_graphs,server,generate_batch,generate,static_b1",
    )
    add("--no-greedy-check", dest="greedy_check", action="store_false")
    add("--no-profile", dest="profile", action="store_false")
    add(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads here and in the server (default: torch's; 1 with --smoke)",
    )
    add("--seed", type=int, default=0)
    add("--timeout", type=int, default=3600, help="seconds for one berth bench run")
    add("--out-dir", default=str(RESULTS_DIR))
    add("--keep-models", default=None, help="build the model directories here and keep them")
    args = p.parse_args(argv)
    smoke = args.smoke
    defaults: dict[str, Any] = {
        "device": "cpu" if smoke else "cuda",
        "dtype": "float32" if smoke else "bfloat16",
        "num_requests": 8 if smoke else 256,
        "input_len": 16 if smoke else 128,
        "output_len": 8 if smoke else 256,
        "b1_output_len": 16 if smoke else 256,
        "concurrency": 4 if smoke else 64,
        "generate_batch": 4 if smoke else 128,
        "max_num_batched_tokens": 256 if smoke else 2048,
        "reference_repeats": 1 if smoke else 2,
        "models": ",".join(SMOKE_SHAPES) if smoke else "qwen2.5-0.5b,llama-3.2-1b",
    }
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.max_num_seqs is None:
        args.max_num_seqs = args.num_requests
    if args.threads is None and smoke:
        args.threads = 1  # OpenMP barriers stall for ~0.25 s a step on a busy 2-core machine
    args.check_lengths = [5, 17, 64] if smoke else [7, 64, 128, 300]
    args.check_tokens = 8 if smoke else 32
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "transformers", "berth.server"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "bench/gpu_engine.py: CUDA is not available here; run with --smoke for the CPU check",
            file=sys.stderr,
        )
        return 2
    dtype = DTYPES[args.dtype]
    shapes = SMOKE_SHAPES if args.smoke else MODEL_SHAPES
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in shapes]
    if unknown:
        print(f"unknown model shapes {unknown}; known: {list(shapes)}", file=sys.stderr)
        return 2
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}

    report = new_report(args, env_info(device))
    with _workdir(args.keep_models) as root:
        for name in names:
            log.info("== %s", name)
            m = bench_model(name, shapes[name], root, args, device, dtype, skip)
            report["models"][name] = m
            log.info("%s ratios: %s", name, m["ratios"])

    stem = write_report(report, Path(args.out_dir))
    print(markdown(report))
    print(f"results: {stem}.json and .md")
    failed = failed_sections(report)
    if failed:
        print(f"failed sections: {failed}", file=sys.stderr)
        return 1
    return 0


def bench_model(
    name: str,
    shape: dict[str, Any],
    root: Path,
    args: argparse.Namespace,
    device: torch.device,
    dtype: torch.dtype,
    skip: set[str],
) -> dict[str, Any]:
    """Every section not skipped for one model shape: engine (eager, then graphs), transformers, server."""
    m: dict[str, Any] = {"shape": shape}
    model_dir = build_model_dir(name, shape, root, dtype, args.seed)
    vocab = int(shape["vocab_size"])
    if "engine" not in skip:
        _section(m, "engine", bench_engine, model_dir, args, device, vocab)
    if "engine_graphs" not in skip:
        graphs_args = argparse.Namespace(
            **{**vars(args), "engine_arg": [*args.engine_arg, "cuda_graphs=true"]}
        )
        _section(m, "engine_graphs", bench_engine, model_dir, graphs_args, device, vocab)
    if not TRANSFORMERS_SECTIONS.issubset(skip) or args.greedy_check:
        _transformers_sections(m, model_dir, args, device, dtype, vocab, skip)
    if "server" not in skip:
        _section(m, "server", bench_server, model_dir, name, args, device, root)
    m["ratios"] = ratios(m)
    return m


def _transformers_sections(
    m: dict[str, Any],
    model_dir: Path,
    args: argparse.Namespace,
    device: torch.device,
    dtype: torch.dtype,
    vocab: int,
    skip: set[str],
) -> None:
    """One transformers model for the greedy checks of the engine runs and the baselines."""
    hf = load_hf(model_dir, dtype, device)
    for section, check in (("engine", "greedy_check"), ("engine_graphs", "greedy_check_graphs")):
        if args.greedy_check and "greedy_tokens" in m.get(section, {}):
            engine_m = m[section]
            _section(m, check, greedy_reference, hf, engine_m, device)
            engine_m.pop("greedy_tokens", None)
    baselines = (
        ("generate_batch", bench_generate_batch),
        ("generate", bench_generate),
        ("static_b1", bench_static_b1),
    )
    for section, fn in baselines:
        if section not in skip:
            _section(m, section, fn, hf, args, device, vocab)
    del hf
    free(device)


def _section(results: dict[str, Any], name: str, fn: Callable[..., dict[str, Any]], *fn_args: Any) -> None:
    """Run one measurement; a failure is recorded (with its traceback) instead of ending the run."""
    log.info("-- %s", name)
    t0 = time.perf_counter()
    try:
        results[name] = fn(*fn_args)
    except Exception as e:
        log.error("%s failed: %s", name, e)
        results[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
    results[name]["section_seconds"] = round(time.perf_counter() - t0, 2)


@contextlib.contextmanager
def _workdir(keep: str | None) -> Iterator[Path]:
    if keep:
        path = Path(keep)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    path = Path(tempfile.mkdtemp(prefix="berth-gpu-bench-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
