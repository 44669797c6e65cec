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

Pure decode steps can run through static shapes, captured as CUDA graphs on CUDA
(``static_decode.py``); a step's flat inputs and the paged attention are in ``attention.py``.

Side-by-side LoRA adapters are applied per token row: ``y = W x + s * B (A x)`` for the rows
of the requests that asked for the adapter, the others get ``W x`` only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from berth.server.engine.families import NATIVE_MODEL_TYPES
from berth.server.engine.runner import attention, fused_layers, gguf_q4
from berth.server.engine.runner import packed as weight_formats
from berth.server.engine.runner.attention import AttnGroup
from berth.server.engine.runner.packed import PACKED_FORMATS, WEIGHT_FORMATS, PackedLinear, pack_module
from berth.server.engine.runner.static_decode import StaticDecode
from berth.server.engine.sampler import Sampler
from berth.server.engine.scheduler import ScheduledSeq
from berth.server.engine.sequence import Sequence
from berth.server.engine.types import LoraWeights, SampleResult

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = NATIVE_MODEL_TYPES
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class UnsupportedModelError(ValueError):
    pass


def check_supported(model: Any) -> str:
    cfg = model.config
    mt = str(getattr(cfg, "model_type", "unknown"))
    arch = ",".join(getattr(cfg, "architectures", None) or [type(model).__name__])
    if mt not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"architecture {arch} (model_type {mt!r}) is not supported by Berth's engine; "
            f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return mt


def sliding_window(model: Any) -> int | None:
    """The attention window when it is shorter than the model's context (the native forward then serves
    only up to the window; the transformers backend attends within it past it)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    window = getattr(cfg, "sliding_window", None)
    context = int(getattr(cfg, "max_position_embeddings", 0) or 0)
    if not isinstance(window, int) or window <= 0 or not getattr(cfg, "use_sliding_window", True):
        return None
    return window if context == 0 or window < context else None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


Linear = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class _FusedLayer:
    """One decoder layer's projections as three matmuls and a down projection: q|k|v and gate|up fused."""

    qkv: Linear
    o: Linear
    gate_up: Linear
    down: Linear
    intermediate: int


def _dense(weight: torch.Tensor, bias: torch.Tensor | None) -> Linear:
    def run(x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, bias)

    return run


def _fused_weight(mods: list[Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``stack_modules(mods)``, the modules' own weights re-pointed at slices of it (the same values, stored
    once)."""
    weight, bias = weight_formats.stack_modules(mods)
    row = 0
    for m in mods:
        n = m.weight.shape[0]
        m.weight.data = weight[row : row + n]
        if bias is not None and getattr(m, "bias", None) is not None:
            m.bias.data = bias[row : row + n]
        row += n
    return weight, bias


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
        weight_format: str = "fp32",
        fuse: bool = True,
        release_weights: bool = False,
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
        try:
            fmt = weight_formats.normalize(weight_format)
        except ValueError as e:
            raise UnsupportedModelError(str(e)) from e
        if fmt in PACKED_FORMATS:
            self._check_packable(fmt)
        self.packed: dict[tuple[int, str], PackedLinear] = {}
        self.packed_head: PackedLinear | None = None
        self.fused: list[_FusedLayer] | None = None  # set after the weight format is settled
        fusing = fuse and self.model_type in ("llama", "mistral", "qwen2", "qwen3")
        # gguf: the fused q|k|v and gate|up packs of each layer, built with its other packs (see _gguf_packs)
        self._gguf_fused: list[tuple[PackedLinear, PackedLinear]] = []
        # gguf: free the float weights of the linears the packs serve (the model is this runner's alone)
        self.release_weights = release_weights

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
        self.weight_format, self.weight_format_reason = fmt, "asked for"
        if fmt == "auto":
            self.weight_format, self.weight_format_reason = self._auto_weight_format(max_num_seqs)
        if self.weight_format in PACKED_FORMATS and not self.packed:
            self._pack(self.weight_format, fusing)
        logger.info("weight format %s: %s", self.weight_format, self.weight_format_reason)
        if fusing:
            self.fused = [self._fuse(li, layer) for li, layer in enumerate(self.layers)]
            self._gguf_fused = []
            if not self.adapters:  # the per-module packs serve only steps with adapter rows
                for key in [k for k in self.packed if k[1] not in ("o_proj", "down_proj")]:
                    del self.packed[key]
        gguf_q4.detach(model)  # the packed linears hold the GGUF weights they serve
        self.kernel_attention = (
            self.uses_cpu_kernels and self.dtype == torch.float32 and self.model_type != "qwen3"
        )
        self.static: StaticDecode | None = None
        if static_decode and max_num_seqs > 0 and max_model_len > 0:
            self.static = StaticDecode(
                self._static_forward,
                device=self.device,
                block_size=block_size,
                scratch_block=self.scratch_block,
                vocab_size=self.vocab_size,
                max_num_seqs=max_num_seqs,
                max_model_len=max_model_len,
                cuda_graphs=self.device.type == "cuda" and self._graphs_capturable(),
            )

    def _check_packable(self, fmt: str) -> None:
        if fmt not in WEIGHT_FORMATS:
            raise UnsupportedModelError(
                f"unknown weight format {fmt!r}: use one of {', '.join(WEIGHT_FORMATS)}"
            )
        if self.device.type != "cpu":
            raise UnsupportedModelError(
                f"weight format {fmt} runs on CPU only (the model is on {self.device})"
            )

    def _packs(self, fmt: str) -> tuple[dict[tuple[int, str], PackedLinear], PackedLinear]:
        packs: dict[tuple[int, str], PackedLinear] = {}
        for li, layer in enumerate(self.layers):
            for name in LORA_TARGETS:
                parent = (
                    layer.self_attn if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else layer.mlp
                )
                packs[(li, name)] = pack_module(getattr(parent, name), fmt)
        return packs, pack_module(self.lm_head, fmt)

    def _pack(self, fmt: str, fusing: bool) -> None:
        """Every projection and the LM head packed in ``fmt`` (CPU); see ``packed.py``."""
        self._check_packable(fmt)
        if fmt == weight_formats.GGUF_FORMAT:
            logger.info("weight format gguf: %s", gguf_q4.attach(self.model))
            self.packed, self.packed_head = self._gguf_packs(fusing)
        else:
            self.packed, self.packed_head = self._packs(fmt)
        logger.info("native forward: projections and LM head packed as %s (CPU)", fmt)

    def _gguf_packs(self, fusing: bool) -> tuple[dict[tuple[int, str], PackedLinear], PackedLinear]:
        """The gguf format's packs, layer by layer: only those the forward uses (fusing without adapters: the
        fused q|k|v and gate|up, kept in ``_gguf_fused``, and o, down), each reading its GGUF codes when it is
        built. With ``release_weights`` a layer's float linear weights are freed once its packs exist (and the
        LM head's, unless it is the embedding's, tied)."""
        fmt = weight_formats.GGUF_FORMAT
        names = ("o_proj", "down_proj") if fusing and not self.adapters else LORA_TARGETS
        packs: dict[tuple[int, str], PackedLinear] = {}
        for li, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            for name in names:
                packs[(li, name)] = pack_module(getattr(attn if hasattr(attn, name) else mlp, name), fmt)
            qkv, gate_up = [attn.q_proj, attn.k_proj, attn.v_proj], [mlp.gate_proj, mlp.up_proj]
            if fusing:
                self._gguf_fused.append(
                    (weight_formats.pack_modules(qkv, fmt), weight_formats.pack_modules(gate_up, fmt))
                )
            if self.release_weights:
                for mod in (*qkv, attn.o_proj, *gate_up, mlp.down_proj):
                    weight_formats.release_weight(mod)
        head = pack_module(self.lm_head, fmt)
        if self.release_weights and self.lm_head.weight.data_ptr() != self.embed.weight.data_ptr():
            weight_formats.release_weight(self.lm_head)
        return packs, head

    def _auto_weight_format(self, max_num_seqs: int) -> tuple[str, str]:
        """``auto``: fp32 or fp16, by timing decode steps of both here (see ``packed.choose``)."""
        if self.device.type != "cpu":
            return "fp32", f"auto on {self.device.type}: packed weight formats are CPU-only"
        if self.dtype != torch.float32:
            return "fp32", f"auto: the model is loaded as {str(self.dtype).removeprefix('torch.')} already"
        t0 = time.perf_counter()
        try:
            fp16 = self._packs("fp16")
        except RuntimeError as e:  # e.g. "linear_prepack_fp16 is currently not supported by ONEDNN"
            return "fp32", f"auto: this torch build cannot pack fp16 weights ({str(e).splitlines()[0]})"
        fp32: tuple[dict[tuple[int, str], PackedLinear], PackedLinear | None] = ({}, None)

        def run(
            packs: tuple[dict[tuple[int, str], PackedLinear], PackedLinear | None],
        ) -> Callable[[int], None]:
            def step(b: int) -> None:
                self.packed, self.packed_head = packs
                self.probe_step(b)

            return step

        batches = (1,) if max_num_seqs <= 1 else (1, min(8, max_num_seqs))
        timings = weight_formats.time_steps({"fp32": run(fp32), "fp16": run(fp16)}, batches)
        fmt, why = weight_formats.choose(timings)
        self.packed, self.packed_head = fp16 if fmt == "fp16" else fp32
        return fmt, f"auto: {why}; measured in {time.perf_counter() - t0:.1f} s at start-up"

    @torch.inference_mode()
    def probe_step(self, b: int) -> None:
        """One decode step of ``b`` rows on the scratch block (nothing else in the cache is touched)."""
        dev = self.device
        slot = self.scratch_block * self.block_size
        mask = torch.zeros(b, 1, 1, self.block_size, dtype=torch.bool, device=dev)
        mask[..., 0] = True
        group = AttnGroup(
            tok_idx=torch.arange(b, device=dev).unsqueeze(1),
            block_tables=torch.full((b, 1), self.scratch_block, dtype=torch.long, device=dev),
            mask=mask,
            src=None,
            dst=None,
            ctx=torch.ones(b, dtype=torch.long, device=dev),
        )
        zeros = torch.zeros(b, dtype=torch.long, device=dev)
        self._forward(zeros, zeros, torch.full((b,), slot, dtype=torch.long, device=dev), [group], None, [])

    def _fuse(self, li: int, layer: Any) -> _FusedLayer:
        """Layer ``li`` with q|k|v and gate|up as one matmul each (packed in the weight format, if any)."""
        attn, mlp = layer.self_attn, layer.mlp
        fmt = self.weight_format if self.weight_format in PACKED_FORMATS else None
        lins: list[Linear] = []
        for i, mods in enumerate(([attn.q_proj, attn.k_proj, attn.v_proj], [mlp.gate_proj, mlp.up_proj])):
            if self._gguf_fused:  # built with the layer's other packs
                lins.append(self._gguf_fused[li][i])
            elif fmt is None:
                lins.append(_dense(*_fused_weight(mods)))
            else:
                lins.append(weight_formats.pack_modules(mods, fmt))
        if fmt is None:
            o: Linear = attn.o_proj
            down: Linear = mlp.down_proj
        else:
            o, down = self.packed[(li, "o_proj")], self.packed[(li, "down_proj")]
        return _FusedLayer(
            qkv=lins[0], o=o, gate_up=lins[1], down=down, intermediate=int(mlp.gate_proj.weight.shape[0])
        )

    def _graphs_capturable(self) -> bool:
        rope_type = str(getattr(self.rotary, "rope_type", "default"))
        if "dynamic" in rope_type or rope_type == "longrope":
            # These rotary embeddings compare positions on the host and swap inv_freq: not capturable.
            logger.warning(
                "rope type %s: no CUDA graphs, decode steps run the static path eagerly", rope_type
            )
            return False
        return True

    @property
    def uses_cpu_kernels(self) -> bool:
        fused = [lin for f in self.fused or [] for lin in (f.qkv, f.o, f.gate_up, f.down)]
        return weight_formats.uses_kernels([*self.packed.values(), self.packed_head, *fused])

    @property
    def num_static_steps(self) -> int:
        return self.static.num_steps if self.static is not None else 0

    @property
    def num_graph_captures(self) -> int:
        return self.static.num_graph_captures if self.static is not None else 0

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

    # --------------------------------------------------------------- forward
    def _linear(
        self, x: torch.Tensor, mod: Any, layer: int, name: str, adapter_rows: list[tuple[int, torch.Tensor]]
    ) -> torch.Tensor:
        packed = self.packed.get((layer, name)) if self.packed else None
        y: torch.Tensor = mod(x) if packed is None else packed(x)
        for a, rows in adapter_rows:
            w = self.adapters[a].weights.get((layer, name))
            if w is None:
                continue
            lora_a, lora_b = w
            delta = (x.index_select(0, rows) @ lora_a.t()) @ lora_b.t()
            y = y.index_add(0, rows, delta, alpha=self.adapters[a].scale)
        return y

    def _attention(self, q: torch.Tensor, layer: int, groups: list[AttnGroup]) -> torch.Tensor:
        return attention.paged_attention(q, self.k_cache[layer], self.v_cache[layer], groups, self.scaling)

    def _static_forward(
        self, ids: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor, groups: list[AttnGroup]
    ) -> torch.Tensor:
        return self._forward(ids, pos, slots, groups, None, [])

    def _forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        groups: list[AttnGroup],
        sample_idx: torch.Tensor | None,
        adapter_rows: list[tuple[int, torch.Tensor]],
    ) -> torch.Tensor:
        """The decoder over T flat tokens; float32 logits of the rows in sample_idx (None: all rows)."""
        t = input_ids.shape[0]
        h = self.embed(input_ids)  # [T, hidden]
        cos, sin = self.rotary(h.unsqueeze(0), positions.unsqueeze(0))
        cos = cos[0].unsqueeze(1)  # [T, 1, D]
        sin = sin[0].unsqueeze(1)
        if self.fused is not None and not adapter_rows:
            h = fused_layers.layers(self, h, cos, sin, slots, groups)
            return self._head(h, sample_idx)
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
            o = self._attention(q, li, groups).reshape(t, self.num_heads * self.head_dim)
            h = h + self._linear(o, attn.o_proj, li, "o_proj", adapter_rows)
            x = layer.post_attention_layernorm(h)
            mlp = layer.mlp
            if adapter_rows or self.packed:
                gate = self._linear(x, mlp.gate_proj, li, "gate_proj", adapter_rows)
                up = self._linear(x, mlp.up_proj, li, "up_proj", adapter_rows)
                m = self._linear(mlp.act_fn(gate) * up, mlp.down_proj, li, "down_proj", adapter_rows)
            else:
                m = mlp(x)
            h = h + m
        return self._head(h, sample_idx)

    def _head(self, h: torch.Tensor, sample_idx: torch.Tensor | None) -> torch.Tensor:
        rows = h if sample_idx is None else h.index_select(0, sample_idx)
        head = self.lm_head if self.packed_head is None else self.packed_head
        logits = fused_layers.norm_linear(self.norm, head, rows)
        return logits.float()

    @torch.inference_mode()
    def execute(self, batch: Seq[ScheduledSeq]) -> torch.Tensor:
        """Run one step; returns float32 logits [num sampling sequences, vocab]."""
        bucket = self.static.fits(batch) if self.static is not None else None
        if bucket is not None:
            assert self.static is not None
            return self.static.execute(batch, *bucket)
        inp = attention.prepare(batch, self.block_size, self.device)
        return self._forward(
            inp.input_ids, inp.positions, inp.slots, inp.groups, inp.sample_idx, inp.adapter_rows
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
