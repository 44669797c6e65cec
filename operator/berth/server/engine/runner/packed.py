"""Lower-precision linear layers for the native forward on CPU, through torch's own fbgemm kernels.

- ``int8``: weights quantized per output channel (symmetric int8), activations quantized dynamically
  per call (``torch.ops.quantized.linear_dynamic``, fbgemm; 7-bit activation range where the CPU lacks
  VNNI, as torch's default). About 4x fewer weight bytes per step; not exact (see docs/engine.md).
- ``fp16``: weights in float16, computed in float32 (``linear_dynamic_fp16``): half the weight bytes,
  rounding of the weights only.

Measured on the 2-core AMD EPYC (AVX2, no AVX-512/bf16) of this project, one thread, per linear:
SmolLM2's MLP shape 1536x576 fp32 0.41 ms -> int8 0.09 ms at 1 row, 3.5 -> 1.3 ms at 32 rows; the LM head
49152x576 31 -> 10 ms at 1 row, 186 -> 42 ms at 32 rows. torch's weight-only kernels
(``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``, which could serve GGUF Q4_1 blocks as they are)
were 10-20x slower than fp32 on that CPU (no vectorised AVX2 path), so they are not offered.
"""

from __future__ import annotations

from typing import Any

import torch

WEIGHT_FORMATS = ("none", "int8", "fp16")


class PackedLinear:
    """``y = x W^T + b`` with W packed once in ``fmt`` (float32 in and out)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, fmt: str) -> None:
        if fmt not in ("int8", "fp16"):
            raise ValueError(f"unknown weight format {fmt!r}: use one of {', '.join(WEIGHT_FORMATS)}")
        w = weight.detach().float().contiguous()
        b = None if bias is None else bias.detach().float().contiguous()
        self.fmt = fmt
        self.out_features = int(w.shape[0])
        if fmt == "int8":
            scales = (w.abs().amax(dim=1).clamp(min=1e-12) / 127.0).double()
            zeros = torch.zeros(w.shape[0], dtype=torch.long)
            qw = torch.quantize_per_channel(w, scales, zeros, 0, torch.qint8)
            self.packed: Any = torch.ops.quantized.linear_prepack(qw, b)
        else:
            self.packed = torch.ops.quantized.linear_prepack_fp16(w, b)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
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
