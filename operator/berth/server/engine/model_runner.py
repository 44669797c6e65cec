"""The model runner: Berth's own forward pass over the paged KV cache.

It reuses the weights of the loaded transformers module (embedding, q/k/v/o projections, MLP,
norms, rotary embedding, LM head) but not its attention or cache: every step runs all
scheduled tokens of all sequences as one flat batch of ``T`` tokens through the layers, writes
their K/V into the sequences' cache blocks, and computes attention with
``torch.nn.functional.scaled_dot_product_attention`` over the blocks each sequence owns
(gathered through its block table). Decoding sequences (one query each) share one SDPA call;
prefill chunks share another. Only rows that sample go through the final norm and LM head.

Supported: the Llama family (Llama, Mistral, Qwen2 with its q/k/v bias, Qwen3 with its q/k
norms) — the same decoder-layer shape. Anything else raises ``UnsupportedModelError`` naming
the architecture.

Decode steps can also run through a static-shape path (``static_decode``): the batch is padded to
one of a few sizes and the block tables to one of a few widths, padded rows write into a scratch
block, so the same tensors of the same shapes are used every step. On CUDA each (batch size, table
width) pair is captured once as a CUDA graph and replayed (one launch per step instead of several
hundred); on CPU the same padded path runs eagerly, which is how CI checks it against the flat path.
Steps with a prefill chunk or an adapter run the flat path.

Side-by-side LoRA adapters are applied per token row: ``y = W x + s * B (A x)`` for the rows
of the requests that asked for the adapter, the others get ``W x`` only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from berth.server.engine.sampler import Sampler, SampleResult
from berth.server.engine.scheduler import ScheduledSeq
from berth.server.engine.sequence import Sequence

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class UnsupportedModelError(ValueError):
    pass


@dataclass
class LoraWeights:
    """One adapter: per (layer, module) the A [r, in] and B [out, r] matrices and the scale."""

    name: str
    scale: float
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def check_supported(model: Any) -> str:
    cfg = model.config
    mt = str(getattr(cfg, "model_type", "unknown"))
    arch = ",".join(getattr(cfg, "architectures", None) or [type(model).__name__])
    if mt not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"architecture {arch} (model_type {mt!r}) is not supported by Berth's engine; "
            f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if getattr(cfg, "use_sliding_window", False):
        raise UnsupportedModelError(f"architecture {arch}: sliding-window attention is not supported")
    return mt


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


@dataclass
class _AttnGroup:
    """Sequences sharing one SDPA call (all decodes, or all prefill chunks)."""

    tok_idx: torch.Tensor  # [B, Q] flat token index of each query (padding -> 0)
    block_tables: torch.Tensor  # [B, NB]
    mask: torch.Tensor  # [B, 1, Q, NB * block_size] bool, True = attend
    src: torch.Tensor | None  # rows of the [B * Q] output that are real queries (None: all of them)
    dst: torch.Tensor | None  # their flat token index (None: the output already is in token order)


@dataclass
class _StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slots: torch.Tensor  # [T] flat cache slot of each token
    groups: list[_AttnGroup]
    sample_idx: torch.Tensor  # [S] flat index of the last token of each sampling sequence
    adapter_rows: list[tuple[int, torch.Tensor]]  # (adapter index, token rows)


class ModelRunner:
    def __init__(
        self,
        model: Any,
        *,
        num_blocks: int,
        block_size: int,
        adapters: Seq[LoraWeights] = (),
        sampler: Sampler | None = None,
        static_decode: bool = False,
        max_num_seqs: int = 0,
        max_model_len: int = 0,
    ) -> None:
        self.model_type = check_supported(model)
        self.model = model
        cfg = model.config
        self.config = cfg
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.num_layers = int(cfg.num_hidden_layers)
        self.num_heads = int(cfg.num_attention_heads)
        self.num_kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.num_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads)
        self.vocab_size = int(cfg.vocab_size)
        self.block_size = block_size
        self.num_blocks = num_blocks

        inner = model.model
        self.embed = inner.embed_tokens
        self.layers = list(inner.layers)
        self.norm = inner.norm
        self.lm_head = model.lm_head
        self.rotary = inner.rotary_emb
        attn0 = self.layers[0].self_attn
        self.scaling = float(getattr(attn0, "scaling", self.head_dim**-0.5))
        self.adapters = list(adapters)
        self.sampler = sampler

        # One block more than the block manager hands out: the scratch block padded decode rows write to.
        self.scratch_block = num_blocks
        shape = (num_blocks + 1, block_size, self.num_kv_heads, self.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        logger.info(
            "KV cache: %d blocks x %d tokens (%d tokens, %.1f MiB) on %s",
            num_blocks,
            block_size,
            num_blocks * block_size,
            self.kv_cache_bytes() / 2**20,
            self.device,
        )
        self.static_decode = static_decode and max_num_seqs > 0 and max_model_len > 0
        self.use_cuda_graphs = self.static_decode and self.device.type == "cuda"
        rope_type = str(getattr(self.rotary, "rope_type", "default"))
        if self.use_cuda_graphs and ("dynamic" in rope_type or rope_type == "longrope"):
            # These rotary embeddings compare positions on the host and swap inv_freq: not capturable.
            logger.warning(
                "rope type %s: no CUDA graphs, decode steps run the static path eagerly", rope_type
            )
            self.use_cuda_graphs = False
        self.num_static_steps = 0
        self.num_graph_captures = 0
        if self.static_decode:
            self._init_static(max_num_seqs, max_model_len)

    # ---------------------------------------------------------------- sizing
    @staticmethod
    def bytes_per_block(model: Any, block_size: int) -> int:
        cfg = model.config
        heads = int(cfg.num_attention_heads)
        kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
        hd = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
        itemsize = int(next(model.parameters()).element_size())
        return 2 * int(cfg.num_hidden_layers) * block_size * kv * hd * itemsize

    @staticmethod
    def free_device_memory(device: torch.device) -> int:
        """Free bytes on a CUDA device (what ``--kv-cache-memory-fraction`` is a fraction of)."""
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)

    def kv_cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k_cache + self.v_cache)

    # ---------------------------------------------------------------- inputs
    def _prepare(self, batch: Seq[ScheduledSeq]) -> _StepInputs:
        dev = self.device
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        sample_idx: list[int] = []
        rows_by_adapter: dict[int, list[int]] = {}
        spans: list[tuple[int, int, int, int]] = []  # (batch index, flat start, start pos, n)
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

        groups: list[_AttnGroup] = []
        for members in ([sp for sp in spans if sp[3] == 1], [sp for sp in spans if sp[3] > 1]):
            if not members:
                continue
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
            in_order = len(members) == len(spans) and dst_idx.shape[0] == flat_valid.shape[0] == len(ids)
            in_order = in_order and bool((dst_idx == torch.arange(len(ids))).all())
            groups.append(
                _AttnGroup(
                    tok_idx=tok_idx.to(dev),
                    block_tables=tables.to(dev),
                    mask=mask.unsqueeze(1).to(dev),
                    src=None if in_order else torch.nonzero(flat_valid).flatten().to(dev),
                    dst=None if in_order else dst_idx.to(dev),
                )
            )
        return _StepInputs(
            input_ids=torch.tensor(ids, dtype=torch.long, device=dev),
            positions=torch.tensor(pos, dtype=torch.long, device=dev),
            slots=torch.tensor(slots, dtype=torch.long, device=dev),
            groups=groups,
            sample_idx=torch.tensor(sample_idx, dtype=torch.long, device=dev),
            adapter_rows=[
                (a, torch.tensor(r, dtype=torch.long, device=dev)) for a, r in sorted(rows_by_adapter.items())
            ],
        )

    # ------------------------------------------------------- static decode
    @staticmethod
    def _buckets(limit: int) -> list[int]:
        """1, 2, 4, ... below ``limit``, then ``limit``."""
        out: list[int] = []
        b = 1
        while b < limit:
            out.append(b)
            b *= 2
        return [*out, limit]

    def _init_static(self, max_num_seqs: int, max_model_len: int) -> None:
        dev = self.device
        self.batch_buckets = self._buckets(max_num_seqs)
        self.width_buckets = self._buckets(-(-max_model_len // self.block_size))
        b, w = self.batch_buckets[-1], self.width_buckets[-1]
        self._s_ids = torch.zeros(b, dtype=torch.long, device=dev)
        self._s_pos = torch.zeros(b, dtype=torch.long, device=dev)
        self._s_slots = torch.zeros(b, dtype=torch.long, device=dev)
        self._s_ctx = torch.ones(b, dtype=torch.long, device=dev)
        self._s_tables = torch.full((b, w), self.scratch_block, dtype=torch.long, device=dev)
        self._graphs: dict[tuple[int, int], Any] = {}
        self._graph_pool: Any = None
        # One logits buffer all graphs write into (a graph's own output would be [b, vocab] float32 each).
        self._s_logits = (
            torch.empty(b, self.vocab_size, dtype=torch.float32, device=dev) if self.use_cuda_graphs else None
        )
        logger.info(
            "static decode: batch sizes %s, block-table widths %s%s",
            self.batch_buckets,
            self.width_buckets,
            " (CUDA graphs, captured on first use)" if self.use_cuda_graphs else " (eager)",
        )

    def _static_fits(self, batch: Seq[ScheduledSeq]) -> tuple[int, int] | None:
        """The (batch size, table width) bucket for a pure decode step without adapters, else None."""
        if not self.static_decode or not batch or len(batch) > self.batch_buckets[-1]:
            return None
        width = 0
        for s in batch:
            if s.num_tokens != 1 or not s.samples or s.seq.adapter_index >= 0:
                return None
            width = max(width, s.start // self.block_size + 1)
        if width > self.width_buckets[-1]:
            return None
        b = next(x for x in self.batch_buckets if x >= len(batch))
        w = next(x for x in self.width_buckets if x >= width)
        return b, w

    def _fill_static(self, batch: Seq[ScheduledSeq], b: int, w: int) -> None:
        """Write this step's inputs into the static buffers; rows past the batch are padding."""
        bs = self.block_size
        ids = [0] * b
        pos = [0] * b
        slots = [self.scratch_block * bs] * b
        ctx = [1] * b
        tables = torch.full((b, w), self.scratch_block, dtype=torch.long)
        for i, s in enumerate(batch):
            seq, p = s.seq, s.start
            ids[i] = seq.all_token_ids[p]
            pos[i] = p
            table = seq.block_table
            slots[i] = table[p // bs] * bs + p % bs
            ctx[i] = p + 1
            used = p // bs + 1
            tables[i, :used] = torch.tensor(table[:used], dtype=torch.long)
        self._s_ids[:b].copy_(torch.tensor(ids, dtype=torch.long), non_blocking=True)
        self._s_pos[:b].copy_(torch.tensor(pos, dtype=torch.long), non_blocking=True)
        self._s_slots[:b].copy_(torch.tensor(slots, dtype=torch.long), non_blocking=True)
        self._s_ctx[:b].copy_(torch.tensor(ctx, dtype=torch.long), non_blocking=True)
        self._s_tables[:b, :w].copy_(tables, non_blocking=True)

    def _pad_static(self, b: int, w: int) -> None:
        """Every row padding: what warm-up and capture run on, so they touch only the scratch block."""
        self._s_ids[:b].zero_()
        self._s_pos[:b].zero_()
        self._s_slots[:b].fill_(self.scratch_block * self.block_size)
        self._s_ctx[:b].fill_(1)
        self._s_tables[:b, :w].fill_(self.scratch_block)

    def _static_forward(self, b: int, w: int) -> torch.Tensor:
        """Logits [b, vocab] for the b rows in the static buffers (every row samples)."""
        tables = self._s_tables[:b, :w]
        ctx = self._s_ctx[:b]
        kpos = torch.arange(w * self.block_size, device=self.device)
        # One decode group in token order: query i is token i, attending to its first ctx[i] positions.
        group = _AttnGroup(
            tok_idx=torch.arange(b, device=self.device).unsqueeze(1),
            block_tables=tables,
            mask=(kpos[None, :] < ctx[:, None]).view(b, 1, 1, w * self.block_size),
            src=None,
            dst=None,
        )
        return self._forward(
            self._s_ids[:b],
            self._s_pos[:b],
            self._s_slots[:b],
            lambda q, li: self._attention(q, li, [group]),
            None,
            [],
        )

    def _capture(self, b: int, w: int) -> Any:
        assert self._s_logits is not None
        logits_out = self._s_logits[:b]
        self._pad_static(b, w)
        stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up outside the graph (lazy inits, autotuning)
                logits_out.copy_(self._static_forward(b, w))
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool, capture_error_mode="thread_local"):
            logits_out.copy_(self._static_forward(b, w))
        if self._graph_pool is None:
            self._graph_pool = graph.pool()
        self.num_graph_captures += 1
        logger.info("captured a CUDA graph for decode batch %d, block-table width %d", b, w)
        return graph

    def _execute_static(self, batch: Seq[ScheduledSeq], b: int, w: int) -> torch.Tensor:
        self.num_static_steps += 1
        graph = self._graphs.get((b, w)) if self.use_cuda_graphs else None
        if self.use_cuda_graphs and graph is None:
            try:
                graph = self._graphs[(b, w)] = self._capture(b, w)
            except Exception:
                # Do not fail the step, nor retry every step: serve on without graphs.
                logger.exception(
                    "CUDA graph capture failed; decode steps run the static path eagerly from now on"
                )
                self.use_cuda_graphs = False
                graph = None
        self._fill_static(batch, b, w)
        if graph is None:
            return self._static_forward(b, w)[: len(batch)]
        graph.replay()
        assert self._s_logits is not None
        return self._s_logits[: len(batch)]

    # --------------------------------------------------------------- forward
    def _linear(
        self, x: torch.Tensor, mod: Any, layer: int, name: str, adapter_rows: list[tuple[int, torch.Tensor]]
    ) -> torch.Tensor:
        y: torch.Tensor = mod(x)
        for a, rows in adapter_rows:
            w = self.adapters[a].weights.get((layer, name))
            if w is None:
                continue
            lora_a, lora_b = w
            delta = (x.index_select(0, rows) @ lora_a.t()) @ lora_b.t()
            y = y.index_add(0, rows, delta, alpha=self.adapters[a].scale)
        return y

    def _attention(self, q: torch.Tensor, layer: int, groups: list[_AttnGroup]) -> torch.Tensor:
        """q: [T, H, D] -> [T, H, D], attending over the cache (already holding this step's K/V)."""
        kc, vc = self.k_cache[layer], self.v_cache[layer]
        out: torch.Tensor | None = None
        for g in groups:
            b, nb = g.block_tables.shape
            k = kc[g.block_tables].reshape(b, nb * self.block_size, self.num_kv_heads, self.head_dim)
            v = vc[g.block_tables].reshape(b, nb * self.block_size, self.num_kv_heads, self.head_dim)
            qg = q[g.tok_idx]  # [B, Q, H, D]
            o = F.scaled_dot_product_attention(
                qg.transpose(1, 2),
                k.transpose(1, 2),
                v.transpose(1, 2),
                attn_mask=g.mask,
                scale=self.scaling,
                enable_gqa=self.num_kv_heads != self.num_heads,
            ).transpose(1, 2)  # [B, Q, H, D]
            o = o.reshape(-1, self.num_heads, self.head_dim)
            if g.dst is None:  # one group holding every token in order (e.g. a pure decode step)
                return o
            if out is None:
                out = torch.empty_like(q)
            assert g.src is not None
            out.index_copy_(0, g.dst, o.index_select(0, g.src))
        assert out is not None
        return out

    def _forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        attend: Callable[[torch.Tensor, int], torch.Tensor],
        sample_idx: torch.Tensor | None,
        adapter_rows: list[tuple[int, torch.Tensor]],
    ) -> torch.Tensor:
        """The decoder over T flat tokens; float32 logits of the rows in sample_idx (None: all rows)."""
        t = input_ids.shape[0]
        h = self.embed(input_ids)  # [T, hidden]
        cos, sin = self.rotary(h.unsqueeze(0), positions.unsqueeze(0))
        cos = cos[0].unsqueeze(1)  # [T, 1, D]
        sin = sin[0].unsqueeze(1)
        for li, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = self._linear(x, attn.q_proj, li, "q_proj", adapter_rows).view(
                t, self.num_heads, self.head_dim
            )
            k = self._linear(x, attn.k_proj, li, "k_proj", adapter_rows).view(
                t, self.num_kv_heads, self.head_dim
            )
            v = self._linear(x, attn.v_proj, li, "v_proj", adapter_rows).view(
                t, self.num_kv_heads, self.head_dim
            )
            if self.model_type == "qwen3":
                q = attn.q_norm(q)
                k = attn.k_norm(k)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            self.k_cache[li].view(-1, self.num_kv_heads, self.head_dim)[slots] = k
            self.v_cache[li].view(-1, self.num_kv_heads, self.head_dim)[slots] = v
            o = attend(q, li).reshape(t, self.num_heads * self.head_dim)
            h = h + self._linear(o, attn.o_proj, li, "o_proj", adapter_rows)
            x = layer.post_attention_layernorm(h)
            mlp = layer.mlp
            if adapter_rows:
                gate = self._linear(x, mlp.gate_proj, li, "gate_proj", adapter_rows)
                up = self._linear(x, mlp.up_proj, li, "up_proj", adapter_rows)
                m = self._linear(mlp.act_fn(gate) * up, mlp.down_proj, li, "down_proj", adapter_rows)
            else:
                m = mlp(x)
            h = h + m
        last = self.norm(h if sample_idx is None else h.index_select(0, sample_idx))
        logits: torch.Tensor = self.lm_head(last)
        return logits.float()

    @torch.inference_mode()
    def execute(self, batch: Seq[ScheduledSeq]) -> torch.Tensor:
        """Run one step; returns float32 logits [num sampling sequences, vocab]."""
        bucket = self._static_fits(batch)
        if bucket is not None:
            return self._execute_static(batch, *bucket)
        inp = self._prepare(batch)
        return self._forward(
            inp.input_ids,
            inp.positions,
            inp.slots,
            lambda q, li: self._attention(q, li, inp.groups),
            inp.sample_idx,
            inp.adapter_rows,
        )

    def step(self, batch: Seq[ScheduledSeq], sampling: Seq[Sequence]) -> list[SampleResult]:
        """One engine step: the forward pass, then the next token of each sampling sequence.

        ``sampling`` are the sequences of ``batch`` whose chunk ends their prompt or that are
        decoding, in batch order. The logits never leave the runner (nor the device).
        """
        logits = self.execute(batch)
        if not sampling:
            return []
        if self.sampler is None:
            raise RuntimeError("this ModelRunner was built without a sampler")
        return self.sampler.sample(logits, sampling)
