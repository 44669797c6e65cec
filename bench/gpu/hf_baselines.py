"""(c), (d) The transformers baselines on the same weights: ``generate_batch`` (continuous
batching, when the installed transformers has it), ``generate`` at a fixed batch, batch-1 decode
with a static cache, and ``generate``'s greedy tokens for the agreement check.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import torch

from bench.gpu.device import sync
from bench.gpu.models import random_prompts

log = logging.getLogger(__name__)


def load_hf(model_dir: Path, dtype: torch.dtype, device: torch.device) -> Any:
    from transformers import AutoModelForCausalLM

    auto: Any = AutoModelForCausalLM  # partly untyped
    model = auto.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    model.generation_config.eos_token_id = None  # EOS ignored, as in the engine runs
    return model


def _gen_config(max_new_tokens: int, pad: int, eos: int | None = None, **kw: Any) -> Any:
    """Greedy, ``max_new_tokens``, no EOS stop (``eos`` -1 for ``generate_batch``, which wants an int)."""
    from transformers import GenerationConfig

    make: Any = GenerationConfig  # untyped
    return make(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad, **kw)


def bench_generate_batch(
    model: Any, args: argparse.Namespace, device: torch.device, vocab: int
) -> dict[str, Any]:
    if not hasattr(model, "generate_batch"):
        return {"skipped": "this transformers has no generate_batch"}
    prompts = random_prompts(args.num_requests, args.input_len, vocab, seed=args.seed)
    cfg = _gen_config(args.output_len, vocab - 1, eos=-1)
    # On CPU transformers sizes its paged cache from the machine's free memory (14 GB on a 24 GB box),
    # which gets the process OOM-killed on a shared machine: the smoke workload needs a few MB.
    extra: dict[str, Any] = {}
    if device.type == "cpu":
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        make_cb: Any = ContinuousBatchingConfig
        extra["continuous_batching_config"] = make_cb(max_memory_percent=0.02)
    times = []
    n_out = 0
    for i in range(args.reference_repeats):
        sync(device)
        t0 = time.perf_counter()
        res = model.generate_batch(inputs=prompts, generation_config=cfg, persistent_manager=True, **extra)
        sync(device)
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
        sync(device)
        t0 = time.perf_counter()
        n_out = 0
        for i in range(0, len(prompts), b):
            ids = torch.tensor(prompts[i : i + b], device=device)
            gen = model.generate(ids, generation_config=cfg, attention_mask=torch.ones_like(ids))
            n_out += (gen.shape[1] - ids.shape[1]) * ids.shape[0]
        sync(device)
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
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            gen = model.generate(ids, generation_config=cfg, attention_mask=mask)
        sync(device)
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
