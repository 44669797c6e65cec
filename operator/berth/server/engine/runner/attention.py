"""A step's inputs over the paged KV cache, and attention over it.

``prepare`` flattens the scheduled chunks of a step into ``T`` tokens (ids, positions, the cache
slot of each token) and groups the sequences for attention: all decodes (one query each) share one
SDPA call, all prefill chunks another. ``paged_attention`` gathers each group's blocks through its
block tables and calls ``torch.nn.functional.scaled_dot_product_attention`` with a mask (causal
within the chunk, up to the context length).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from berth.server.engine.scheduler import ScheduledSeq


@dataclass
class AttnGroup:
    """Sequences sharing one SDPA call (all decodes, or all prefill chunks)."""

    tok_idx: torch.Tensor  # [B, Q] flat token index of each query (padding -> 0)
    block_tables: torch.Tensor  # [B, NB]
    mask: torch.Tensor  # [B, 1, Q, NB * block_size] bool, True = attend
    src: torch.Tensor | None  # rows of the [B * Q] output that are real queries (None: all of them)
    dst: torch.Tensor | None  # their flat token index (None: the output already is in token order)
    ctx: torch.Tensor | None = None  # [B] positions each row attends to, for decode groups (Q = 1)


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slots: torch.Tensor  # [T] flat cache slot of each token
    groups: list[AttnGroup]
    sample_idx: torch.Tensor  # [S] flat index of the last token of each sampling sequence
    adapter_rows: list[tuple[int, torch.Tensor]]  # (adapter index, token rows)


# (batch index, flat start, start position, number of tokens) of one scheduled chunk
_Span = tuple[int, int, int, int]


def _group(
    batch: Seq[ScheduledSeq],
    members: list[_Span],
    num_spans: int,
    num_tokens: int,
    block_size: int,
    dev: torch.device,
) -> AttnGroup:
    bs = block_size
    q_len = max(m[3] for m in members)
    ctx = [m[2] + m[3] for m in members]
    nb = max(-(-c // bs) for c in ctx)
    tok_idx = torch.zeros(len(members), q_len, dtype=torch.long)
    q_valid = torch.zeros(len(members), q_len, dtype=torch.bool)
    tables = torch.zeros(len(members), nb, dtype=torch.long)
    qpos = torch.zeros(len(members), q_len, dtype=torch.long)
    ctx_t = torch.tensor(ctx, dtype=torch.long)
    for i, (b, flat, start, n) in enumerate(members):
        tok_idx[i, :n] = torch.arange(flat, flat + n)
        q_valid[i, :n] = True
        qpos[i, :n] = torch.arange(start, start + n)
        table = batch[b].seq.block_table
        used = -(-(start + n) // bs)
        tables[i, :used] = torch.tensor(table[:used], dtype=torch.long)
    kpos = torch.arange(nb * bs)
    mask = (kpos[None, None, :] <= qpos[:, :, None]) & (kpos[None, None, :] < ctx_t[:, None, None])
    mask[:, :, 0] |= ~q_valid  # padded query rows attend to something (no NaN); discarded
    flat_valid = q_valid.flatten()
    dst_idx = tok_idx.flatten()[flat_valid]
    in_order = len(members) == num_spans and dst_idx.shape[0] == flat_valid.shape[0] == num_tokens
    in_order = in_order and bool((dst_idx == torch.arange(num_tokens)).all())
    return AttnGroup(
        tok_idx=tok_idx.to(dev),
        block_tables=tables.to(dev),
        mask=mask.unsqueeze(1).to(dev),
        src=None if in_order else torch.nonzero(flat_valid).flatten().to(dev),
        dst=None if in_order else dst_idx.to(dev),
        ctx=ctx_t.to(dev) if q_len == 1 else None,
    )


def prepare(batch: Seq[ScheduledSeq], block_size: int, dev: torch.device) -> StepInputs:
    """The flat inputs of one step (see the module docstring)."""
    bs = block_size
    ids: list[int] = []
    pos: list[int] = []
    slots: list[int] = []
    sample_idx: list[int] = []
    rows_by_adapter: dict[int, list[int]] = {}
    spans: list[_Span] = []
    for b, s in enumerate(batch):
        seq = s.seq
        flat = len(ids)
        ids.extend(seq.all_token_ids[s.start : s.start + s.num_tokens])
        table = seq.block_table
        for p in range(s.start, s.start + s.num_tokens):
            pos.append(p)
            slots.append(table[p // bs] * bs + p % bs)
        if seq.adapter_index >= 0:
            rows_by_adapter.setdefault(seq.adapter_index, []).extend(range(flat, flat + s.num_tokens))
        if s.samples:
            sample_idx.append(flat + s.num_tokens - 1)
        spans.append((b, flat, s.start, s.num_tokens))
    groups = [
        _group(batch, members, len(spans), len(ids), bs, dev)
        for members in ([sp for sp in spans if sp[3] == 1], [sp for sp in spans if sp[3] > 1])
        if members
    ]
    return StepInputs(
        input_ids=torch.tensor(ids, dtype=torch.long, device=dev),
        positions=torch.tensor(pos, dtype=torch.long, device=dev),
        slots=torch.tensor(slots, dtype=torch.long, device=dev),
        groups=groups,
        sample_idx=torch.tensor(sample_idx, dtype=torch.long, device=dev),
        adapter_rows=[
            (a, torch.tensor(r, dtype=torch.long, device=dev)) for a, r in sorted(rows_by_adapter.items())
        ],
    )


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, groups: list[AttnGroup], scaling: float
) -> torch.Tensor:
    """q: [T, H, D] -> [T, H, D], attending over the cache (already holding this step's K/V).

    ``k_cache``/``v_cache``: [num_blocks, block_size, kv_heads, D] of one layer.
    """
    _, block_size, kv_heads, head_dim = k_cache.shape
    num_heads = q.shape[1]
    out: torch.Tensor | None = None
    for g in groups:
        b, nb = g.block_tables.shape
        k = k_cache[g.block_tables].reshape(b, nb * block_size, kv_heads, head_dim)
        v = v_cache[g.block_tables].reshape(b, nb * block_size, kv_heads, head_dim)
        # [B, Q, H, D]; a group holding every token in order is q itself (no gather)
        qg = q.view(b, -1, num_heads, head_dim) if g.dst is None else q[g.tok_idx]
        o = F.scaled_dot_product_attention(
            qg.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=g.mask,
            scale=scaling,
            enable_gqa=kv_heads != num_heads,
        ).transpose(1, 2)  # [B, Q, H, D]
        o = o.reshape(-1, num_heads, head_dim)
        if g.dst is None:  # one group holding every token in order (e.g. a pure decode step)
            return o
        if out is None:
            out = torch.empty_like(q)
        assert g.src is not None
        out.index_copy_(0, g.dst, o.index_select(0, g.src))
    assert out is not None
    return out
