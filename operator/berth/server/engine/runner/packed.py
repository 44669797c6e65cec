"""Weight formats of the native forward on CPU: lower-precision linear layers, and the ``auto`` choice.

- ``fp32`` (also ``none``): the model's own weights and dtype, unpacked (full precision).
- ``fp16``: weights rounded to float16 once, computed in float32 (``linear_dynamic_fp16``, fbgemm): half
  the weight bytes; greedy output equal to fp32 on the fixed prompt set of tests/server/test_packed_weights.py.
- ``bf16``: weights and activations in bfloat16 (oneDNN; fast where the CPU has native bf16, e.g.
  AVX512-BF16 or AMX), logits back in float32. Not exact: activations are rounded too.
- ``int8``: weights quantized per output channel (symmetric int8), activations quantized dynamically per
  call (``torch.ops.quantized.linear_dynamic``, fbgemm; 7-bit activation range as torch's default, since
  CPUs without VNNI saturate on the full range). About 4x fewer weight bytes per step; not exact.
- ``auto``: measured at start-up on the machine it runs on, among the formats whose greedy output equals
  fp32's on the fixed prompt set (fp32, fp16): see ``choose``. fp32 stays unless fp16 is clearly faster.

Measured per linear, one thread (docs/server.md, "CPU performance"): on an AVX2-only EPYC, fp16 2.4x and
int8 5x faster than fp32 over a whole forward; on an AVX-512/bf16 EPYC, the LM head 49152x576 at one row
fp32 7.8 ms, bf16 1.8, fp16 1.7, int8 0.9 ms. torch's weight-only kernels (``_weight_int8pack_mm``,
``_weight_int4pack_mm_for_cpu``, which could serve GGUF Q4_1 blocks as they are) were 10-20x slower than
fp32 on the AVX2 CPU (no vectorised path), so they are not offered.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

# What EngineConfig.weight_format / `berth serve --weight-format` take ("none" is the older name of fp32).
WEIGHT_FORMATS = ("auto", "fp32", "fp16", "bf16", "int8")
PACKED_FORMATS = ("fp16", "bf16", "int8")
# Candidates of ``auto``: greedy output equal to fp32 on the fixed prompt set (tests/server/test_packed_weights.py).
AUTO_CANDIDATES = ("fp32", "fp16")
# fp16 replaces fp32 only when at least this much faster at every measured batch size.
AUTO_MARGIN = 0.9


def normalize(fmt: str) -> str:
    """``none`` -> ``fp32``; ValueError for an unknown format."""
    fmt = "fp32" if fmt == "none" else fmt
    if fmt not in WEIGHT_FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}: use one of {', '.join(WEIGHT_FORMATS)}")
    return fmt


def cpu_flags() -> set[str]:
    """The CPU's feature flags (``/proc/cpuinfo``), empty where unknown."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def native_bf16() -> bool:
    flags = cpu_flags()
    return bool(flags & {"avx512_bf16", "amx_bf16"})


class PackedLinear:
    """``y = x W^T + b`` with W packed once in ``fmt`` (float32 in and out)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, fmt: str) -> None:
        if fmt not in PACKED_FORMATS:
            raise ValueError(f"unknown packed weight format {fmt!r}: use one of {', '.join(PACKED_FORMATS)}")
        w = weight.detach().float().contiguous()
        b = None if bias is None else bias.detach().float().contiguous()
        self.fmt = fmt
        self.out_features = int(w.shape[0])
        self.packed: Any = None
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        if fmt == "int8":
            scales = (w.abs().amax(dim=1).clamp(min=1e-12) / 127.0).double()
            zeros = torch.zeros(w.shape[0], dtype=torch.long)
            with (
                warnings.catch_warnings()
            ):  # quantized tensors are deprecated, fbgemm's kernels are not gone yet
                warnings.simplefilter("ignore", UserWarning)
                qw = torch.quantize_per_channel(w, scales, zeros, 0, torch.qint8)
            self.packed = torch.ops.quantized.linear_prepack(qw, b)
        elif fmt == "fp16":
            self.packed = torch.ops.quantized.linear_prepack_fp16(w, b)
        else:
            self.weight = w.to(torch.bfloat16)
            self.bias = None if b is None else b.to(torch.bfloat16)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.fmt == "bf16":
            assert self.weight is not None
            return F.linear(x.to(torch.bfloat16), self.weight, self.bias).float()
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float().contiguous()
        if self.fmt == "int8":
            y = torch.ops.quantized.linear_dynamic(x2, self.packed, True)
        else:
            y = torch.ops.quantized.linear_dynamic_fp16(x2, self.packed)
        out: torch.Tensor = y.reshape(*shape[:-1], self.out_features)
        return out


def pack_module(mod: Any, fmt: str) -> PackedLinear:
    """A ``PackedLinear`` from an ``nn.Linear`` (its weight and bias)."""
    return PackedLinear(mod.weight, getattr(mod, "bias", None), fmt)


def time_steps(
    candidates: Mapping[str, Callable[[int], None]],
    batches: tuple[int, ...],
    rounds: int = 4,
    budget_s: float = 4.0,
) -> dict[str, dict[int, float]]:
    """CPU seconds of one call of each candidate per batch size, on one torch thread: the best of up to
    ``rounds``, candidates interleaved, one untimed call first; fewer rounds (at least one) once ``budget_s``
    of wall time is spent.

    CPU time of one thread, not wall time: on a shared machine a step's wall time is mostly how long the
    step waited for a core (measured: best-of-4 wall times of the same step 0.4 s and 1.5 s a minute apart
    at load 9 on 2 cores), its thread's CPU time is what the weights cost."""
    best: dict[str, dict[int, float]] = {name: {} for name in candidates}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _time_steps(candidates, batches, rounds, budget_s, best)
    finally:
        torch.set_num_threads(threads)
    return best


def _time_steps(
    candidates: Mapping[str, Callable[[int], None]],
    batches: tuple[int, ...],
    rounds: int,
    budget_s: float,
    best: dict[str, dict[int, float]],
) -> None:
    start = time.perf_counter()
    for i, b in enumerate(batches):
        for run in candidates.values():
            run(b)
        for r in range(rounds):
            share = budget_s * (i + (r + 1) / rounds) / len(batches)
            if r > 0 and time.perf_counter() - start > share:
                break
            for name, run in candidates.items():
                t0 = time.thread_time()
                run(b)
                dt = time.thread_time() - t0
                best[name][b] = min(best[name].get(b, dt), dt)


def choose(timings: Mapping[str, Mapping[int, float]]) -> tuple[str, str]:
    """(format, why) from ``time_steps``'s figures of fp32 and fp16: fp16 when it is at least
    1/AUTO_MARGIN times faster at every batch size, else fp32 (full precision where it is not slower)."""
    t32, t16 = timings["fp32"], timings.get("fp16", {})
    figures = ", ".join(
        f"batch {b}: fp32 {t32[b] * 1e3:.1f} ms, fp16 {t16[b] * 1e3:.1f} ms" for b in sorted(t32) if b in t16
    )
    if t16 and all(b in t16 and t16[b] <= AUTO_MARGIN * t32[b] for b in t32):
        return "fp16", f"fp16 weights decode faster on this CPU ({figures} of CPU per step)"
    return "fp32", f"fp16 weights are not clearly faster on this CPU ({figures} per step)"
