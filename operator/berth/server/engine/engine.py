"""The engine: a stepping thread around ``EngineCore`` (core.py) with an asyncio front.

``Engine`` runs ``EngineCore.step`` on a background thread and hands events to asyncio consumers
through ``loop.call_soon_threadsafe`` into per-request queues; admission (queue bounds, draining,
the request's checks) happens synchronously in the caller so errors surface before the first event.
A consumer that stops listening (its iterator closed, or its task cancelled) aborts its request:
``generate`` is the one place that does it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from berth.server.engine.core import EngineCore
from berth.server.engine.sequence import Sequence
from berth.server.engine.types import (
    EngineConfig,
    EngineDrainingError,
    EngineStats,
    GenerationRequest,
    LoadedModel,
    ModelInfo,
    QueueFullError,
    TokenEvent,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


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
            vocab_size=self._core.vocab_size,
            eos_token_ids=tuple(model.eos_token_ids),
            adapters=tuple(model.merged_adapters) + tuple(model.adapter_names),
            merged_adapters=tuple(model.merged_adapters),
            backend=model.backend,
            image_token_id=model.image_token_id,
            extra={
                "block_size": str(config.block_size),
                "num_blocks": str(self._core.bm.num_blocks),
                "max_num_seqs": str(config.max_num_seqs),
                "max_num_batched_tokens": str(config.max_num_batched_tokens),
                "prefix_caching": str(config.enable_prefix_caching).lower(),
                "weight_format": str(getattr(self._core.runner, "weight_format", "fp32")),
                "threads": str(self._core.threads),
            },
        )

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self._model.tokenizer

    @property
    def image_processor(self) -> Any:
        """The model's image processor (None for a text-only model)."""
        return self._model.image_processor

    @property
    def core(self) -> EngineCore:
        return self._core

    # ------------------------------------------------------------- lifecycle
    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="berth-engine", daemon=True)
        self._thread.start()
        if self.config.prepare_guided:
            # Structured outputs need the tokenizer's tables; build them now rather than in the
            # first such request (about a second for a 50k vocabulary).
            threading.Thread(
                target=self._core.guides.prepare, name="berth-guided-prepare", daemon=True
            ).start()

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
                for rid in core.request_ids():
                    core.abort(rid)
                    self._deliver(rid, RuntimeError(f"engine step failed: {e}"))
                continue
            for rid, ev in events:
                self._deliver(rid, ev)
