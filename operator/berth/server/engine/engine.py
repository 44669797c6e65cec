"""The engine: a stepping thread around ``EngineCore`` with an asyncio front.

``EngineCore`` is single-threaded and synchronous: ``add`` a sequence, call ``step`` until
done; every step runs the scheduler, one forward pass of the model runner and the sampler,
and returns the token events of that step. ``Engine`` runs ``EngineCore.step`` on a
background thread and hands events to asyncio consumers through ``loop.call_soon_threadsafe``
into per-request queues; admission (queue bounds, draining, validation) happens synchronously
in the caller so errors surface before the first event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from berth.server.engine import json_mode
from berth.server.engine.kv_cache import BlockManager
from berth.server.engine.model_runner import ModelRunner
from berth.server.engine.sampler import Sampler, SampleResult
from berth.server.engine.scheduler import Scheduler
from berth.server.engine.sequence import Sequence
from berth.server.engine.types import (
    AdapterNotFoundError,
    EngineConfig,
    EngineDrainingError,
    EngineStats,
    GenerationRequest,
    ModelInfo,
    QueueFullError,
    TokenEvent,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from berth.server.loader import LoadedModel

logger = logging.getLogger(__name__)


def _size_cache(model: LoadedModel, config: EngineConfig) -> int:
    per_block = ModelRunner.bytes_per_block(model.model, config.block_size)
    useful = config.max_num_seqs * -(-model.max_model_len // config.block_size)
    if config.num_blocks is not None:
        return config.num_blocks
    if model.device.type == "cuda":
        budget = int(ModelRunner.free_device_memory(model.device) * config.kv_cache_memory_fraction)
    else:
        budget = int(config.kv_cache_cpu_gib * 2**30)
    n = max(1, min(budget // per_block, useful))
    return n


class EngineCore:
    """Scheduler + KV cache + model runner + sampler, stepped by the caller (one thread)."""

    def __init__(self, model: LoadedModel, config: EngineConfig) -> None:
        self.model = model
        self.config = config
        self.tokenizer = model.tokenizer
        num_blocks = _size_cache(model, config)
        self.bm = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.bm, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = ModelRunner(
            model.model,
            num_blocks=num_blocks,
            block_size=config.block_size,
            adapters=model.adapters,
            sampler=Sampler(self.token_texts),
            static_decode=config.cuda_graphs,
            max_num_seqs=config.max_num_seqs,
            max_model_len=model.max_model_len,
        )
        self.eos_token_ids = frozenset(model.eos_token_ids)
        self.special_ids = frozenset(getattr(self.tokenizer, "all_special_ids", []) or [])
        self.adapter_index = {a.name: i for i, a in enumerate(model.adapters)}
        self.capacity_tokens = num_blocks * config.block_size
        self.seqs: dict[str, Sequence] = {}
        self._rng = random.Random(config.seed)
        self._token_texts: list[str | None] | None = None
        self._vocab_lock = threading.Lock()
        self._piece_cache: dict[int, str] = {}
        # counters
        self.steps = 0
        self.num_prefill_tokens = 0
        self.num_decode_tokens = 0
        self.num_cached_prompt_tokens = 0
        self.num_finished = 0
        self.num_aborted = 0
        if self.capacity_tokens < model.max_model_len:
            logger.warning(
                "the KV cache holds %d tokens, less than max_model_len=%d: long requests are cut at the cache size",
                self.capacity_tokens,
                model.max_model_len,
            )

    # ------------------------------------------------------------ vocabulary
    def _decode(self, ids: list[int]) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return str(text)

    def token_piece(self, token_id: int) -> str:
        """The text of one token as it would appear in an output (for top_logprobs)."""
        piece = self._piece_cache.get(token_id)
        if piece is None:
            piece = str(
                self.tokenizer.decode(
                    [token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False
                )
            )
            self._piece_cache[token_id] = piece
        return piece

    def token_texts(self) -> list[str | None]:
        """The text each token adds to an output (None for special tokens); built on first use."""
        if self._token_texts is not None:
            return self._token_texts
        with self._vocab_lock:
            if self._token_texts is not None:
                return self._token_texts
            t0 = time.monotonic()
            tok = self.tokenizer
            n = self.runner.vocab_size
            anchor_ids = tok.encode("a", add_special_tokens=False)[:1] or [0]
            anchor = self._decode(anchor_ids)
            known = min(n, len(tok))
            pairs = tok.batch_decode(
                [[*anchor_ids, i] for i in range(known)],
                skip_special_tokens=False,
                clean_up_tokenization_spaces=False,
            )
            texts: list[str | None] = []
            for i, s in enumerate(pairs):
                if i in self.special_ids:
                    texts.append(None)
                elif s.startswith(anchor):
                    texts.append(s[len(anchor) :])
                else:
                    texts.append(self._decode([i]))
            texts.extend([None] * (n - known))
            self._token_texts = texts
            logger.info(
                "built the token text table for JSON mode (%d tokens) in %.1fs", n, time.monotonic() - t0
            )
        return self._token_texts

    # ------------------------------------------------------------- admission
    def make_sequence(self, req: GenerationRequest) -> Sequence:
        """Validate a request and turn it into a Sequence (raises ValueError naming the problem)."""
        p = req.params
        p.validate()
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
        vocab = self.runner.vocab_size
        if any(t < 0 or t >= vocab for t in req.prompt_token_ids):
            raise ValueError(f"the prompt holds token ids outside the vocabulary (0..{vocab - 1})")
        adapter_index = -1
        if req.adapter is not None and req.adapter not in self.model.merged_adapters:
            if req.adapter not in self.adapter_index:
                known = list(self.model.merged_adapters) + list(self.adapter_index)
                raise AdapterNotFoundError(
                    f"unknown adapter {req.adapter!r}; loaded adapters: {known or 'none'}"
                )
            adapter_index = self.adapter_index[req.adapter]
        if p.json_mode and p.max_tokens < 2:
            raise ValueError("json_mode needs max_tokens >= 2")
        max_tokens = min(p.max_tokens, mml - n, self.capacity_tokens - n)
        seed = p.seed if p.seed is not None else self._rng.getrandbits(63)
        return Sequence(
            request_id=req.request_id,
            prompt_token_ids=list(req.prompt_token_ids),
            params=p,
            adapter=req.adapter if adapter_index >= 0 else None,
            adapter_index=adapter_index,
            max_tokens=max_tokens,
            seed=seed,
        )

    def add(self, seq: Sequence) -> None:
        if seq.request_id in self.seqs:
            raise ValueError(f"request id {seq.request_id!r} is already running")
        self.seqs[seq.request_id] = seq
        self.scheduler.add(seq)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def abort(self, request_id: str) -> TokenEvent | None:
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return None
        self.scheduler.finish(seq, "abort")
        self.num_aborted += 1
        return TokenEvent(
            token_id=None,
            text="",
            finish_reason="abort",
            num_prompt_tokens=seq.num_prompt_tokens,
            num_generated_tokens=seq.num_output_tokens,
            num_cached_prompt_tokens=seq.num_cached_prompt_tokens,
        )

    # ------------------------------------------------------------------ step
    def step(self) -> list[tuple[str, TokenEvent]]:
        out = self.scheduler.schedule()
        if not out:
            return []
        sampling = [s.seq for s in out.scheduled if s.samples]
        results = self.runner.step(out.scheduled, sampling)
        self.steps += 1
        for s in out.scheduled:
            seq = s.seq
            if s.num_tokens == 1 and s.start >= seq.num_prompt_tokens:
                self.num_decode_tokens += 1
            else:
                self.num_prefill_tokens += s.num_tokens
            seq.num_computed_tokens += s.num_tokens
            self.bm.cache_full_blocks(seq, seq.num_computed_tokens)
        return [(seq.request_id, self._process(seq, res)) for seq, res in zip(sampling, results, strict=True)]

    def _detokenize(self, seq: Sequence, flush: bool = False) -> str:
        ids = seq.all_token_ids
        prefix = self._decode(ids[seq.prefix_offset : seq.read_offset])
        new = self._decode(ids[seq.prefix_offset :])
        if len(new) > len(prefix) and (flush or not new.endswith("\ufffd")):
            seq.prefix_offset = seq.read_offset
            seq.read_offset = len(ids)
            return new[len(prefix) :]
        return ""

    def _process(self, seq: Sequence, res: SampleResult) -> TokenEvent:
        p = seq.params
        tid = res.token_id
        first = seq.num_output_tokens == 0
        if first:
            self.num_cached_prompt_tokens += seq.num_cached_prompt_tokens
        seq.append_token(tid)
        if res.json_state is not None:
            seq.json_state = res.json_state
        finish: str | None = None
        if (tid in self.eos_token_ids and not p.ignore_eos) or tid in p.stop_token_ids:
            finish = "stop"
        else:
            old_len = len(seq.text)
            seq.text += self._detokenize(seq, flush=False)
            if p.stop:
                longest = max(len(s) for s in p.stop)
                begin = max(0, old_len - longest + 1)
                hits = [i for i in (seq.text.find(s, begin) for s in p.stop) if i >= 0]
                if hits:
                    seq.text = seq.text[: min(hits)]
                    finish = "stop"
            if (
                finish is None
                and p.json_mode
                and res.json_state is not None
                and json_mode.is_done(res.json_state)
            ):
                finish = "stop"
        if finish is None and (seq.num_output_tokens >= seq.max_tokens):
            finish = "length"
            seq.text += self._detokenize(seq, flush=True)
        # Release text, holding back a suffix that may still become a stop string.
        end = len(seq.text)
        if finish is None and p.stop:
            for k in range(min(end - seq.num_released_chars, max(len(s) for s in p.stop) - 1), 0, -1):
                tail = seq.text[end - k :]
                if any(s.startswith(tail) for s in p.stop):
                    end -= k
                    break
        delta = seq.text[seq.num_released_chars : end]
        seq.num_released_chars = end
        event = TokenEvent(
            token_id=tid,
            text=delta,
            logprob=res.logprob,
            top_logprobs=(
                [(self.token_piece(t), lp) for t, lp in res.top_logprobs]
                if res.top_logprobs is not None
                else None
            ),
            finish_reason=finish,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_generated_tokens=seq.num_output_tokens,
            num_cached_prompt_tokens=seq.num_cached_prompt_tokens,
        )
        if finish is not None:
            self.scheduler.finish(seq, finish)
            self.seqs.pop(seq.request_id, None)
            self.num_finished += 1
        return event

    def stats(self, extra_waiting: int = 0) -> EngineStats:
        return EngineStats(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting) + extra_waiting,
            kv_cache_usage=self.bm.usage,
            steps=self.steps,
            num_prefill_tokens=self.num_prefill_tokens,
            num_decode_tokens=self.num_decode_tokens,
            num_cached_prompt_tokens=self.num_cached_prompt_tokens,
            num_blocks_total=self.bm.num_blocks,
            num_blocks_free=self.bm.num_free_blocks,
            num_preemptions=self.scheduler.num_preemptions,
            num_finished=self.num_finished,
            num_aborted=self.num_aborted,
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


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[TokenEvent | BaseException] = field(default_factory=asyncio.Queue)
    done: bool = False


class Engine:
    """The engine the serving layer talks to (see docs/engine.md)."""

    def __init__(self, model: LoadedModel, config: EngineConfig) -> None:
        self._model = model
        self.config = config
        self._core = EngineCore(model, config)
        self._cv = threading.Condition()
        self._inbox: list[Sequence] = []
        self._aborts: list[str] = []
        self._streams: dict[str, _Stream] = {}
        self._draining = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.model_info = ModelInfo(
            served_name=model.served_name,
            source=model.source,
            architecture=model.architecture,
            max_model_len=model.max_model_len,
            dtype=str(model.dtype).removeprefix("torch."),
            device=str(model.device),
            has_chat_template=model.has_chat_template,
            vocab_size=self._core.runner.vocab_size,
            eos_token_ids=tuple(model.eos_token_ids),
            adapters=tuple(model.merged_adapters) + tuple(model.adapter_names),
            merged_adapters=tuple(model.merged_adapters),
            extra={
                "block_size": str(config.block_size),
                "num_blocks": str(self._core.bm.num_blocks),
                "max_num_seqs": str(config.max_num_seqs),
                "max_num_batched_tokens": str(config.max_num_batched_tokens),
                "prefix_caching": str(config.enable_prefix_caching).lower(),
            },
        )

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self._model.tokenizer

    @property
    def core(self) -> EngineCore:
        return self._core

    # ------------------------------------------------------------- lifecycle
    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="berth-engine", daemon=True)
        self._thread.start()
        if self.config.prebuild_json_vocab:
            # JSON mode needs every token's text; build the table now rather than in the first
            # JSON request's step (about a second for a 50k vocabulary).
            threading.Thread(target=self._core.token_texts, name="berth-json-vocab", daemon=True).start()

    def drain(self) -> None:
        with self._cv:
            self._draining = True

    @property
    def draining(self) -> bool:
        return self._draining

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._draining = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        # Whatever is left is aborted.
        for rid in list(self._streams):
            ev = self._core.abort(rid)
            self._deliver(rid, ev or TokenEvent(token_id=None, text="", finish_reason="abort"))
        with self._cv:
            for seq in self._inbox:
                self._deliver(seq.request_id, TokenEvent(token_id=None, text="", finish_reason="abort"))
            self._inbox.clear()

    def stats(self) -> EngineStats:
        with self._cv:
            inbox = len(self._inbox)
        return self._core.stats(extra_waiting=inbox)

    # ------------------------------------------------------------- requests
    def add_request(self, req: GenerationRequest) -> asyncio.Queue[TokenEvent | BaseException]:
        """Admit a request (raises at once) and return the queue its events arrive on.

        Must be called from the event loop thread that will consume the queue.
        """
        loop = asyncio.get_running_loop()
        if self._draining:
            raise EngineDrainingError("the server is shutting down and no longer accepts requests")
        seq = self._core.make_sequence(req)
        with self._cv:
            if req.request_id in self._streams:
                raise ValueError(f"request id {req.request_id!r} is already in use")
            in_system = len(self._streams)
            limit = self.config.max_num_seqs + self.config.max_queue
            if in_system >= limit:
                raise QueueFullError(
                    f"the engine is full: {in_system} requests running or waiting (max_num_seqs="
                    f"{self.config.max_num_seqs}, max_queue={self.config.max_queue})",
                    retry_after=1.0,
                )
            stream = _Stream(loop)
            self._streams[req.request_id] = stream
            self._inbox.append(seq)
            self._cv.notify_all()
        return stream.queue

    async def generate(self, req: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Stream a request's token events; cancelling the consumer aborts the request."""
        queue = self.add_request(req)
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if item.finish_reason is not None:
                    finished = True
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(req.request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request; its consumer (if still listening) gets a final ``abort`` event."""
        not_started: Sequence | None = None
        with self._cv:
            for i, seq in enumerate(self._inbox):
                if seq.request_id == request_id:
                    not_started = self._inbox.pop(i)
                    break
            else:
                if request_id in self._streams:
                    self._aborts.append(request_id)
                    self._cv.notify_all()
        if not_started is not None:
            self._deliver(
                request_id,
                TokenEvent(
                    token_id=None,
                    text="",
                    finish_reason="abort",
                    num_prompt_tokens=not_started.num_prompt_tokens,
                ),
            )

    # ----------------------------------------------------------- the thread
    def _deliver(self, rid: str, item: TokenEvent | BaseException) -> None:
        final = isinstance(item, BaseException) or item.finish_reason is not None
        with self._cv:
            stream = self._streams.pop(rid, None) if final else self._streams.get(rid)
        if stream is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens any more
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)

    def _loop(self) -> None:
        core = self._core
        while True:
            with self._cv:
                while not (self._stopping or self._inbox or self._aborts or core.has_work()):
                    self._cv.wait()
                if self._stopping:
                    return
                new, self._inbox = self._inbox, []
                aborts, self._aborts = self._aborts, []
            for rid in aborts:
                ev = core.abort(rid)
                if ev is not None:
                    self._deliver(rid, ev)
            for seq in new:
                core.add(seq)
            try:
                events = core.step()
            except Exception as e:  # a failed step fails the requests in it, not the server
                logger.exception("engine step failed; failing all running requests")
                for rid in list(core.seqs):
                    core.abort(rid)
                    self._deliver(rid, RuntimeError(f"engine step failed: {e}"))
                continue
            for rid, ev in events:
                self._deliver(rid, ev)
