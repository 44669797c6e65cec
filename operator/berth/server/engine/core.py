"""``EngineCore``: scheduler + KV cache + model runner + sampler + detokenizer, stepped by the
caller on one thread. One step = schedule -> forward and sample (the model runner) ->
``Scheduler.update_from_output`` (bookkeeping, detokenization and stops) -> events."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from typing import Any

from berth.server.engine.detokenizer import Detokenizer
from berth.server.engine.guided import Guides
from berth.server.engine.kv_cache import BlockManager
from berth.server.engine.runner import RUNNERS, runner_class, threads
from berth.server.engine.sampler import Sampler
from berth.server.engine.scheduler import Scheduler
from berth.server.engine.sequence import Sequence
from berth.server.engine.types import (
    AdapterNotFoundError,
    EngineConfig,
    EngineStats,
    GenerationRequest,
    LoadedModel,
    TokenEvent,
)

logger = logging.getLogger(__name__)


def size_cache(model: LoadedModel, config: EngineConfig) -> int:
    """KV blocks: ``config.num_blocks``, else what the memory budget holds, never more than useful."""
    if config.num_blocks is not None:
        return config.num_blocks
    runner = RUNNERS[model.backend]
    per_block = runner.bytes_per_block(model.model, config.block_size)
    useful = config.max_num_seqs * -(-model.max_model_len // config.block_size)
    if model.device.type == "cuda":
        budget = int(runner.free_device_memory(model.device) * config.kv_cache_memory_fraction)
    else:
        budget = int(config.kv_cache_cpu_gib * 2**30)
    return max(1, min(budget // per_block, useful))


def _adapters(seqs: list[Sequence]) -> tuple[str, ...]:
    return tuple(sorted({s.adapter for s in seqs if s.adapter}))


def _weight_format_arg(backend: str, fmt: str, release_weights: bool = False) -> dict[str, Any]:
    """The runner's ``weight_format`` (and ``release_weights``) arguments: only the native forward packs
    weights (``auto`` and full precision mean the model's own weights on the other backends)."""
    if backend == "native":
        return {"weight_format": fmt, "release_weights": release_weights}
    if fmt in ("auto", "fp32", "none"):
        return {}
    raise ValueError(
        f"weight format {fmt} needs the native backend (this model runs on the {backend} backend)"
    )


class EngineCore:
    """Scheduler + KV cache + model runner + sampler, stepped by the caller (one thread)."""

    def __init__(self, model: LoadedModel, config: EngineConfig) -> None:
        self.model = model
        self.config = config
        self.tokenizer = model.tokenizer
        num_blocks = size_cache(model, config)
        self.bm = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.bm, config.max_num_seqs, config.max_num_batched_tokens)
        explicit = threads.parse(config.threads) is not None
        if explicit:  # before the weights are packed; auto times the runner's decode steps once it exists
            self.threads, self.threads_reason = self._threads(None)
        self.runner = runner_class(model.backend, model.model)(
            model.model,
            num_blocks=num_blocks,
            block_size=config.block_size,
            adapters=model.adapters,
            sampler=Sampler(config.max_num_seqs),
            static_decode=config.cuda_graphs,
            **_weight_format_arg(model.backend, config.weight_format, config.release_packed_weights),
            max_num_seqs=config.max_num_seqs,
            max_model_len=model.max_model_len,
        )
        if not explicit:
            self.threads, self.threads_reason = self._threads(
                getattr(self.runner, "probe_step", None),
                bool(getattr(self.runner, "uses_cpu_kernels", False)),
            )
        self.detokenizer = Detokenizer(
            model.tokenizer, frozenset(model.eos_token_ids), self.runner.vocab_size
        )
        self.guides = Guides(model.tokenizer, self.runner.vocab_size, model.eos_token_ids)
        self.adapter_index = {a.name: i for i, a in enumerate(model.adapters)}
        self.capacity_tokens = num_blocks * config.block_size
        self._rng = random.Random(config.seed)
        if self.capacity_tokens < model.max_model_len:
            logger.warning(
                "the KV cache holds %d tokens, less than max_model_len=%d: long requests are cut at the cache size",
                self.capacity_tokens,
                model.max_model_len,
            )

    def _threads(self, probe: Any, kernels: bool = False) -> tuple[int, str]:
        n, why = threads.configure(
            self.config.threads,
            device=self.model.device,
            probe=probe,
            max_num_seqs=self.config.max_num_seqs,
            kernels=kernels,
        )
        logger.info("threads %d: %s", n, why)
        return n, why

    @property
    def vocab_size(self) -> int:
        return self.runner.vocab_size

    # ------------------------------------------------------------- admission
    def _adapter_index(self, adapter: str | None) -> int:
        if adapter is None or adapter in self.model.merged_adapters:
            return -1
        if adapter not in self.adapter_index:
            known = list(self.model.merged_adapters) + list(self.adapter_index)
            raise AdapterNotFoundError(f"unknown adapter {adapter!r}; loaded adapters: {known or 'none'}")
        return self.adapter_index[adapter]

    def make_sequence(self, req: GenerationRequest) -> Sequence:
        """Check a request against the model and the cache; turn it into a Sequence (ValueError if not)."""
        n = len(req.prompt_token_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        mml = self.model.max_model_len
        if n >= mml:
            raise ValueError(
                f"the prompt has {n} tokens but this model's maximum context length is {mml} tokens "
                "(prompt plus at least one generated token)"
            )
        if n >= self.capacity_tokens:
            raise ValueError(
                f"the prompt has {n} tokens but the KV cache holds only {self.capacity_tokens} tokens"
            )
        vocab = self.vocab_size
        if any(t < 0 or t >= vocab for t in req.prompt_token_ids):
            raise ValueError(f"the prompt holds token ids outside the vocabulary (0..{vocab - 1})")
        if req.multimodal is not None and not getattr(self.runner, "supports_images", False):
            raise ValueError(f"the model {self.model.served_name!r} does not take images")
        adapter_index = self._adapter_index(req.adapter)
        p = req.params
        return Sequence(
            request_id=req.request_id,
            prompt_token_ids=list(req.prompt_token_ids),
            params=p,
            adapter=req.adapter if adapter_index >= 0 else None,
            adapter_index=adapter_index,
            max_tokens=min(p.max_tokens, mml - n, self.capacity_tokens - n),
            seed=p.seed if p.seed is not None else self._rng.getrandbits(63),
            guide=self.guides.guide(p.guided) if p.guided is not None else None,
            multimodal=req.multimodal,
            block_salts=req.multimodal.block_salts(self.bm.block_size) if req.multimodal is not None else {},
        )

    def add(self, seq: Sequence) -> None:
        self.scheduler.add(seq)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def abort(self, request_id: str) -> TokenEvent | None:
        seq = self.scheduler.abort(request_id)
        if seq is None:
            return None
        return TokenEvent(
            token_id=None,
            text="",
            finish_reason="abort",
            num_prompt_tokens=seq.num_prompt_tokens,
            num_generated_tokens=seq.num_output_tokens,
            num_cached_prompt_tokens=seq.num_cached_prompt_tokens,
        )

    def request_ids(self) -> list[str]:
        return list(self.scheduler.requests)

    # ------------------------------------------------------------------ step
    def step(self) -> list[tuple[str, TokenEvent]]:
        out = self.scheduler.schedule()
        if not out:
            return []
        results = self.runner.step(out.scheduled, out.sampling)
        return self.scheduler.update_from_output(out, results, self.detokenizer)

    def stats(self, extra_waiting: int = 0) -> EngineStats:
        c = self.scheduler.counters
        return EngineStats(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting) + extra_waiting,
            kv_cache_usage=self.bm.usage,
            steps=c.steps,
            num_prefill_tokens=c.num_prefill_tokens,
            num_decode_tokens=c.num_decode_tokens,
            num_cached_prompt_tokens=c.num_cached_prompt_tokens,
            num_blocks_total=self.bm.num_blocks,
            num_blocks_free=self.bm.num_free_blocks,
            num_preemptions=c.num_preemptions,
            num_finished=c.num_finished,
            num_aborted=c.num_aborted,
            # copies: the scrape thread reads while the engine thread steps
            running_adapters=_adapters(list(self.scheduler.running)),
            waiting_adapters=_adapters(list(self.scheduler.waiting)),
            max_lora=len(self.adapter_index),
        )

    def run(self, requests: Iterable[GenerationRequest]) -> dict[str, list[TokenEvent]]:
        """Run requests to completion on the calling thread (tests, benchmarks)."""
        out: dict[str, list[TokenEvent]] = {}
        for req in requests:
            self.add(self.make_sequence(req))
            out[req.request_id] = []
        while self.has_work():
            for rid, ev in self.step():
                out[rid].append(ev)
        return out
