"""The transformers modeling backend: the model's own modeling code over Berth's paged KV cache.

The model is the one transformers built (``AutoModelForCausalLM``, its weights, its layers, its
rotary embeddings, norms, MoE experts and LM head, final logit soft-capping included); only its
attention is Berth's: ``hf_attention.berth_attention``, set as the decoder's ``attn_implementation``
for the duration of each forward pass, reads and writes the paged cache over the step's block tables. A step runs all scheduled tokens of
all sequences as one flat batch ``[1, T]`` with explicit ``position_ids``; ``logits_to_keep`` holds
the rows that sample, so only those reach the LM head. Side-by-side LoRA adapters are forward hooks
on the adapted projections, adding ``s * B (A x)`` to the rows of the requests that asked for them.

Which layers need which cache (KV heads, key/value head sizes, dtype, device) is found by one probe
forward over two tokens before the cache is allocated: every architecture says it itself, partial
rotary (GLM), latent attention (DeepSeek-V3) and per-layer windows (Gemma) included.
"""

from __future__ import annotations

import inspect
import logging
import weakref
from collections.abc import Sequence as Seq
from typing import Any

import torch

from berth.server.engine.runner import attention, hf_attention
from berth.server.engine.runner.hf_attention import LayerSpec, PagedStep, ProbeStep
from berth.server.engine.sampler import Sampler
from berth.server.engine.scheduler import ScheduledSeq
from berth.server.engine.sequence import Sequence
from berth.server.engine.types import LoraWeights, SampleResult

logger = logging.getLogger(__name__)

_LAYOUTS: weakref.WeakKeyDictionary[Any, dict[int, LayerSpec]] = weakref.WeakKeyDictionary()


class TransformersUnsupported(ValueError):
    """The model cannot run on the transformers backend (the message says why and what to do)."""


def _describe(model: Any) -> str:
    cfg = model.config
    arch = ",".join(getattr(cfg, "architectures", None) or [type(model).__name__])
    return f"architecture {arch} (model_type {getattr(cfg, 'model_type', 'unknown')!r})"


def _decoder_layers(model: Any) -> int:
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(getattr(text, "num_hidden_layers", 0) or 0)


def probe(model: Any) -> dict[int, LayerSpec]:
    """Per attention layer, what its cache holds (one forward over two tokens, cached per model)."""
    known = _LAYOUTS.get(model)
    if known is not None:
        return known
    what = _describe(model)
    if not type(model)._can_set_attn_implementation():
        raise TransformersUnsupported(
            f"{what}: its attention does not go through transformers' attention interface, so Berth's paged "
            "attention cannot be plugged in"
        )
    step = ProbeStep()
    device = model.get_input_embeddings().weight.device
    ids = torch.tensor([[0, 1]], dtype=torch.long, device=device)
    with torch.inference_mode(), hf_attention.installed(model), hf_attention.running(step):
        model(input_ids=ids, position_ids=torch.arange(2, device=device)[None], use_cache=False)
    layers = _decoder_layers(model)
    if not step.layers:
        raise TransformersUnsupported(f"{what}: no attention layer called the attention interface")
    if len(step.layers) != layers or sorted(step.layers) != list(range(layers)):
        raise TransformersUnsupported(
            f"{what}: {layers} decoder layers but {len(step.layers)} attention layers with a KV cache "
            "(state-space / linear-attention or shared-KV layers are not supported)"
        )
    if not all(s.causal for s in step.layers.values()):
        raise TransformersUnsupported(
            f"{what} attends bidirectionally (an encoder): Berth serves decoder-only, causal language models"
        )
    _LAYOUTS[model] = step.layers
    return step.layers


class TransformersRunner:
    """The ``transformers`` backend: same interface as the native ``ModelRunner``."""

    backend = "transformers"

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
        self.model = model
        self.layout = probe(model)
        self.device = model.get_input_embeddings().weight.device
        self.dtype = next(model.parameters()).dtype
        text = model.config.get_text_config()
        self.vocab_size = int(
            getattr(text, "vocab_size", None) or model.get_output_embeddings().weight.shape[0]
        )
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.sampler = sampler
        self.static = None  # static shapes / CUDA graphs: native backend only
        if static_decode:
            logger.warning(
                "--cuda-graphs applies to the native backend only; the transformers backend runs eagerly"
            )
        self.caches = [
            (
                torch.zeros(num_blocks + 1, block_size, s.kv_heads, s.k_dim, dtype=s.dtype, device=s.device),
                torch.zeros(num_blocks + 1, block_size, s.kv_heads, s.v_dim, dtype=s.dtype, device=s.device),
            )
            for _, s in sorted(self.layout.items())
        ]
        self.k_cache = [k for k, _ in self.caches]
        self.v_cache = [v for _, v in self.caches]
        self._keep_arg = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.adapters = list(adapters)
        self._step: PagedStep | None = None
        self._adapter_rows: list[tuple[int, torch.Tensor]] = []
        self._hooks = [
            self._hook_adapter(a, name, layer)
            for a in range(len(self.adapters))
            for (layer, name) in self.adapters[a].weights
        ]
        windows = sorted({s.sliding_window for s in self.layout.values() if s.sliding_window})
        logger.info(
            "transformers backend: %d attention layers (KV heads %s, key/value head sizes %s%s); "
            "KV cache %d blocks x %d tokens (%.1f MiB)",
            len(self.layout),
            sorted({s.kv_heads for s in self.layout.values()}),
            sorted({(s.k_dim, s.v_dim) for s in self.layout.values()}),
            f", sliding windows {windows}" if windows else "",
            num_blocks,
            block_size,
            self.kv_cache_bytes() / 2**20,
        )

    # ---------------------------------------------------------------- sizing
    @staticmethod
    def bytes_per_block(model: Any, block_size: int) -> int:
        return block_size * sum(s.bytes_per_token() for s in probe(model).values())

    @staticmethod
    def free_device_memory(device: torch.device) -> int:
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)

    def kv_cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k_cache + self.v_cache)

    @property
    def num_static_steps(self) -> int:
        return 0

    @property
    def num_graph_captures(self) -> int:
        return 0

    # ------------------------------------------------------------------ LoRA
    def _hook_adapter(self, index: int, name: str, layer: int) -> Any:
        layers = self.model.get_decoder().layers
        targets = [m for n, m in layers[layer].named_modules() if n.rsplit(".", 1)[-1] == name]
        if len(targets) != 1:
            raise TransformersUnsupported(
                f"adapter {self.adapters[index].name!r}: layer {layer} has no single module named {name!r}"
            )
        lora_a, lora_b = self.adapters[index].weights[(layer, name)]
        scale = self.adapters[index].scale

        def hook(_: Any, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            for a, rows in self._adapter_rows:
                if a == index:
                    x = args[0][0].index_select(0, rows)
                    output[0].index_add_(0, rows, (x @ lora_a.t()) @ lora_b.t(), alpha=scale)
            return output

        return targets[0].register_forward_hook(hook)

    # --------------------------------------------------------------- forward
    @torch.inference_mode()
    def execute(self, batch: Seq[ScheduledSeq]) -> torch.Tensor:
        """Run one step; returns float32 logits [num sampling sequences, vocab]."""
        inp = attention.prepare(batch, self.block_size, self.device)
        return self._forward(inp, input_ids=inp.input_ids[None], position_ids=inp.positions[None])

    def _forward(self, inp: Any, **model_inputs: Any) -> torch.Tensor:
        """The model over Berth's paged cache for one prepared step; float32 logits of its sampling rows."""
        step = PagedStep(inp.groups, inp.positions, inp.slots, self.caches)
        self._adapter_rows = inp.adapter_rows
        kwargs: dict[str, Any] = {"use_cache": False}
        if self._keep_arg:
            kwargs["logits_to_keep"] = inp.sample_idx
        try:
            with hf_attention.installed(self.model), hf_attention.running(step):
                out = self.model(**model_inputs, **kwargs)
        finally:
            self._adapter_rows = []
        logits: torch.Tensor = out.logits[0]
        if not self._keep_arg:
            logits = logits.index_select(0, inp.sample_idx.to(logits.device))
        return logits.float().to(self.device)

    def step(self, batch: Seq[ScheduledSeq], sampling: Seq[Sequence]) -> list[SampleResult]:
        logits = self.execute(batch)
        if not sampling:
            return []
        if self.sampler is None:
            raise RuntimeError("this runner was built without a sampler")
        return self.sampler.sample(logits, sampling)
