"""The engine stream of one API request: its engine requests (``n`` choices, or prompts x ``n``),
their events merged as they come, the token counts, and the accounting when it ends.

Closing is done in one place, ``Generation.close``: it closes the engine's event iterator, and the
engine aborts a request whose iterator is closed (or whose consumer is cancelled) before it finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from berth.server.engine.types import EngineStats, GenerationRequest, ModelInfo, TokenEvent
from berth.server.metrics import ServerMetrics
from berth.server.serving import errors
from berth.server.serving.context import RequestContext


class EngineLike(Protocol):
    """What serving needs from ``berth.server.engine.Engine``."""

    @property
    def tokenizer(self) -> Any: ...

    @property
    def model_info(self) -> ModelInfo: ...

    def generate(self, req: GenerationRequest) -> Any: ...

    def stats(self) -> EngineStats: ...


@dataclass
class Generation:
    """One engine request: a choice of an OpenAI request, or a TGI generation."""

    index: int
    request: GenerationRequest
    iterator: AsyncIterator[TokenEvent]
    first: TokenEvent | None
    done: bool = False
    text: str = ""
    num_tokens: int = 0
    finish_reason: str | None = None
    last_token_id: int | None = None
    events: list[TokenEvent] = field(default_factory=list)
    cached_prompt_tokens: int = 0

    async def events_from_engine(self) -> AsyncIterator[TokenEvent]:
        first = self.first
        if first is not None:
            self.first = None
            yield first
        if self.done:
            return
        async for event in self.iterator:
            yield event
            if event.finish_reason is not None:
                break

    def account(self, event: TokenEvent) -> None:
        if event.token_id is not None:
            self.num_tokens = max(self.num_tokens + 1, event.num_generated_tokens)
            self.last_token_id = event.token_id
        elif event.num_generated_tokens:
            self.num_tokens = max(self.num_tokens, event.num_generated_tokens)
        self.text += event.text
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason
            self.cached_prompt_tokens = event.num_cached_prompt_tokens
            self.done = True

    async def close(self) -> None:
        """Close the engine's iterator: the one place a request that did not finish is given up."""
        self.done = True
        aclose = getattr(self.iterator, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await aclose()


async def _open_one(engine: EngineLike, index: int, greq: GenerationRequest) -> Generation:
    it: Any = engine.generate(greq)
    if inspect.isawaitable(it):
        it = await it
    try:
        first: TokenEvent | None = await it.__anext__()
    except StopAsyncIteration:
        first = None
    return Generation(index=index, request=greq, iterator=it, first=first, done=first is None)


class Generations:
    """The engine requests of one API request, from their first event to their accounting."""

    def __init__(
        self, gens: list[Generation], ctx: RequestContext, metrics: ServerMetrics, log_content: bool
    ) -> None:
        self.gens = gens
        self.ctx = ctx
        self.metrics = metrics
        self.log_content = log_content

    def __iter__(self) -> Any:
        return iter(self.gens)

    def __getitem__(self, i: int) -> Generation:
        return self.gens[i]

    @classmethod
    async def open(
        cls,
        engine: EngineLike,
        greqs: Sequence[GenerationRequest],
        ctx: RequestContext,
        metrics: ServerMetrics,
        prompt_param: str,
        log_content: bool = False,
    ) -> Generations:
        """Submit all engine requests; return once each has its first event, or raise ApiError."""
        results = await asyncio.gather(
            *(_open_one(engine, i, r) for i, r in enumerate(greqs)), return_exceptions=True
        )
        gens = [r for r in results if isinstance(r, Generation)]
        failures = [r for r in results if not isinstance(r, Generation)]
        if failures:
            for g in gens:
                await g.close()
            exc = failures[0]
            if isinstance(exc, asyncio.CancelledError):
                raise exc
            raise errors.from_engine(exc, prompt_param) from exc
        now = time.monotonic()
        ctx.first_token_at = now
        if not ctx.is_warmup:
            metrics.time_to_first_token.observe(now - ctx.arrival)
        return cls(gens, ctx, metrics, log_content)

    async def events(self) -> AsyncIterator[tuple[Generation, TokenEvent]]:
        """Events of all engine requests as they come; ApiErrors when generation fails or is cut off."""
        try:
            merged = self._merged()
            async with contextlib.aclosing(merged):
                async for item in merged:
                    if item[1].finish_reason == "abort":
                        raise errors.aborted()
                    yield item
        except errors.ApiError:
            raise
        except Exception as exc:
            raise errors.internal(exc) from exc

    async def _merged(self) -> AsyncGenerator[tuple[Generation, TokenEvent]]:
        last_at: dict[int, float] = {}

        def account(g: Generation, event: TokenEvent) -> None:
            if event.token_id is not None:
                now = time.monotonic()
                if g.index in last_at and not self.ctx.is_warmup:
                    self.metrics.inter_token_latency.observe(now - last_at[g.index])
                last_at[g.index] = now
            g.account(event)
            self.ctx.completion_tokens = sum(x.num_tokens for x in self.gens)

        source = self._single() if len(self.gens) == 1 else self._interleaved()
        async with contextlib.aclosing(source):
            async for g, event in source:
                account(g, event)
                yield g, event

    async def _single(self) -> AsyncGenerator[tuple[Generation, TokenEvent]]:
        g = self.gens[0]
        try:
            async for event in g.events_from_engine():
                yield g, event
        finally:
            await g.close()

    async def _interleaved(self) -> AsyncGenerator[tuple[Generation, TokenEvent]]:
        """The events of several engine requests in arrival order (one pump task each)."""
        queue: asyncio.Queue[tuple[Generation, TokenEvent | None, BaseException | None]] = asyncio.Queue()

        async def pump(g: Generation) -> None:
            try:
                async for event in g.events_from_engine():
                    await queue.put((g, event, None))
                await queue.put((g, None, None))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                await queue.put((g, None, exc))

        tasks = [asyncio.create_task(pump(g)) for g in self.gens]
        try:
            remaining = len(tasks)
            while remaining:
                gen, maybe_event, error = await queue.get()
                if error is not None:
                    raise error
                if maybe_event is None:
                    remaining -= 1
                    continue
                yield gen, maybe_event
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for g in self.gens:
                await g.close()

    def finish(self) -> None:
        """Account a finished (or abandoned) request: token counters, latency, the access-log fields."""
        ctx = self.ctx
        ctx.completion_tokens = sum(g.num_tokens for g in self.gens)
        ctx.finish_reasons = [g.finish_reason or "abort" for g in self.gens]
        if self.log_content:
            ctx.completion_text = json.dumps([g.text for g in self.gens], ensure_ascii=False)
        model = ctx.model or ""
        self.metrics.prompt_tokens.labels(ctx.key_id, model).inc(ctx.prompt_tokens)
        self.metrics.generation_tokens.labels(ctx.key_id, model).inc(ctx.completion_tokens)
        self.metrics.e2e_latency.labels(ctx.route).observe(time.monotonic() - ctx.arrival)
        if ctx.images:
            cached = sum(g.cached_prompt_tokens for g in self.gens)
            self.metrics.image_cached_prompt_tokens.labels(model).inc(cached)

    async def collect(self, keep_events: bool) -> None:
        """Run every engine request to its end (non-streamed answers)."""
        try:
            async for g, event in self.events():
                if keep_events and event.token_id is not None:
                    g.events.append(event)
        finally:
            self.finish()
