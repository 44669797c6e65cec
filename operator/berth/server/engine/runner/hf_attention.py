"""Berth's paged attention, registered in transformers' attention interface as ``"berth"``.

A model built by transformers calls ``ALL_ATTENTION_FUNCTIONS["berth"]`` from each attention layer
with that layer's query/key/value (after its own projections, norms and rotary embedding). The
function writes the step's keys and values into the layer's paged KV cache blocks and attends over
the block tables the scheduler built for this step (``PagedStep``, set around the forward pass by the
transformers runner) — the approach of vLLM's Transformers modeling backend. It covers what the
layers hand it: grouped- and multi-query attention, key and value head sizes that differ (DeepSeek's
multi-head latent attention through the generic path), a per-layer ``sliding_window`` (Mistral/Qwen2
with ``use_sliding_window``, Gemma 2/3 alternating local/global layers), logit ``softcap`` (Gemma 2)
and attention sinks ``s_aux`` (gpt-oss). The mask interface ``"berth"`` builds no mask at all: the
causal and window masks come from the block tables.

A probe run (``ProbeStep``) records, per layer, what the cache must hold (KV heads, key and value head
sizes, dtype, device) before the cache exists; it attends over the probe tokens only.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from berth.server.engine.runner.attention import AttnGroup

NAME = "berth"


@dataclass(frozen=True)
class LayerSpec:
    """What one attention layer's KV cache holds per token."""

    kv_heads: int
    k_dim: int
    v_dim: int
    dtype: torch.dtype
    device: torch.device
    causal: bool
    sliding_window: int | None

    def bytes_per_token(self) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return self.kv_heads * (self.k_dim + self.v_dim) * itemsize


@dataclass
class ProbeStep:
    """A forward over a few tokens that records each attention layer's cache needs."""

    layers: dict[int, LayerSpec] = field(default_factory=dict)
    calls: int = 0


@dataclass
class PagedStep:
    """One engine step as the attention layers see it (built by the runner for each forward)."""

    groups: list[AttnGroup]
    positions: torch.Tensor  # [T] position of every token of the step
    slots: torch.Tensor  # [T] flat cache slot of every token
    caches: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: K [blocks, bs, kvh, dk], V [.., dv]
    _on: dict[torch.device, PagedStep] = field(default_factory=dict)
    _masks: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)

    def on(self, device: torch.device) -> PagedStep:
        """This step's metadata on ``device`` (layers split over several devices each get a copy)."""
        if self.slots.device == device:
            return self
        copy = self._on.get(device)
        if copy is None:
            groups = [
                AttnGroup(
                    tok_idx=g.tok_idx.to(device),
                    block_tables=g.block_tables.to(device),
                    mask=g.mask.to(device),
                    src=None if g.src is None else g.src.to(device),
                    dst=None if g.dst is None else g.dst.to(device),
                )
                for g in self.groups
            ]
            copy = PagedStep(groups, self.positions.to(device), self.slots.to(device), self.caches)
            self._on[device] = copy
        return copy

    def mask(self, index: int, window: int | None) -> torch.Tensor:
        """Group ``index``'s mask, narrowed to a sliding window when the layer has one (cached per step)."""
        g = self.groups[index]
        if not window:
            return g.mask
        key = (index, window)
        cached = self._masks.get(key)
        if cached is None:
            length = g.mask.shape[-1]
            qpos = self.positions[g.tok_idx]  # [B, Q]
            kpos = torch.arange(length, device=qpos.device)
            inside = kpos[None, None, :] > qpos[:, :, None] - window  # transformers: kv_idx > q_idx - window
            cached = g.mask & inside.unsqueeze(1)
            empty = ~cached.any(dim=-1, keepdim=True)  # padded query rows only: keep them finite
            cached = cached | (empty & (kpos == 0))
            self._masks[key] = cached
        return cached


_CURRENT: contextvars.ContextVar[PagedStep | ProbeStep | None] = contextvars.ContextVar(
    "berth_step", default=None
)


@contextlib.contextmanager
def running(step: PagedStep | ProbeStep) -> Iterator[None]:
    token = _CURRENT.set(step)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def _expand_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, KVH, L, D] -> [B, H, L, D] (grouped-query attention for the explicit path)."""
    kvh = x.shape[1]
    return x if kvh == heads else x.repeat_interleave(heads // kvh, dim=1)


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scaling: float,
    softcap: float | None,
    sinks: torch.Tensor | None,
) -> torch.Tensor:
    """q [B, H, Q, Dk], k [B, KVH, L, Dk], v [B, KVH, L, Dv], mask [B, 1, Q, L] -> [B, H, Q, Dv]."""
    heads = q.shape[1]
    if softcap is None and sinks is None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=scaling, enable_gqa=k.shape[1] != heads
        )
    scores = torch.matmul(q, _expand_kv(k, heads).transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        sink = sinks.reshape(1, heads, 1, 1).to(scores.dtype).expand(q.shape[0], heads, q.shape[2], 1)
        scores = torch.cat([scores, sink], dim=-1)
        scores = scores - scores.max(dim=-1, keepdim=True).values
        probs = torch.softmax(scores, dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs.to(v.dtype), _expand_kv(v, heads))


def _probe(
    step: ProbeStep,
    module: Any,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scaling: float,
    window: int | None,
    softcap: float | None,
    sinks: torch.Tensor | None,
) -> torch.Tensor:
    step.calls += 1
    causal = bool(getattr(module, "is_causal", True))
    layer = int(module.layer_idx)
    step.layers[layer] = LayerSpec(
        kv_heads=int(k.shape[1]),
        k_dim=int(k.shape[-1]),
        v_dim=int(v.shape[-1]),
        dtype=k.dtype,
        device=k.device,
        causal=causal,
        sliding_window=int(window) if window else None,
    )
    n = q.shape[2]
    mask = torch.ones(n, n, dtype=torch.bool, device=q.device).tril().view(1, 1, n, n)
    return _attend(q, k, v, mask, scaling, softcap, sinks)


def berth_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: [1, H, T, Dk] queries -> [1, T, H, Dv] outputs."""
    step = _CURRENT.get()
    if step is None:
        raise RuntimeError("the berth attention runs only inside an engine step")
    scale = float(scaling) if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    if isinstance(step, ProbeStep):
        probed = _probe(step, module, query, key, value, scale, sliding_window, softcap, s_aux)
        return probed.transpose(1, 2), None
    step = step.on(query.device)
    kc, vc = step.caches[int(module.layer_idx)]
    k = key[0].transpose(0, 1)  # [T, KVH, Dk]
    v = value[0].transpose(0, 1)  # [T, KVH, Dv]
    kc.view(-1, kc.shape[2], kc.shape[3])[step.slots] = k.to(kc.dtype)
    vc.view(-1, vc.shape[2], vc.shape[3])[step.slots] = v.to(vc.dtype)
    q = query[0].transpose(0, 1)  # [T, H, Dk]
    heads, block = q.shape[1], kc.shape[1]
    out: torch.Tensor | None = None
    for i, g in enumerate(step.groups):
        b, nb = g.block_tables.shape
        kg = kc[g.block_tables].reshape(b, nb * block, kc.shape[2], kc.shape[3]).transpose(1, 2)
        vg = vc[g.block_tables].reshape(b, nb * block, vc.shape[2], vc.shape[3]).transpose(1, 2)
        qg = q[g.tok_idx].transpose(1, 2)  # [B, H, Q, Dk]
        o = _attend(qg, kg, vg, step.mask(i, sliding_window), scale, softcap, s_aux)
        o = o.transpose(1, 2).reshape(-1, heads, vc.shape[3])  # [B * Q, H, Dv]
        if g.dst is None:  # one group holding every token in order
            return o.unsqueeze(0), None
        if out is None:
            out = o.new_empty(q.shape[0], heads, vc.shape[3])
        assert g.src is not None
        out.index_copy_(0, g.dst, o.index_select(0, g.src))
    assert out is not None
    return out.unsqueeze(0), None


def _no_mask(*args: Any, **kwargs: Any) -> None:
    """The mask interface for "berth": no mask tensor; the block tables say what each query sees."""
    return None


@contextlib.contextmanager
def installed(model: Any) -> Iterator[None]:
    """Berth's attention in the model's decoder for the duration of a forward pass; outside it the model is
    an ordinary transformers model again (``generate`` with its own attention works on it)."""
    register()
    config = model.config.get_text_config()
    before = config._attn_implementation_internal
    config._attn_implementation_internal = NAME
    try:
        yield
    finally:
        config._attn_implementation_internal = before


_registered = False


def register() -> None:
    """Register "berth" in transformers' attention and mask interfaces (once per process)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, berth_attention)
    AttentionMaskInterface.register(NAME, _no_mask)
    _registered = True
