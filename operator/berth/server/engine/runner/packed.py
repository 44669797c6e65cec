"""Weight formats of the native forward on CPU: lower-precision linear layers, and the ``auto`` choice.

- ``fp32`` (also ``none``): the model's own weights and dtype, unpacked (full precision).
- ``fp16``: weights rounded to float16 once, computed in float32 (``linear_dynamic_fp16``, fbgemm): half
  the weight bytes; greedy output equal to fp32 on the fixed prompt set of tests/server/test_packed_weights.py.
- ``bf16``: weights and activations in bfloat16 (oneDNN; fast where the CPU has native bf16, e.g.
  AVX512-BF16 or AMX), logits back in float32. Not exact: activations are rounded too.
- ``int8``: weights quantized per output channel (symmetric int8), activations quantized dynamically per
  call (``torch.ops.quantized.linear_dynamic``, fbgemm; 7-bit activation range as torch's default, since
  CPUs without VNNI saturate on the full range). About 4x fewer weight bytes per step; not exact.
- ``gguf``: a model loaded from a .gguf file keeps its linear weights' blocks as they are in the file
  (runner/gguf_q4.py attaches them): where Berth's AVX2 kernels build (runner/cpu_kernels.py: x86-64 with
  AVX2/FMA/F16C and a C compiler) Q4_0/Q4_1 and Q8_0 run in them (``KernelQ4Linear``, ``KernelQ8Linear``:
  activations quantized inside the call to two int8 digits per block of 32, about 15 bits; the norm before a
  projection and the residual add after it in the same call), and a decode step's attention too (rotary, cache
  write, paged attention in one call a layer). Elsewhere Q4_0/Q4_1 go to torch's int4pack (``Int4Linear``,
  ``_weight_int4pack_mm_for_cpu``, group 32; Q4_1's ``d q + m`` is int4pack's ``(q - 8) scale + zero``) with
  activations, scales and zeros in bfloat16 (the kernel's only vectorised path: with fp32 activations it is
  exact but 1.5 ms against 43 us for a 1536x576 linear at one row). Fused q|k|v and gate|up as the other
  formats. Linears without a kernel (K-quants, F16; Q8_0 without Berth's kernels) are packed as fp16 (bf16
  where torch has no fbgemm), which the log says. Not exact: greedy output within the tolerance of
  tests/server/test_gguf_weights.py. A model not loaded from a GGUF file is refused naming the flag.
- ``auto``: measured at start-up on the machine it runs on, among the formats whose greedy output equals
  fp32's on the fixed prompt set (fp32, fp16): see ``choose``. fp32 stays unless fp16 is clearly faster.
  ``gguf`` is not a candidate: it is not exact (one of 8 prompts leaves fp32's tokens at token 24) and,
  where it is faster than fp16 (1-2 rows), int8 is as fast.

Measured per linear, one thread (docs/server.md, "CPU performance"): on an AVX2-only EPYC, fp16 2.4x and
int8 5x faster than fp32 over a whole forward; on an AVX-512/bf16 EPYC, the LM head 49152x576 at one row
fp32 7.8 ms, bf16 1.8, fp16 1.7, int8 0.9 ms. torch's weight-only kernels (``_weight_int8pack_mm``,
``_weight_int4pack_mm_for_cpu``) were 10-20x slower than fp32 on the AVX2 CPU (no vectorised path).

The whole forward on the AVX-512/bf16 EPYC (bench/cpu_weight_formats.py: one decode step of B rows, best of 7;
load 1.8 on the 2 shared cores; 1 thread: its CPU time; 2 threads: wall time, ms per step):

    batch  threads  fp32    fp16   int8   bf16   gguf
    1      1        39.0    16.5   10.7   17.7   11.1
    8      1        69.2    24.6   16.4   31.9   22.0
    32     1        143.8   64.6   33.4   51.6   68.4
    1      2        38.9    14.6   10.0   14.8   9.4
    8      2        58.7    16.5   12.2   21.1   14.4
    32     2        94.5    38.8   22.3   33.7   39.5

The int4pack kernel's cost grows with the rows almost linearly (one 1536x576 linear, weights in cache, one
thread: 48 us at 1 row, 157 at 8, 478 at 32, 8.5 ms at 512 against fp16's 69, 99, 295 us, 4.9 ms): ``gguf``
pays at one or two decode rows and in weight memory, not in prefill or larger batches. Weight memory of an
``Int4Linear``: 5 bits per weight (4 bits of code, two per byte, plus a bfloat16 scale and zero per group of 32:
32 bits / 32 weights; 6 with the float32 scales of ``act_dtype=float32``), whether the file's block was Q4_1 (5
bits there too) or Q4_0 (4.5 bits in the file: int4pack stores a zero for it as well). SmolLM2-135M: 63 MiB of
int4pack for its 30 layers' linears, plus the LM head as fp16 (54 MiB).

Memory while and after packing (``ModelRunner(..., release_weights=True)``, what ``berth serve`` asks for): the
GGUF codes are read from the file one packed linear at a time (a fused q|k|v holds three), and each packed
linear's float weights are released once the packs of its layer are built (replaced by a ``meta`` tensor of the
same shape: the forward uses only the packs). Without ``release_weights`` (the default: several runners may
share one loaded model, as the tests and bench/cpu_weight_formats.py do) the model keeps its float weights.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from berth.server.engine.runner import cpu_kernels
from berth.server.engine.runner.cpu_kernels import cpu_flags

logger = logging.getLogger(__name__)

# What EngineConfig.weight_format / `berth serve --weight-format` take ("none" is the older name of fp32).
WEIGHT_FORMATS = ("auto", "fp32", "fp16", "bf16", "int8", "gguf")
# Formats of PackedLinear (a float weight packed once).
LINEAR_FORMATS = ("fp16", "bf16", "int8")
# The GGUF file's own Q4_0/Q4_1 blocks as int4pack (runner/gguf_q4.py attaches them to the modules).
GGUF_FORMAT = "gguf"
PACKED_FORMATS = (*LINEAR_FORMATS, GGUF_FORMAT)
# What a linear of the gguf format without a 4-bit kernel (Q8_0, K-quants, F16, the LM head) is packed as:
# fp16 where torch can pack it (the dequantized GGUF values within fp16 rounding, fp32 compute), else bf16.
GGUF_FALLBACKS = ("fp16", "bf16")
# The attribute of an nn.Linear that holds where its GGUF 4-bit weight is read from (a Q4Source) while the runner packs.
Q4_ATTR = "berth_gguf_q4"
Q4_GROUP = 32
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


def native_bf16() -> bool:
    flags = cpu_flags()
    return bool(flags & {"avx512_bf16", "amx_bf16"})


class PackedLinear:
    """``y = x W^T + b`` with W packed once in ``fmt`` (float32 in and out)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, fmt: str) -> None:
        if fmt not in LINEAR_FORMATS:
            raise ValueError(f"unknown packed weight format {fmt!r}: use one of {', '.join(LINEAR_FORMATS)}")
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


@dataclass
class Q4Source:
    """Where a module's GGUF weight (Q4_0/Q4_1, or Q8_0 where Berth's CPU kernels run) is read from, on demand
    (runner/gguf_q4.py attaches one per module as ``Q4_ATTR``): ``load()`` reads the codes again from the file, so
    only the linears being packed have theirs in memory."""

    load: Callable[[], Q4Weight | Q8Weight]


@dataclass
class Q4Weight:
    """A GGUF Q4_0/Q4_1 weight as it is in the file (rows in the HF module's order): ``codes`` uint8 [N, K] in
    0..15, per block of 32 along K a scale ``d`` and a minimum ``m`` [N, K/32] (float32 of the file's fp16):
    w = d * q + m (Q4_1), w = d * (q - 8) (Q4_0, ``m`` None)."""

    codes: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K], in the gguf package's arithmetic (what transformers' GGUF loader gives)."""
        n, k = self.codes.shape
        q = self.codes.view(n, k // Q4_GROUP, Q4_GROUP).float()
        d = self.d.unsqueeze(-1)
        w = d * q + self.m.unsqueeze(-1) if self.m is not None else d * (q - 8.0)
        return w.reshape(n, k)

    def scale_zero(self) -> tuple[torch.Tensor, torch.Tensor]:
        """int4pack's per-group (scale, zero), w = (q - 8) * scale + zero: scale = d, zero = m + 8 d."""
        zero = self.m + 8.0 * self.d if self.m is not None else torch.zeros_like(self.d)
        return self.d, zero


@dataclass
class Q8Weight:
    """A GGUF Q8_0 weight as it is in the file: ``codes`` int8 [N, K], a scale ``d`` [N, K/32] (float32 of the
    file's fp16) per block of 32 along K: w = d * q. ``m`` is always None (the fields are Q4Weight's)."""

    codes: torch.Tensor
    d: torch.Tensor
    m: None = None

    def dequantize(self) -> torch.Tensor:
        n, k = self.codes.shape
        return (self.d.unsqueeze(-1) * self.codes.view(n, k // Q4_GROUP, Q4_GROUP).float()).reshape(n, k)


class KernelLinear(PackedLinear):
    """A linear in Berth's AVX2 kernels (runner/cpu_kernels.c); ``run`` can also apply the RMSNorm before it and add
    the residual after it in the same call (runner/fused_layers.py). float32 in and out."""

    def __init__(
        self, kernel: str, packed: torch.Tensor, out_features: int, bias: torch.Tensor | None
    ) -> None:
        self.fmt = GGUF_FORMAT
        self.kernel = kernel  # the C function: berth_q4_linear or berth_q8_linear
        self.packed = packed
        self.out_features = out_features
        self.weight = None
        self.bias: torch.Tensor | None = None if bias is None else bias.detach().float().contiguous()

    def run(
        self,
        x: torch.Tensor,
        norm: tuple[torch.Tensor, float] | None = None,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``residual + f(x) W^T + b``, f the RMSNorm ``norm`` = (weight, eps) where given."""
        res = residual if self.bias is None else None
        y = cpu_kernels.linear(self.kernel, x, self.packed, self.out_features, norm, res)
        if self.bias is not None:
            y = y + self.bias if residual is None else y + self.bias + residual.reshape(y.shape)
        return y.reshape(*x.shape[:-1], self.out_features)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)


class KernelQ4Linear(KernelLinear):
    """``y = x W^T + b`` with W a GGUF Q4_0/Q4_1 weight in its file's code layout (two codes a byte, a float32 scale
    and zero per block of 32, in tiles of 4 rows; 6 bits per weight), computed by Berth's AVX2 kernel
    (runner/cpu_kernels.c), the activations quantized inside the call to two int8 digits per block of 32."""

    def __init__(self, weights: list[Q4Weight], bias: torch.Tensor | None) -> None:
        packed = cpu_kernels.pack_q4(
            torch.cat([w.codes for w in weights]),
            torch.cat([w.d for w in weights]),
            torch.cat([w.m if w.m is not None else -8.0 * w.d for w in weights]),
        )
        super().__init__("berth_q4_linear", packed, sum(int(w.codes.shape[0]) for w in weights), bias)


class KernelQ8Linear(KernelLinear):
    """``y = x W^T + b`` with W a GGUF Q8_0 weight as in the file (int8, a float32 scale per block of 32; 9 bits
    per weight), computed by Berth's AVX2 kernel (runner/cpu_kernels.c) as ``KernelQ4Linear``."""

    def __init__(self, weights: list[Q8Weight], bias: torch.Tensor | None) -> None:
        packed = cpu_kernels.pack_q8(torch.cat([w.codes for w in weights]), torch.cat([w.d for w in weights]))
        super().__init__("berth_q8_linear", packed, sum(int(w.codes.shape[0]) for w in weights), bias)


class Int4Linear(PackedLinear):
    """``y = x W^T + b`` with W a GGUF 4-bit weight in torch's int4pack layout (group 32), computed by
    ``_weight_int4pack_mm_for_cpu`` with activations, scales and zeros in ``act_dtype``: bfloat16 (the
    vectorised path; scales, zeros and activations rounded to bf16) or float32 (exact up to summation order,
    but not vectorised: for tests). Bias in float32; out in the input's dtype."""

    def __init__(
        self, weights: list[Q4Weight], bias: torch.Tensor | None, act_dtype: torch.dtype = torch.bfloat16
    ) -> None:
        codes = torch.cat([w.codes for w in weights]).to(torch.int32)
        scales, zeros = zip(*(w.scale_zero() for w in weights), strict=True)
        self.fmt = GGUF_FORMAT
        self.out_features = int(codes.shape[0])
        self.act_dtype = act_dtype
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 2)
        sz = torch.stack([torch.cat(scales), torch.cat(zeros)], dim=-1)  # [N, K/32, 2]
        self.scale_zeros = sz.transpose(0, 1).contiguous().to(act_dtype)  # [K/32, N, 2]
        self.weight = None
        self.bias = None if bias is None else bias.detach().float().contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(self.act_dtype).contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, Q4_GROUP, self.scale_zeros)
        y = y.to(x.dtype) if self.bias is None else y.float().add_(self.bias).to(x.dtype)
        out: torch.Tensor = y.reshape(*shape[:-1], self.out_features)
        return out


def uses_kernels(linears: Iterable[object]) -> bool:
    """Whether any of ``linears`` runs in Berth's CPU kernels."""
    return any(isinstance(lin, KernelLinear) for lin in linears)


def int4_ok(q4: Q4Weight) -> bool:
    """Whether int4pack takes this weight (N a multiple of 16, K of 32)."""
    n, k = q4.codes.shape
    return n % 16 == 0 and k % Q4_GROUP == 0


def stack_modules(mods: list[Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weights (and biases, zeros where a module has none) of ``mods`` stacked along the output
    dimension, as new tensors."""
    return torch.cat([m.weight.detach() for m in mods], dim=0), stack_biases(mods)


def stack_biases(mods: list[Any]) -> torch.Tensor | None:
    """The biases of ``mods`` stacked along the output dimension (zeros where a module has none), None when no
    module has one; reads only the weights' shapes."""
    biases = [getattr(m, "bias", None) for m in mods]
    if all(b is None for b in biases):
        return None
    like = next(b for b in biases if b is not None)
    return torch.cat(
        [
            b.detach() if b is not None else like.new_zeros(m.weight.shape[0])
            for m, b in zip(mods, biases, strict=True)
        ]
    )


def release_weight(mod: Any) -> None:
    """Free an ``nn.Linear``'s float weight (and bias) whose packed form serves it: replaced by ``meta`` tensors
    of the same shape and dtype (the shapes stay readable; calling the module fails instead of computing)."""
    for name in ("weight", "bias"):
        t = getattr(mod, name, None)
        if isinstance(t, torch.nn.Parameter) and t.device.type != "meta":
            setattr(mod, name, torch.nn.Parameter(torch.empty_like(t, device="meta"), requires_grad=False))


def pack_modules(mods: list[Any], fmt: str) -> PackedLinear:
    """One packed linear for ``nn.Linear`` modules stacked along the output dimension (fused q|k|v, gate|up).

    ``gguf``: when every module has its GGUF weight attached (``Q4_ATTR``, a ``Q4Source``: the codes of these
    modules only are read, and dropped once packed), a ``KernelQ4Linear`` / ``KernelQ8Linear`` where Berth's CPU
    kernels run, else an ``Int4Linear`` (int4pack; Q8_0 is attached only for the kernels); otherwise the
    dequantized weights as the first of GGUF_FALLBACKS torch can pack (runner/gguf_q4.py logs which)."""
    if fmt != GGUF_FORMAT:
        return PackedLinear(*stack_modules(mods), fmt)
    sources = [getattr(m, Q4_ATTR, None) for m in mods]
    if all(s is not None for s in sources):
        weights = [s.load() for s in sources if s is not None]
        q4 = [w for w in weights if isinstance(w, Q4Weight)]
        q8 = [w for w in weights if isinstance(w, Q8Weight)]
        kernels = cpu_kernels.library() is not None
        if len(q4) == len(weights):
            return KernelQ4Linear(q4, stack_biases(mods)) if kernels else Int4Linear(q4, stack_biases(mods))
        if len(q8) == len(weights) and kernels:
            return KernelQ8Linear(q8, stack_biases(mods))
    weight, bias = stack_modules(mods)
    try:
        return PackedLinear(weight, bias, GGUF_FALLBACKS[0])
    except RuntimeError:  # "linear_prepack_fp16 is currently not supported by ONEDNN" (no fbgemm)
        return PackedLinear(weight, bias, GGUF_FALLBACKS[1])


def pack_module(mod: Any, fmt: str) -> PackedLinear:
    """A ``PackedLinear`` from an ``nn.Linear`` (its weight and bias)."""
    if fmt == GGUF_FORMAT:
        return pack_modules([mod], fmt)
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
