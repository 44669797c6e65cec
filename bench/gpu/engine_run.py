"""(a) Berth's engine in-process: ``EngineCore`` stepped on this thread, no HTTP, no asyncio.

Throughput over the whole workload, batch-1 decode, the greedy tokens for the agreement check,
and (on CUDA) a torch.profiler breakdown of a short run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import greedy_requests
from bench.gpu.device import free
from bench.gpu.models import random_prompts


def engine_config(args: argparse.Namespace, max_num_seqs: int) -> Any:
    """The engine's config from the flags, with each ``--engine-arg FIELD=VALUE`` applied."""
    from berth.server.engine import EngineConfig

    cfg = EngineConfig(
        max_num_seqs=max_num_seqs,
        max_queue=max(4096, args.num_requests),
        max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_memory_fraction=args.kv_cache_memory_fraction,
        kv_cache_cpu_gib=args.kv_cache_cpu_gib,
    )
    fields = {f.name for f in dataclasses.fields(cfg)}
    overrides: dict[str, Any] = {}
    for item in args.engine_arg:
        key, _, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if key not in fields:
            raise SystemExit(
                f"--engine-arg {item!r}: EngineConfig has no field {key!r} (fields: {sorted(fields)})"
            )
        overrides[key] = _parse_value(raw, getattr(cfg, key))
    return dataclasses.replace(cfg, **overrides)


def _parse_value(raw: str, current: Any) -> Any:
    """``raw`` as the type of the field's current value (JSON for lists and objects, ``none``: None)."""
    if isinstance(current, bool):
        return raw.lower() in ("1", "true", "yes", "on")
    if isinstance(current, int):
        return int(raw)
    if isinstance(current, float):
        return float(raw)
    if raw.lower() == "none":
        return None
    return json.loads(raw) if raw[:1] in "[{0123456789" else raw


def run_core(core: Any, requests: list[Any]) -> tuple[float, int, list[tuple[float, int]]]:
    """All requests to completion on this thread: (seconds, output tokens, [(step seconds, tokens sampled)])."""
    for req in requests:
        core.add(core.make_sequence(req))
    steps: list[tuple[float, int]] = []
    n_out = 0
    t0 = time.perf_counter()
    while core.has_work():
        s0 = time.perf_counter()
        events = core.step()
        steps.append((time.perf_counter() - s0, len(events)))
        n_out += sum(1 for _, ev in events if ev.token_id is not None)
    return time.perf_counter() - t0, n_out, steps


def bench_engine(
    model_dir: Path, args: argparse.Namespace, device: torch.device, vocab: int
) -> dict[str, Any]:
    from berth.server.engine import EngineCore
    from berth.server.loader import load_model

    t0 = time.perf_counter()
    loaded = load_model(
        str(model_dir), dtype=args.dtype, device=str(device), max_model_len=args.max_model_len
    )
    core = EngineCore(loaded, engine_config(args, max_num_seqs=args.max_num_seqs))
    setup_s = time.perf_counter() - t0
    out: dict[str, Any] = {
        "setup_seconds": round(setup_s, 2),
        "engine_config": dataclasses.asdict(core.config),
        "num_kv_blocks": core.bm.num_blocks,
    }
    # warm-up: a few requests of the same shape (kernels, allocator, CUDA graphs if the engine captures lazily)
    warm = random_prompts(min(8, args.num_requests), args.input_len, vocab, seed=args.seed + 99)
    run_core(core, greedy_requests(warm, 8, "warm"))

    out.update(_throughput(core, args, vocab))
    out.update(_batch1(core, args, vocab))
    if args.greedy_check:
        out["greedy_tokens"] = _greedy_tokens(core, args, vocab)
    out["static_decode_steps"] = core.runner.num_static_steps
    out["cuda_graph_captures"] = core.runner.num_graph_captures
    if args.profile and device.type == "cuda":
        out["profile"] = profile_engine(core, args, vocab)
    del core, loaded
    free(device)
    return out


def _throughput(core: Any, args: argparse.Namespace, vocab: int) -> dict[str, Any]:
    """The whole workload at once: output tokens/s and how the steps went."""
    prompts = random_prompts(args.num_requests, args.input_len, vocab, seed=args.seed)
    seconds, n_out, steps = run_core(core, greedy_requests(prompts, args.output_len, "tput"))
    decode_steps = [s for s, n in steps if n >= 1]
    return {
        "requests": args.num_requests,
        "output_tokens": n_out,
        "output_tokens_expected": args.num_requests * args.output_len,
        "seconds": round(seconds, 3),
        "output_tokens_per_s": n_out / seconds,
        "total_tokens_per_s": (n_out + args.num_requests * args.input_len) / seconds,
        "steps": len(steps),
        "mean_step_ms": 1000 * sum(s for s, _ in steps) / max(len(steps), 1),
        "max_batch_sampled": max((n for _, n in steps), default=0),
        "mean_batch_sampled": sum(n for _, n in steps) / max(len(decode_steps), 1),
    }


def _batch1(core: Any, args: argparse.Namespace, vocab: int) -> dict[str, Any]:
    """One request alone: the decode rate between its first and last token."""
    prompt = random_prompts(1, args.input_len, vocab, seed=args.seed + 1)
    core.add(core.make_sequence(greedy_requests(prompt, args.b1_output_len, "b1")[0]))
    t_first: float | None = None
    t_last = 0.0
    n = 0
    while core.has_work():
        events = core.step()
        if events:
            n += len(events)
            t_last = time.perf_counter()
            if t_first is None:
                t_first = t_last
    assert t_first is not None
    rate = (n - 1) / (t_last - t_first) if n > 1 and t_last > t_first else 0.0
    return {
        "b1_output_tokens": n,
        "b1_decode_tokens_per_s": rate,
        "b1_ms_per_token": 1000 / rate if rate else None,
    }


def _greedy_tokens(core: Any, args: argparse.Namespace, vocab: int) -> dict[str, Any]:
    """The engine's greedy tokens for prompts of ``--check-lengths`` (compared with generate later)."""
    out: dict[str, Any] = {}
    for length in args.check_lengths:
        p = random_prompts(1, length, vocab, seed=args.seed + 1000 + length)
        res = core.run(greedy_requests(p, args.check_tokens, f"chk{length}"))
        out[str(length)] = {"prompt": p[0], "tokens": [ev.token_id for ev in next(iter(res.values()))]}
    return out


def profile_engine(core: Any, args: argparse.Namespace, vocab: int) -> dict[str, Any]:
    """torch.profiler over a short run at --concurrency: GPU busy vs wall time, top kernels."""
    from torch.profiler import ProfilerActivity, profile

    prompts = random_prompts(args.concurrency, args.input_len, vocab, seed=args.seed + 7)
    reqs = greedy_requests(prompts, 32, "prof")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        wall, _, steps = run_core(core, reqs)
    events = prof.key_averages()

    def dev_self(e: Any) -> float:
        return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)))

    kernel_us = sum(dev_self(e) for e in events)
    top = sorted(events, key=dev_self, reverse=True)[:15]
    return {
        "requests": args.concurrency,
        "output_tokens_each": 32,
        "wall_ms": wall * 1000,
        "steps": len(steps),
        "mean_step_ms": wall * 1000 / max(len(steps), 1),
        "gpu_busy_ms": kernel_us / 1000,
        "gpu_busy_fraction": (kernel_us / 1e6) / wall if wall > 0 else 0.0,
        "top_device_ops": [
            {"name": e.key[:90], "device_ms": dev_self(e) / 1000, "calls": e.count}
            for e in top
            if dev_self(e) > 0
        ],
    }
