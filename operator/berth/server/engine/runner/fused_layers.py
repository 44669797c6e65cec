"""The native forward's decoder layers with fused projections (steps without adapter rows), in fewer ops.

A decode step of a small model on CPU is mostly per-op overhead besides its matmuls (SmolLM2-135M, fp16
weights, batch 1, one thread: about 10 ms of matmuls and 4-5 ms of some 1,200 small ops over 30 layers), so
each layer here runs the same arithmetic as the modules, in fewer calls, with bitwise the same results:

- RMSNorm on float32 CPU activations through ``torch.nn.functional.rms_norm`` (one fused kernel) instead of
  the module's to/pow/mean/add/rsqrt/mul/to/mul (measured: the same bits, 23 -> 15 us a call);
- the rotary embedding as ``x * cos + x.roll(D/2) * sin_signed``, ``sin_signed`` being ``sin`` with its
  first half negated once per step: ``rotate_half(x) * sin`` without the slices, negation and cat (the
  same bits; 15 -> 9 us a call);
- q and k through the rotary embedding together (not for Qwen3, whose q/k norms come first).

The K/V of the step are written into the cache with ``index_copy_``; attention is the caller's ``attend``. Where a
projection runs in Berth's CPU kernels (the gguf format), the norm before it and the residual add after it are in
the same call (``norm_linear``, ``add_linear``: 121 calls fewer a SmolLM2 step).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from berth.server.engine.runner import cpu_kernels
from berth.server.engine.runner.attention import AttnGroup
from berth.server.engine.runner.packed import KernelLinear

if TYPE_CHECKING:
    from berth.server.engine.runner.model_runner import ModelRunner


def rms_norm(norm: Any, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` for a Llama-style RMSNorm module; one fused kernel for float32 on CPU."""
    args = _norm_args(norm, x)
    if args is None:
        out: torch.Tensor = norm(x)
        return out
    return F.rms_norm(x, (x.shape[-1],), *args)


def _norm_args(norm: Any, x: torch.Tensor) -> tuple[torch.Tensor, float] | None:
    """(weight, eps) of a Llama-style RMSNorm on float32 CPU activations (what ``F.rms_norm`` and Berth's kernels
    apply), else None."""
    eps = getattr(norm, "variance_epsilon", None)
    if eps is None or x.dtype != torch.float32 or x.device.type != "cpu":
        return None
    return norm.weight, float(eps)


def norm_linear(norm: Any, linear: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``linear(norm(x))``; in one call of Berth's CPU kernels where ``linear`` runs in them."""
    if isinstance(linear, KernelLinear) and (args := _norm_args(norm, x)) is not None:
        return linear.run(x, norm=args)
    return linear(rms_norm(norm, x))


def add_linear(
    h: torch.Tensor, linear: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor
) -> torch.Tensor:
    """``h + linear(x)``; the residual added inside the call where ``linear`` runs in Berth's CPU kernels."""
    if isinstance(linear, KernelLinear):
        return linear.run(x, residual=h).view(h.shape)
    return h + linear(x)


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """``sin`` with the first half of its last dimension negated (see ``rotate``)."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin``, bitwise, with ``sin_signed = signed_sin(sin)``."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin_signed


def layers(
    runner: ModelRunner,
    h: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    slots: torch.Tensor,
    groups: list[AttnGroup],
) -> torch.Tensor:
    """The decoder layers of ``runner`` (its ``fused`` projections) over the flat tokens ``h`` [T, hidden]."""
    assert runner.fused is not None
    t = h.shape[0]
    nh, nkv, hd = runner.num_heads, runner.num_kv_heads, runner.head_dim
    sin_s = signed_sin(sin)
    g = groups[0]
    # A decode step in token order, on Berth's CPU kernels: rotary, cache write and attention in one call a layer.
    kernel_ctx = g.ctx if runner.kernel_attention and len(groups) == 1 and g.dst is None else None
    for li, layer in enumerate(runner.layers):
        fl = runner.fused[li]
        qkv = norm_linear(layer.input_layernorm, fl.qkv, h).view(t, nh + 2 * nkv, hd)
        if kernel_ctx is not None:
            kc, vc = runner.k_cache[li], runner.v_cache[li]
            o = cpu_kernels.decode_attention(
                qkv, cos, sin_s, slots, kc, vc, g.block_tables, kernel_ctx, nh, runner.scaling
            )
        else:
            o = _attention(runner, li, layer, qkv, cos, sin_s, slots, groups)
        h = add_linear(h, fl.o, o.reshape(t, nh * hd))
        gu = norm_linear(layer.post_attention_layernorm, fl.gate_up, h)
        h = add_linear(h, fl.down, layer.mlp.act_fn(gu[:, : fl.intermediate]) * gu[:, fl.intermediate :])
    return h


def _attention(
    runner: ModelRunner,
    li: int,
    layer: Any,
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin_s: torch.Tensor,
    slots: torch.Tensor,
    groups: list[AttnGroup],
) -> torch.Tensor:
    """Layer ``li``'s attention in torch ops: q and k through the rotary embedding, the step's k and v into the
    cache, then the runner's paged attention; [T, heads, D]."""
    nh, nkv = runner.num_heads, runner.num_kv_heads
    v = qkv[:, nh + nkv :]
    if runner.model_type == "qwen3":
        attn = layer.self_attn
        q = rotate(rms_norm(attn.q_norm, qkv[:, :nh]), cos, sin_s)
        k = rotate(rms_norm(attn.k_norm, qkv[:, nh : nh + nkv]), cos, sin_s)
    else:  # q and k through the rotary embedding in one go
        qk = rotate(qkv[:, : nh + nkv], cos, sin_s)
        q, k = qk[:, :nh], qk[:, nh:]
    runner.k_cache[li].view(-1, nkv, runner.head_dim).index_copy_(0, slots, k)
    runner.v_cache[li].view(-1, nkv, runner.head_dim).index_copy_(0, slots, v)
    return runner._attention(q, li, groups)
