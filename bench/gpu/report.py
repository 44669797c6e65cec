"""The report: its head (machine, workload), the ratios, the Markdown tables and the result files.

Pure functions over the report dict (no torch), except ``new_report``, which describes the device.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
from pathlib import Path
from typing import Any

from bench.common import write_results

# The targets for the Qwen2.5-0.5B shape on an H100.
TARGET_ENGINE_VS_GENERATE_BATCH = 10.0
TARGET_B1_VS_STATIC = 2.0

WORKLOAD_KEYS = (
    "num_requests",
    "input_len",
    "output_len",
    "b1_output_len",
    "concurrency",
    "generate_batch",
    "dtype",
    "max_num_seqs",
    "max_num_batched_tokens",
    "max_model_len",
    "kv_cache_memory_fraction",
    "engine_arg",
    "seed",
    "threads",
)


def new_report(args: argparse.Namespace, environment: dict[str, Any]) -> dict[str, Any]:
    """The report before any model ran: what, when, where, which workload."""
    return {
        "smoke": args.smoke,
        "label": "CPU SMOKE RUN - not a benchmark" if args.smoke else "benchmark",
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "environment": environment,
        "workload": {**{k: getattr(args, k) for k in WORKLOAD_KEYS}, "ignore_eos": True, "greedy": True},
        "models": {},
    }


def ratios(m: dict[str, Any]) -> dict[str, float | None]:
    def get(section: str, key: str) -> float | None:
        v = m.get(section, {}).get(key)
        return float(v) if isinstance(v, int | float) and v > 0 else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    eng = get("engine", "output_tokens_per_s")
    gb = get("generate_batch", "output_tokens_per_s")
    gen = get("generate", "output_tokens_per_s")
    b1 = get("engine", "b1_decode_tokens_per_s")
    st = get("static_b1", "decode_tokens_per_s")
    eg = get("engine_graphs", "output_tokens_per_s")
    b1g = get("engine_graphs", "b1_decode_tokens_per_s")
    return {
        "engine_vs_generate_batch": ratio(eng, gb),
        "engine_vs_generate": ratio(eng, gen),
        "b1_engine_vs_static_cache": ratio(b1, st),
        "engine_graphs_vs_generate_batch": ratio(eg, gb),
        "b1_engine_graphs_vs_static_cache": ratio(b1g, st),
        "graphs_vs_eager": ratio(eg, eng),
        "b1_graphs_vs_eager": ratio(b1g, b1),
    }


def failed_sections(report: dict[str, Any]) -> list[str]:
    """``model.section`` (and ``model.server.run``) for every section that recorded an error."""
    return [f"{name}.{key}" for name, m in report["models"].items() for key in _errors(m)]


def _errors(m: dict[str, Any]) -> dict[str, str]:
    """A model's failed sections (``server.<run>`` for the server's runs) and their errors."""
    errors = {k: v["error"] for k, v in m.items() if isinstance(v, dict) and "error" in v}
    srv = m.get("server") or {}
    if isinstance(srv, dict):
        errors.update(
            {f"server.{k}": v["error"] for k, v in srv.items() if isinstance(v, dict) and "error" in v}
        )
    return errors


def write_report(report: dict[str, Any], out_dir: Path) -> Path:
    """``gpu-engine-<gpu>.{json,md}`` (``gpu-engine-cpu-smoke.*`` for --smoke); returns the path without suffix."""
    if report["smoke"]:
        stem = "gpu-engine-cpu-smoke"
    else:
        gpu = report["environment"].get("gpu", report["environment"]["device"])
        stem = "gpu-engine-" + re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    write_results(out_dir, stem, report, markdown(report))
    return out_dir / stem


# ------------------------------------------------------------------------------------ Markdown


def _fmt(v: Any, nd: int = 1) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    return str(v)


def markdown(report: dict[str, Any]) -> str:
    lines = [*_head(report), *_table(report), *_graphs_table(report), *_targets()]
    for name, m in report["models"].items():
        lines += _model_notes(name, m)
    lines.append("Raw figures: the JSON file next to this one.")
    return "\n".join(lines) + "\n"


def _head(report: dict[str, Any]) -> list[str]:
    env = report["environment"]
    wl = report["workload"]
    lines: list[str] = []
    if report["smoke"]:
        lines += [
            "# CPU SMOKE RUN — not a benchmark",
            "",
            "Tiny random models on CPU, few requests: this only proves that `bench/gpu_engine.py` runs end to end.",
            "The GPU figures come from `make bench-gpu` on a CUDA machine.",
            "",
        ]
    else:
        lines += [f"# Berth engine vs transformers on {env.get('gpu', env['device'])}", ""]
    hardware = (
        f" · {env.get('gpu')} ({env.get('gpu_memory_gib')} GiB) · driver {env.get('driver')} · CUDA {env.get('cuda')}"
        if "gpu" in env
        else f" · {env.get('cpu')}"
    )
    return [
        *lines,
        f"Run {report['date']} · device `{env['device']}`{hardware}"
        f" · torch {env['torch']} · transformers {env['transformers']}",
        "",
        f"Workload: {wl['num_requests']} requests, {wl['input_len']} prompt tokens, {wl['output_len']} output tokens, "
        f"EOS ignored, greedy, dtype {wl['dtype']}; batch-1 decode over {wl['b1_output_len']} tokens; "
        f"server latency at {wl['concurrency']} concurrent streams. Weights random, shapes real.",
        "",
    ]


def _greedy_text(greedy: dict[str, Any]) -> str:
    """``n/m exact`` over a greedy check's prompts, ``—`` when it did not run."""
    checks = [g for g in greedy.values() if isinstance(g, dict)] if "error" not in greedy else []
    return f"{sum(1 for g in checks if g.get('exact'))}/{len(checks)} exact" if checks else "—"


def _table(report: dict[str, Any]) -> list[str]:
    wl = report["workload"]
    lines = [
        f"| model | engine tok/s | server tok/s | generate_batch tok/s | generate (b={wl['generate_batch']}) tok/s "
        "| engine / generate_batch | engine b1 tok/s | static-cache b1 tok/s | b1 ratio "
        f"| TTFT p50/p90/p99 ms @{wl['concurrency']} | greedy = generate |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in report["models"].items():
        r = m["ratios"]
        srv = m.get("server", {})
        tput = srv.get("throughput", {}) if isinstance(srv, dict) else {}
        lat = srv.get(f"concurrency_{wl['concurrency']}", {}) if isinstance(srv, dict) else {}
        ttft = (
            f"{_fmt(lat.get('p50_ttft_ms'))} / {_fmt(lat.get('p90_ttft_ms'))} / {_fmt(lat.get('p99_ttft_ms'))}"
            if "p99_ttft_ms" in lat
            else "—"
        )
        lines.append(
            f"| {name} | {_fmt(m.get('engine', {}).get('output_tokens_per_s'))} | {_fmt(tput.get('output_throughput'))} "
            f"| {_fmt(m.get('generate_batch', {}).get('output_tokens_per_s'))} "
            f"| {_fmt(m.get('generate', {}).get('output_tokens_per_s'))} | {_fmt(r['engine_vs_generate_batch'], 2)}x "
            f"| {_fmt(m.get('engine', {}).get('b1_decode_tokens_per_s'))} "
            f"| {_fmt(m.get('static_b1', {}).get('decode_tokens_per_s'))} | {_fmt(r['b1_engine_vs_static_cache'], 2)}x "
            f"| {ttft} | {_greedy_text(m.get('greedy_check', {}))} |"
        )
    return lines


def _graphs_table(report: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "With `--cuda-graphs` (decode steps through the static-shape path; captured as CUDA graphs on CUDA,",
        "eager on CPU), same workload, same process:",
        "",
        "| model | engine tok/s | engine / generate_batch | vs eager | engine b1 tok/s | b1 / static-cache | b1 vs eager "
        "| graphs captured | greedy = generate |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in report["models"].items():
        r = m["ratios"]
        eg = m.get("engine_graphs", {})
        lines.append(
            f"| {name} | {_fmt(eg.get('output_tokens_per_s'))} | {_fmt(r.get('engine_graphs_vs_generate_batch'), 2)}x "
            f"| {_fmt(r.get('graphs_vs_eager'), 2)}x | {_fmt(eg.get('b1_decode_tokens_per_s'))} "
            f"| {_fmt(r.get('b1_engine_graphs_vs_static_cache'), 2)}x | {_fmt(r.get('b1_graphs_vs_eager'), 2)}x "
            f"| {_fmt(eg.get('cuda_graph_captures'))} | {_greedy_text(m.get('greedy_check_graphs', {}))} |"
        )
    return lines


def _targets() -> list[str]:
    return [
        "",
        f"Targets (issue 6, Qwen2.5-0.5B shape on an H100): engine ≥ {TARGET_ENGINE_VS_GENERATE_BATCH:g}x generate_batch, "
        f"batch-1 ≥ {TARGET_B1_VS_STATIC:g}x static-cache generate, TTFT p99 at 64 streams reported.",
        "",
    ]


def _model_notes(name: str, m: dict[str, Any]) -> list[str]:
    """A model's failed sections, then where its engine step goes (the profile, when one ran)."""
    lines: list[str] = []
    errors = _errors(m)
    if errors:
        lines.append(
            f"**{name}: failed sections** — " + "; ".join(f"`{k}`: {v[:300]}" for k, v in errors.items())
        )
        lines.append("")
    prof = m.get("engine", {}).get("profile")
    if prof:
        lines += _profile(name, prof)
    return lines


def _profile(name: str, prof: dict[str, Any]) -> list[str]:
    verdict = (
        " — the step is CPU-bound (launches, scheduling, Python): CUDA graphs / fewer kernels move it next."
        if prof["gpu_busy_fraction"] < 0.6
        else " — the GPU is the limit: the top kernels below move it next."
    )
    return [
        f"### {name}: where an engine step goes ({prof['requests']} requests x {prof['output_tokens_each']} tokens, torch.profiler)",
        "",
        f"{prof['steps']} steps, {prof['mean_step_ms']:.2f} ms per step; GPU busy {prof['gpu_busy_ms']:.1f} ms of "
        f"{prof['wall_ms']:.1f} ms wall ({100 * prof['gpu_busy_fraction']:.0f}%){verdict}",
        "",
        "| op | device ms | calls |",
        "|---|---|---|",
        *[f"| `{o['name']}` | {o['device_ms']:.2f} | {o['calls']} |" for o in prof["top_device_ops"]],
        "",
    ]
