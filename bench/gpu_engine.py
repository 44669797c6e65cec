#!/usr/bin/env python3
"""Berth's engine against transformers on one GPU, same weights, same workload, one run.

For each model shape (random-initialised weights of the real architecture, saved as a HF model
directory with a word-level tokenizer whose vocabulary is the model's: token ``i`` is the word
``t<i>``, so ids round-trip exactly), it measures:

(a) Berth's engine in-process (``EngineCore`` stepped on this thread): output tokens/s for the
    whole workload, and batch-1 decode tokens/s;
(b) Berth's HTTP server (``berth serve`` in a subprocess) under ``berth bench``: throughput with
    every request sent at once, and TTFT/TPOT/ITL at ``--concurrency`` concurrent streams;
(c) transformers ``generate_batch`` (continuous batching), when the installed version has it;
(d) transformers ``generate`` at batch ``--generate-batch`` and batch-1 with a static cache;

plus a greedy agreement check (engine vs ``generate``, token for token) and a torch.profiler
breakdown of a short engine run (GPU busy time vs wall time, top kernels). Default workload:
256 requests, 128 prompt tokens, 256 output tokens, EOS ignored, greedy.

Results: ``bench/results/gpu-engine-<gpu>.json`` and ``.md`` with the GPU, driver, CUDA, torch and
transformers versions and the ratios (engine / generate_batch; batch-1 engine / static-cache
generate). ``--smoke`` runs the same code on CPU with tiny models and few requests (CI), writing
``gpu-engine-cpu-smoke.*``, which is labelled as such and is not a benchmark.

    make bench-gpu                      # python bench/gpu_engine.py
    python bench/gpu_engine.py --models qwen2.5-0.5b --num-requests 64
    python bench/gpu_engine.py --smoke  # CPU, a minute
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import gc
import json
import logging
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "operator"))

import torch  # noqa: E402

log = logging.getLogger("bench.gpu_engine")

# Shapes of the real models (from their published config.json), weights random.
MODEL_SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": {
        "model_type": "qwen2",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": True,
        "use_sliding_window": False,
    },
    "llama-3.2-1b": {
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "vocab_size": 128256,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 131072,
        "tie_word_embeddings": True,
    },
    "llama-3.1-8b": {  # optional: --models llama-3.1-8b
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 128256,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 131072,
        "tie_word_embeddings": False,
    },
}

# --smoke: the same two architectures, tiny.
SMOKE_SHAPES: dict[str, dict[str, Any]] = {
    "tiny-qwen2": {
        "model_type": "qwen2",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 512,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
        "use_sliding_window": False,
    },
    "tiny-llama": {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 160,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "vocab_size": 640,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
        },
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
    },
}

# The targets for the Qwen2.5-0.5B shape on an H100.
TARGET_ENGINE_VS_GENERATE_BATCH = 10.0
TARGET_B1_VS_STATIC = 2.0


# ------------------------------------------------------------------------------------ helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


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


def env_info(device: torch.device) -> dict[str, Any]:
    import transformers

    info: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "hostname": platform.node(),
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
        info["capability"] = f"{props.major}.{props.minor}"
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            info["driver"] = out.stdout.strip().splitlines()[0] if out.stdout.strip() else None
    return info


def save_tokenizer(vocab_size: int, directory: Path) -> None:
    """A byte-level BPE tokenizer that fills the model's whole vocabulary, saved next to the model.

    Its pipeline is Qwen2's (NFC, Qwen's split regex, byte-level), because transformers loads a
    qwen2 model directory's tokenizer as ``Qwen2Tokenizer`` whatever the directory declares; the
    Llama shapes load the same tokenizer.json as it is. The vocabulary: the 256 byte symbols, then
    the words " a", " b", ... " ab", ... (letters a-p, shortest first) with one merge per word
    (prefix + last letter), and ``<|endoftext|>`` as the last id. Every id decodes to text, and a
    run of words re-encodes to the same ids.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    letters = "abcdefghijklmnop"
    byte_syms = sorted(pre_tokenizers.ByteLevel.alphabet())
    space = "\u0120"  # the byte-level symbol of " "
    vocab: dict[str, int] = {sym: i for i, sym in enumerate(byte_syms)}
    merges: list[tuple[str, str]] = []
    frontier = [space]
    while len(vocab) < vocab_size - 1:
        nxt = []
        for prefix in frontier:
            for ch in letters:
                if len(vocab) >= vocab_size - 1:
                    break
                word = prefix + ch
                vocab[word] = len(vocab)
                merges.append((prefix, ch))
                nxt.append(word)
        frontier = nxt
    vocab["<|endoftext|>"] = len(vocab)
    assert len(vocab) == vocab_size, (len(vocab), vocab_size)
    split = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>"
    )
    fast.save_pretrained(directory)


def build_model_dir(name: str, shape: dict[str, Any], root: Path, dtype: torch.dtype, seed: int) -> Path:
    """Random weights of ``shape`` saved as a HF model directory (config, safetensors, tokenizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = root / name
    directory.mkdir(parents=True, exist_ok=True)
    kwargs = dict(shape)
    model_type = kwargs.pop("model_type")
    v = kwargs["vocab_size"]
    config = AutoConfig.for_model(
        model_type, eos_token_id=v - 1, pad_token_id=v - 1, bos_token_id=None, **kwargs
    )
    torch.manual_seed(seed)
    init_device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(init_device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = v - 1
    model.generation_config.pad_token_id = v - 1
    model.save_pretrained(directory)
    save_tokenizer(v, directory)
    n = sum(p.numel() for p in model.parameters())
    del model
    _free(torch.device(init_device))
    log.info("built %s: %.0fM parameters at %s", name, n / 1e6, directory)
    return directory


def random_prompts(n: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size - 1) for _ in range(length)] for _ in range(n)]


# ------------------------------------------------------------------------------------ (a) engine


def _engine_config(args: argparse.Namespace, max_num_seqs: int) -> Any:
    from berth.server.engine import EngineConfig

    cfg = EngineConfig(
        max_num_seqs=max_num_seqs,
        max_queue=max(4096, args.num_requests),
        max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_memory_fraction=args.kv_cache_memory_fraction,
        kv_cache_cpu_gib=args.kv_cache_cpu_gib,
    )
    overrides: dict[str, Any] = {}
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    for item in args.engine_arg:
        key, _, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if key not in fields:
            raise SystemExit(
                f"--engine-arg {item!r}: EngineConfig has no field {key!r} (fields: {sorted(fields)})"
            )
        current = getattr(cfg, key)
        if isinstance(current, bool):
            overrides[key] = raw.lower() in ("1", "true", "yes", "on")
        elif isinstance(current, int):
            overrides[key] = int(raw)
        elif isinstance(current, float):
            overrides[key] = float(raw)
        else:
            overrides[key] = (
                None if raw.lower() == "none" else json.loads(raw) if raw[:1] in "[{0123456789" else raw
            )
    return dataclasses.replace(cfg, **overrides)


def _requests(prompts: list[list[int]], max_tokens: int, prefix: str) -> list[Any]:
    from berth.server.engine import GenerationRequest, SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return [GenerationRequest(f"{prefix}-{i}", ids, params) for i, ids in enumerate(prompts)]


def _run_core(core: Any, requests: list[Any]) -> tuple[float, int, list[tuple[float, int]]]:
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
    from berth.server.engine.engine import EngineCore
    from berth.server.loader import load_model

    t0 = time.perf_counter()
    loaded = load_model(
        str(model_dir), dtype=args.dtype, device=str(device), max_model_len=args.max_model_len
    )
    core = EngineCore(loaded, _engine_config(args, max_num_seqs=args.max_num_seqs))
    setup_s = time.perf_counter() - t0
    out: dict[str, Any] = {
        "setup_seconds": round(setup_s, 2),
        "engine_config": dataclasses.asdict(core.config),
        "num_kv_blocks": core.bm.num_blocks,
    }
    # warm-up: a few requests of the same shape (kernels, allocator, CUDA graphs if the engine captures lazily)
    warm = random_prompts(min(8, args.num_requests), args.input_len, vocab, seed=args.seed + 99)
    _run_core(core, _requests(warm, 8, "warm"))

    prompts = random_prompts(args.num_requests, args.input_len, vocab, seed=args.seed)
    seconds, n_out, steps = _run_core(core, _requests(prompts, args.output_len, "tput"))
    expected = args.num_requests * args.output_len
    decode_steps = [s for s, n in steps if n >= 1]
    out.update(
        {
            "requests": args.num_requests,
            "output_tokens": n_out,
            "output_tokens_expected": expected,
            "seconds": round(seconds, 3),
            "output_tokens_per_s": n_out / seconds,
            "total_tokens_per_s": (n_out + args.num_requests * args.input_len) / seconds,
            "steps": len(steps),
            "mean_step_ms": 1000 * sum(s for s, _ in steps) / max(len(steps), 1),
            "max_batch_sampled": max((n for _, n in steps), default=0),
            "mean_batch_sampled": sum(n for _, n in steps) / max(len(decode_steps), 1),
        }
    )
    # batch-1 decode: one request alone; decode rate between its first and last token
    b1 = _requests(random_prompts(1, args.input_len, vocab, seed=args.seed + 1), args.b1_output_len, "b1")
    core.add(core.make_sequence(b1[0]))
    t_first: float | None = None
    n = 0
    while core.has_work():
        events = core.step()
        if events:
            n += len(events)
            now = time.perf_counter()
            if t_first is None:
                t_first = now
            t_last = now
    assert t_first is not None
    out["b1_output_tokens"] = n
    out["b1_decode_tokens_per_s"] = (n - 1) / (t_last - t_first) if n > 1 and t_last > t_first else 0.0
    out["b1_ms_per_token"] = 1000 / out["b1_decode_tokens_per_s"] if out["b1_decode_tokens_per_s"] else None

    if args.greedy_check:
        out["greedy_tokens"] = {}
        for length in args.check_lengths:
            p = random_prompts(1, length, vocab, seed=args.seed + 1000 + length)
            res = core.run(_requests(p, args.check_tokens, f"chk{length}"))
            out["greedy_tokens"][str(length)] = {
                "prompt": p[0],
                "tokens": [ev.token_id for ev in next(iter(res.values()))],
            }

    out["static_decode_steps"] = core.runner.num_static_steps
    out["cuda_graph_captures"] = core.runner.num_graph_captures
    if args.profile and device.type == "cuda":
        out["profile"] = profile_engine(core, args, vocab)
    del core, loaded
    _free(device)
    return out


def profile_engine(core: Any, args: argparse.Namespace, vocab: int) -> dict[str, Any]:
    """torch.profiler over a short run at --concurrency: GPU busy vs wall time, top kernels."""
    from torch.profiler import ProfilerActivity, profile

    prompts = random_prompts(args.concurrency, args.input_len, vocab, seed=args.seed + 7)
    reqs = _requests(prompts, 32, "prof")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        wall, _, steps = _run_core(core, reqs)
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


# ------------------------------------------------------------------------------------ (b) server


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
    server_args = [
        *("--model", str(model_dir), "--served-model-name", name),
        *("--device", str(device), "--dtype", args.dtype, "--max-model-len", str(args.max_model_len)),
        *("--max-num-seqs", str(args.max_num_seqs), "--max-queue", str(max(4096, args.num_requests))),
        *("--max-num-batched-tokens", str(args.max_num_batched_tokens)),
        *("--kv-cache-memory-fraction", str(args.kv_cache_memory_fraction)),
        *("--kv-cache-cpu-gib", str(args.kv_cache_cpu_gib)),
        *("--log-level", "warning"),
    ]
    out: dict[str, Any] = {"server_args": server_args}
    t0 = time.perf_counter()
    with ServerProcess(server_args, log_dir=workdir / f"server-{name}", env=env) as server:
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
                "--max-concurrency",
                str(args.concurrency),
                "--num-warmups",
                "2",
            ],
        }
        for key, extra in runs.items():
            result_file = workdir / f"bench-{name}-{key}.json"
            cmd = [
                sys.executable,
                "-m",
                "berth.cli",
                "bench",
                *common,
                *extra,
                "--result-file",
                str(result_file),
            ]
            proc = subprocess.run(
                cmd, capture_output=True, text=True, env={**os.environ, **env}, timeout=args.timeout
            )
            if proc.returncode != 0 or not result_file.exists():
                out[key] = {
                    "error": f"berth bench exited {proc.returncode}: {(proc.stdout + proc.stderr)[-2000:]}"
                }
                continue
            r = json.loads(result_file.read_text())
            out[key] = {
                k: v
                for k, v in r.items()
                if not isinstance(v, list | dict) or k in ("error_counts", "percentiles")
            }
    return out


# ------------------------------------------------------------------------------------ (c), (d) transformers


def _load_hf(model_dir: Path, dtype: torch.dtype, device: torch.device) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    model.generation_config.eos_token_id = None  # EOS ignored, as in the engine runs
    return model


def _gen_config(max_new_tokens: int, pad: int, **kw: Any) -> Any:
    from transformers import GenerationConfig

    return GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=pad, **kw
    )


def bench_generate_batch(
    model: Any, args: argparse.Namespace, device: torch.device, vocab: int
) -> dict[str, Any]:
    if not hasattr(model, "generate_batch"):
        return {"skipped": "this transformers has no generate_batch"}
    from transformers import GenerationConfig

    prompts = random_prompts(args.num_requests, args.input_len, vocab, seed=args.seed)
    cfg = GenerationConfig(
        max_new_tokens=args.output_len, do_sample=False, eos_token_id=-1, pad_token_id=vocab - 1
    )
    times = []
    n_out = 0
    for i in range(args.reference_repeats):
        _sync(device)
        t0 = time.perf_counter()
        res = model.generate_batch(inputs=prompts, generation_config=cfg, persistent_manager=True)
        _sync(device)
        times.append(time.perf_counter() - t0)
        n_out = sum(len(r.generated_tokens) for r in res.values())
        log.info("generate_batch run %d: %.1f s, %d tokens", i, times[-1], n_out)
    with contextlib.suppress(Exception):
        model.destroy_cached_continuous_batching_manager()
    best = min(times)
    return {
        "requests": len(prompts),
        "output_tokens": n_out,
        "seconds_per_run": [round(t, 3) for t in times],
        "note": "first run includes the manager's set-up and CUDA graph warm-up; the best run is reported",
        "output_tokens_per_s": n_out / best,
    }


def bench_generate(model: Any, args: argparse.Namespace, device: torch.device, vocab: int) -> dict[str, Any]:
    prompts = random_prompts(args.num_requests, args.input_len, vocab, seed=args.seed)
    b = min(args.generate_batch, len(prompts))
    cfg = _gen_config(args.output_len, vocab - 1)
    with torch.no_grad():
        warm = torch.tensor(prompts[:2], device=device)
        model.generate(
            warm, generation_config=_gen_config(4, vocab - 1), attention_mask=torch.ones_like(warm)
        )
        _sync(device)
        t0 = time.perf_counter()
        n_out = 0
        for i in range(0, len(prompts), b):
            ids = torch.tensor(prompts[i : i + b], device=device)
            gen = model.generate(ids, generation_config=cfg, attention_mask=torch.ones_like(ids))
            n_out += (gen.shape[1] - ids.shape[1]) * ids.shape[0]
        _sync(device)
        seconds = time.perf_counter() - t0
    return {
        "batch_size": b,
        "requests": len(prompts),
        "output_tokens": n_out,
        "seconds": round(seconds, 3),
        "output_tokens_per_s": n_out / seconds,
    }


def bench_static_b1(model: Any, args: argparse.Namespace, device: torch.device, vocab: int) -> dict[str, Any]:
    """Batch-1 decode with a static cache: (t(N tokens) - t(1 token)) / (N - 1)."""
    ids = torch.tensor(random_prompts(1, args.input_len, vocab, seed=args.seed + 1), device=device)
    mask = torch.ones_like(ids)

    def timed(n: int) -> tuple[float, int]:
        cfg = _gen_config(n, vocab - 1, cache_implementation="static")
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            gen = model.generate(ids, generation_config=cfg, attention_mask=mask)
        _sync(device)
        return time.perf_counter() - t0, gen.shape[1] - ids.shape[1]

    timed(8)  # warm-up
    t1, _ = timed(1)
    tn, n = timed(args.b1_output_len)
    rate = (n - 1) / (tn - t1) if tn > t1 else 0.0
    return {
        "output_tokens": n,
        "prefill_plus_one_s": round(t1, 4),
        "seconds": round(tn, 3),
        "decode_tokens_per_s": rate,
    }


def greedy_reference(model: Any, engine: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """``generate`` greedy on the prompts the engine ran; compare token for token."""
    checks = engine.get("greedy_tokens") or {}
    out: dict[str, Any] = {}
    for length, item in checks.items():
        ids = torch.tensor([item["prompt"]], device=device)
        n = len(item["tokens"])
        with torch.no_grad():
            gen = model.generate(
                ids, generation_config=_gen_config(n, 0), attention_mask=torch.ones_like(ids)
            )
        ref = gen[0, ids.shape[1] :].tolist()
        same = next(
            (i for i, (a, b) in enumerate(zip(ref, item["tokens"], strict=False)) if a != b), min(len(ref), n)
        )
        out[length] = {"tokens": n, "matching_prefix": same, "exact": ref == item["tokens"]}
    return out


# ------------------------------------------------------------------------------------ report


def ratios(m: dict[str, Any]) -> dict[str, float | None]:
    def get(section: str, key: str) -> float | None:
        v = m.get(section, {}).get(key)
        return float(v) if isinstance(v, int | float) and v > 0 else None

    eng = get("engine", "output_tokens_per_s")
    gb = get("generate_batch", "output_tokens_per_s")
    gen = get("generate", "output_tokens_per_s")
    b1 = get("engine", "b1_decode_tokens_per_s")
    st = get("static_b1", "decode_tokens_per_s")
    eg = get("engine_graphs", "output_tokens_per_s")
    b1g = get("engine_graphs", "b1_decode_tokens_per_s")
    return {
        "engine_vs_generate_batch": eng / gb if eng and gb else None,
        "engine_vs_generate": eng / gen if eng and gen else None,
        "b1_engine_vs_static_cache": b1 / st if b1 and st else None,
        "engine_graphs_vs_generate_batch": eg / gb if eg and gb else None,
        "b1_engine_graphs_vs_static_cache": b1g / st if b1g and st else None,
        "graphs_vs_eager": eg / eng if eg and eng else None,
        "b1_graphs_vs_eager": b1g / b1 if b1g and b1 else None,
    }


def _fmt(v: Any, nd: int = 1) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    return str(v)


def markdown(report: dict[str, Any]) -> str:
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
    lines += [
        f"Run {report['date']} · device `{env['device']}`"
        + (
            f" · {env.get('gpu')} ({env.get('gpu_memory_gib')} GiB) · driver {env.get('driver')} · CUDA {env.get('cuda')}"
            if "gpu" in env
            else f" · {env.get('cpu')}"
        )
        + f" · torch {env['torch']} · transformers {env['transformers']}",
        "",
        f"Workload: {wl['num_requests']} requests, {wl['input_len']} prompt tokens, {wl['output_len']} output tokens, "
        f"EOS ignored, greedy, dtype {wl['dtype']}; batch-1 decode over {wl['b1_output_len']} tokens; "
        f"server latency at {wl['concurrency']} concurrent streams. Weights random, shapes real.",
        "",
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
        greedy = m.get("greedy_check", {})
        checks = [g for g in greedy.values() if isinstance(g, dict)] if "error" not in greedy else []
        gtxt = f"{sum(1 for g in checks if g.get('exact'))}/{len(checks)} exact" if checks else "—"
        lines.append(
            f"| {name} | {_fmt(m.get('engine', {}).get('output_tokens_per_s'))} | {_fmt(tput.get('output_throughput'))} "
            f"| {_fmt(m.get('generate_batch', {}).get('output_tokens_per_s'))} "
            f"| {_fmt(m.get('generate', {}).get('output_tokens_per_s'))} | {_fmt(r['engine_vs_generate_batch'], 2)}x "
            f"| {_fmt(m.get('engine', {}).get('b1_decode_tokens_per_s'))} "
            f"| {_fmt(m.get('static_b1', {}).get('decode_tokens_per_s'))} | {_fmt(r['b1_engine_vs_static_cache'], 2)}x "
            f"| {ttft} | {gtxt} |"
        )
    lines += [
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
        greedy = m.get("greedy_check_graphs", {})
        checks = [g for g in greedy.values() if isinstance(g, dict)] if "error" not in greedy else []
        gtxt = f"{sum(1 for g in checks if g.get('exact'))}/{len(checks)} exact" if checks else "—"
        lines.append(
            f"| {name} | {_fmt(eg.get('output_tokens_per_s'))} | {_fmt(r.get('engine_graphs_vs_generate_batch'), 2)}x "
            f"| {_fmt(r.get('graphs_vs_eager'), 2)}x | {_fmt(eg.get('b1_decode_tokens_per_s'))} "
            f"| {_fmt(r.get('b1_engine_graphs_vs_static_cache'), 2)}x | {_fmt(r.get('b1_graphs_vs_eager'), 2)}x "
            f"| {_fmt(eg.get('cuda_graph_captures'))} | {gtxt} |"
        )
    lines += [
        "",
        f"Targets (issue 6, Qwen2.5-0.5B shape on an H100): engine ≥ {TARGET_ENGINE_VS_GENERATE_BATCH:g}x generate_batch, "
        f"batch-1 ≥ {TARGET_B1_VS_STATIC:g}x static-cache generate, TTFT p99 at 64 streams reported.",
        "",
    ]
    for name, m in report["models"].items():
        errors = {k: v["error"] for k, v in m.items() if isinstance(v, dict) and "error" in v}
        srv = m.get("server", {})
        if isinstance(srv, dict):
            errors.update(
                {f"server.{k}": v["error"] for k, v in srv.items() if isinstance(v, dict) and "error" in v}
            )
        if errors:
            lines.append(
                f"**{name}: failed sections** — " + "; ".join(f"`{k}`: {v[:300]}" for k, v in errors.items())
            )
            lines.append("")
        prof = m.get("engine", {}).get("profile")
        if prof:
            lines += [
                f"### {name}: where an engine step goes ({prof['requests']} requests x {prof['output_tokens_each']} tokens, torch.profiler)",
                "",
                f"{prof['steps']} steps, {prof['mean_step_ms']:.2f} ms per step; GPU busy {prof['gpu_busy_ms']:.1f} ms of "
                f"{prof['wall_ms']:.1f} ms wall ({100 * prof['gpu_busy_fraction']:.0f}%)"
                + (
                    " — the step is CPU-bound (launches, scheduling, Python): CUDA graphs / fewer kernels move it next."
                    if prof["gpu_busy_fraction"] < 0.6
                    else " — the GPU is the limit: the top kernels below move it next."
                ),
                "",
                "| op | device ms | calls |",
                "|---|---|---|",
                *[f"| `{o['name']}` | {o['device_ms']:.2f} | {o['calls']} |" for o in prof["top_device_ops"]],
                "",
            ]
    lines.append("Raw figures: the JSON file next to this one.")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
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
    add("--out-dir", default=str(REPO / "bench" / "results"))
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
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[args.dtype]
    shapes = SMOKE_SHAPES if args.smoke else MODEL_SHAPES
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in shapes]
    if unknown:
        print(f"unknown model shapes {unknown}; known: {list(shapes)}", file=sys.stderr)
        return 2
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}

    report: dict[str, Any] = {
        "smoke": args.smoke,
        "label": "CPU SMOKE RUN - not a benchmark" if args.smoke else "benchmark",
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "environment": env_info(device),
        "workload": {
            k: getattr(args, k)
            for k in (
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
        },
        "models": {},
    }
    report["workload"]["ignore_eos"] = True
    report["workload"]["greedy"] = True

    with _workdir(args.keep_models) as root:
        for name in names:
            shape = shapes[name]
            log.info("== %s", name)
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
            if not {"generate_batch", "generate", "static_b1"} <= skip or args.greedy_check:
                hf = _load_hf(model_dir, dtype, device)
                for section, check in (("engine", "greedy_check"), ("engine_graphs", "greedy_check_graphs")):
                    if args.greedy_check and "greedy_tokens" in m.get(section, {}):
                        engine_m = m[section]
                        _section(m, check, greedy_reference, hf, engine_m, device)
                        engine_m.pop("greedy_tokens", None)
                if "generate_batch" not in skip:
                    _section(m, "generate_batch", bench_generate_batch, hf, args, device, vocab)
                if "generate" not in skip:
                    _section(m, "generate", bench_generate, hf, args, device, vocab)
                if "static_b1" not in skip:
                    _section(m, "static_b1", bench_static_b1, hf, args, device, vocab)
                del hf
                _free(device)
            if "server" not in skip:
                _section(m, "server", bench_server, model_dir, name, args, device, root)
            m["ratios"] = ratios(m)
            report["models"][name] = m
            log.info("%s ratios: %s", name, m["ratios"])

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        stem = "gpu-engine-cpu-smoke"
    else:
        gpu = report["environment"].get("gpu", str(device))
        stem = "gpu-engine-" + re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out_dir / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))
    print(f"results: {out_dir / stem}.json and .md")
    failed = [
        f"{n}.{k}"
        for n, m in report["models"].items()
        for k, v in m.items()
        if isinstance(v, dict) and "error" in v
    ]
    failed += [
        f"{n}.server.{k}"
        for n, m in report["models"].items()
        for k, v in (m.get("server") or {}).items()
        if isinstance(v, dict) and "error" in v
    ]
    if failed:
        print(f"failed sections: {failed}", file=sys.stderr)
        return 1
    return 0


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


if __name__ == "__main__":
    sys.exit(main())
