"""The serving layer: OpenAI / TGI protocol <-> engine.

It applies the model's chat template, tokenizes, turns request fields into ``SamplingParams``
(rejecting what the model or engine cannot do with a 400 that names the parameter), runs ``n``
choices as ``n`` engine requests with derived seeds, and turns ``TokenEvent`` streams into
responses or server-sent-event chunks, with usage, logprobs, metrics and the access-log fields.

Nothing here knows about HTTP beyond status codes: routes in ``app.py`` map it to FastAPI.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from berth.server import tool_calls
from berth.server.engine.types import (
    AdapterNotFoundError,
    EngineDrainingError,
    EngineStats,
    GenerationRequest,
    ModelInfo,
    QueueFullError,
    SamplingParams,
    TokenEvent,
)
from berth.server.metrics import ServerMetrics
from berth.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    TGIDetails,
    TGIGenerateRequest,
    TGIGenerateResponse,
    TGIInfo,
    TGIPrefillToken,
    TGIStreamDetails,
    TGIStreamResponse,
    TGIToken,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from berth.server.settings import ServerSettings

TGI_DEFAULT_MAX_NEW_TOKENS = 100
# Names clients send when they do not know the served name: huggingface_hub sends "dummy" (or "tgi").
_BASE_MODEL_ALIASES = frozenset({"tgi", "dummy"})


class ApiError(Exception):
    """An error with an HTTP status, rendered in OpenAI's (or TGI's) error shape by the routes."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers or {}


def bad_param(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_parameter")


class EngineLike(Protocol):
    """What serving needs from ``berth.server.engine.Engine``."""

    @property
    def tokenizer(self) -> Any: ...

    @property
    def model_info(self) -> ModelInfo: ...

    def generate(self, req: GenerationRequest) -> Any: ...

    def abort(self, request_id: str) -> None: ...

    def stats(self) -> EngineStats: ...


def _usage(ctx: RequestContext) -> Usage:
    return Usage(
        prompt_tokens=ctx.prompt_tokens,
        completion_tokens=ctx.completion_tokens,
        total_tokens=ctx.prompt_tokens + ctx.completion_tokens,
    )


@dataclass
class RequestContext:
    """Per-request facts for metrics and the access log (never the key itself)."""

    route: str
    key_id: str = "-"
    request_id: str = ""
    model: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    arrival: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    finish_reasons: list[str] = field(default_factory=list)
    prompt_text: str | None = None
    completion_text: str | None = None
    error: str | None = None

    def log_fields(self, log_content: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "request_id": self.request_id or None,
            "key_id": self.key_id,
            "model": self.model,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
        }
        if self.first_token_at is not None:
            out["ttft_ms"] = round((self.first_token_at - self.arrival) * 1000, 1)
        if self.finish_reasons:
            out["finish_reason"] = ",".join(self.finish_reasons)
        if self.error:
            out["error"] = self.error
        if log_content:
            out["prompt"] = self.prompt_text
            out["completion"] = self.completion_text
        return out


@dataclass
class _Gen:
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


@dataclass
class _Choice:
    """One choice's accumulated result (non-streaming)."""

    text: str
    finish_reason: str
    num_tokens: int
    events: list[TokenEvent]


def _sse(payload: str) -> str:
    return f"data: {payload}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class Serving:
    """Protocol <-> engine translation for one served model."""

    def __init__(self, engine: EngineLike, settings: ServerSettings, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self.info: ModelInfo = engine.model_info
        self.tokenizer = engine.tokenizer
        self.served_name = self.info.served_name
        self.created = int(time.time())
        template = getattr(self.tokenizer, "chat_template", None)
        if isinstance(template, dict):
            template = " ".join(str(v) for v in template.values())
        self._template: str | None = template if isinstance(template, str) else None
        self._special_ids: frozenset[int] = frozenset(
            list(getattr(self.tokenizer, "all_special_ids", []) or []) + list(self.info.eos_token_ids)
        )
        self._token_text_cache: dict[int, str] = {}

    # ------------------------------------------------------------------------------ models

    @property
    def supports_tools(self) -> bool:
        return self._template is not None and "tools" in self._template

    def model_list(self) -> ModelList:
        cards = [
            ModelCard(
                id=self.served_name,
                created=self.created,
                root=self.info.source,
                max_model_len=self.info.max_model_len,
            )
        ]
        for adapter in self.info.adapters:
            cards.append(
                ModelCard(
                    id=f"{self.served_name}:{adapter}",
                    created=self.created,
                    root=adapter,
                    parent=self.served_name,
                    max_model_len=self.info.max_model_len,
                )
            )
        return ModelList(data=cards)

    def resolve_model(self, name: str | None) -> str | None:
        """Map a request's ``model`` to an adapter name (None = base model); 404 if unknown."""
        if not name or name == self.served_name or name in _BASE_MODEL_ALIASES:
            return None
        base, sep, adapter = name.partition(":")
        if not (sep and base == self.served_name):
            adapter = name
        if adapter in self.info.merged_adapters:
            return None  # merged into the base weights at load
        if adapter in self.info.adapters:
            return adapter
        raise ApiError(
            404,
            f"The model {name!r} does not exist; this server serves {[c.id for c in self.model_list().data]}",
            param="model",
            code="model_not_found",
        )

    def tgi_info(self, version: str) -> TGIInfo:
        return TGIInfo(
            model_id=self.served_name,
            model_dtype=self.info.dtype,
            model_device_type=self.info.device.split(":")[0],
            max_concurrent_requests=self.settings.max_num_seqs + self.settings.max_queue,
            max_best_of=1,
            max_stop_sequences=self.settings.max_stop_sequences,
            max_input_tokens=max(1, self.info.max_model_len - 1),
            max_total_tokens=self.info.max_model_len,
            version=version,
        )

    # ------------------------------------------------------------------------ tokenization

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        return [int(i) for i in ids]

    def chat_prompt(self, req: ChatCompletionRequest) -> tuple[str, list[int]]:
        """Apply the model's chat template and tokenize; 400 for what a text-only model can't take."""
        if self._template is None:
            raise bad_param("messages", "this model has no chat template; use /v1/completions")
        if req.tools:
            if not self.supports_tools:
                raise bad_param("tools", f"the model {self.served_name!r} has no tool-calling chat template")
        elif req.tool_choice not in (None, "none", "auto"):
            raise bad_param("tool_choice", "tool_choice requires tools")
        if req.modalities and any(m != "text" for m in req.modalities):
            raise bad_param("modalities", f"the model {self.served_name!r} only produces text")
        if req.audio is not None:
            raise bad_param("audio", f"the model {self.served_name!r} only produces text")
        messages: list[dict[str, Any]] = []
        for i, msg in enumerate(req.messages):
            if isinstance(msg.content, list):
                texts: list[str] = []
                for j, part in enumerate(msg.content):
                    if part.type != "text" or part.text is None:
                        raise bad_param(
                            f"messages[{i}].content[{j}]",
                            f"content parts of type {part.type!r} are not supported: "
                            f"the model {self.served_name!r} is text-only",
                        )
                    texts.append(part.text)
                content: str | None = "".join(texts)
            else:
                content = msg.content
            entry: dict[str, Any] = {
                "role": "system" if msg.role == "developer" else msg.role,
                "content": content if content is not None else "",
            }
            if msg.name is not None:
                entry["name"] = msg.name
            if msg.tool_calls is not None:
                entry["tool_calls"] = tool_calls.arguments_for_template(msg.tool_calls)
            if msg.tool_call_id is not None:
                entry["tool_call_id"] = msg.tool_call_id
            messages.append(entry)
        kwargs: dict[str, Any] = {"tokenize": False, "add_generation_prompt": True}
        if req.tools:
            kwargs["tools"] = req.tools
        try:
            text = self.tokenizer.apply_chat_template(messages, **kwargs)
        except Exception as exc:  # jinja raise_exception() in templates: e.g. roles out of order
            raise bad_param("messages", f"the chat template rejected the messages: {exc}") from exc
        return str(text), self._encode(str(text), add_special_tokens=False)

    def token_text(self, token_id: int) -> str:
        text = self._token_text_cache.get(token_id)
        if text is None:
            text = str(self.tokenizer.decode([token_id]))
            if len(self._token_text_cache) < 200_000:
                self._token_text_cache[token_id] = text
        return text

    # -------------------------------------------------------------------- sampling params

    def _max_tokens(self, requested: int | None, prompt_len: int, prompt_param: str) -> int:
        limit = self.info.max_model_len
        if prompt_len >= limit:
            raise bad_param(
                prompt_param,
                f"This model's maximum context length is {limit} tokens; the prompt has {prompt_len} tokens",
            )
        room = limit - prompt_len
        if requested is None:
            return room
        if requested > room:
            raise bad_param(
                "max_tokens",
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} for the completion)",
            )
        return requested

    def _common_checks(self, req: ChatCompletionRequest | CompletionRequest) -> list[str]:
        if req.n > self.settings.max_n:
            raise bad_param("n", f"n must be at most {self.settings.max_n}, got {req.n}")
        if req.best_of is not None and req.best_of != req.n:
            raise bad_param("best_of", "best_of other than n is not supported")
        if req.logit_bias:
            raise bad_param("logit_bias", "logit_bias is not supported")
        if req.response_format is not None and req.response_format.type == "json_schema":
            raise bad_param(
                "response_format", "response_format json_schema is not supported; use {'type': 'json_object'}"
            )
        stops = [s for s in req.stop_list() if s]
        if len(stops) > self.settings.max_stop_sequences:
            raise bad_param("stop", f"at most {self.settings.max_stop_sequences} stop sequences are allowed")
        return stops

    def _openai_params(
        self,
        req: ChatCompletionRequest | CompletionRequest,
        stops: list[str],
        max_tokens: int,
        logprobs: int | None,
    ) -> SamplingParams:
        temperature = 1.0 if req.temperature is None else req.temperature
        top_p = 1.0 if req.top_p is None else req.top_p
        if top_p == 0.0:  # "only the most likely token": greedy
            temperature, top_p = 0.0, 1.0
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=req.top_k or 0,
            seed=req.seed,
            stop=tuple(stops),
            ignore_eos=req.ignore_eos,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            logprobs=logprobs,
            json_mode=req.response_format is not None and req.response_format.type == "json_object",
        )
        self._validate(params)
        return params

    @staticmethod
    def _validate(params: SamplingParams) -> None:
        try:
            params.validate()
        except ValueError as exc:
            message = str(exc)
            raise bad_param(message.split(" ", 1)[0], message) from exc

    @staticmethod
    def _derive(params: SamplingParams, index: int) -> SamplingParams:
        """The params of choice ``index``: same, with seed + index so choices differ but reproduce."""
        if params.seed is None or index == 0:
            return params
        return SamplingParams(**{**params.__dict__, "seed": (params.seed + index) % (1 << 63)})

    # ------------------------------------------------------------------------- engine I/O

    async def _open_one(self, index: int, greq: GenerationRequest) -> _Gen:
        it: Any = self.engine.generate(greq)
        if inspect.isawaitable(it):
            it = await it
        try:
            first: TokenEvent | None = await it.__anext__()
        except StopAsyncIteration:
            first = None
        return _Gen(index=index, request=greq, iterator=it, first=first, done=first is None)

    async def _open(
        self, greqs: Sequence[GenerationRequest], ctx: RequestContext, prompt_param: str
    ) -> list[_Gen]:
        """Submit all engine requests; return once each has its first event, or raise ApiError."""
        results = await asyncio.gather(
            *(self._open_one(i, r) for i, r in enumerate(greqs)), return_exceptions=True
        )
        gens = [r for r in results if isinstance(r, _Gen)]
        errors = [r for r in results if not isinstance(r, _Gen)]
        if errors:
            for g in gens:
                await self._close(g)
            exc = errors[0]
            if isinstance(exc, asyncio.CancelledError):
                raise exc
            raise self._engine_error(exc, prompt_param) from exc
        now = time.monotonic()
        ctx.first_token_at = now
        if ctx.route != "warmup":
            self.metrics.time_to_first_token.observe(now - ctx.arrival)
        return gens

    def _engine_error(self, exc: BaseException, prompt_param: str) -> ApiError:
        if isinstance(exc, QueueFullError):
            retry = max(1, round(exc.retry_after))
            return ApiError(
                429,
                f"The server is at capacity: {exc}. Retry after {retry} s.",
                type_="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(retry)},
            )
        if isinstance(exc, EngineDrainingError):
            return ApiError(
                503,
                "The server is shutting down and no longer accepts requests",
                type_="service_unavailable",
                code="draining",
                headers={"Retry-After": "1"},
            )
        if isinstance(exc, AdapterNotFoundError):
            return ApiError(404, str(exc), param="model", code="model_not_found")
        if isinstance(exc, ValueError):
            return bad_param(prompt_param, str(exc))
        return ApiError(500, f"generation failed: {exc}", type_="server_error", code="internal_error")

    async def _close(self, g: _Gen) -> None:
        if not g.done:
            g.done = True
            with contextlib.suppress(Exception):
                self.engine.abort(g.request.request_id)
        aclose = getattr(g.iterator, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await aclose()

    async def _events(self, g: _Gen) -> AsyncIterator[TokenEvent]:
        first = g.first
        if first is not None:
            g.first = None
            yield first
        if g.done:
            return
        async for event in g.iterator:
            yield event
            if event.finish_reason is not None:
                break

    async def _merged(self, gens: list[_Gen], ctx: RequestContext) -> AsyncIterator[tuple[_Gen, TokenEvent]]:
        """Events of all engine requests as they come, as ApiErrors when generation fails or is cut off."""
        try:
            async for item in self._merged_events(gens, ctx):
                if item[1].finish_reason == "abort":
                    raise ApiError(
                        503,
                        "the generation was stopped before it finished (the server is shutting down)",
                        type_="server_error",
                        code="aborted",
                        headers={"Retry-After": "1"},
                    )
                yield item
        except ApiError:
            raise
        except Exception as exc:
            raise ApiError(
                500, f"generation failed: {exc}", type_="server_error", code="internal_error"
            ) from exc

    async def _merged_events(
        self, gens: list[_Gen], ctx: RequestContext
    ) -> AsyncIterator[tuple[_Gen, TokenEvent]]:
        """Events of all engine requests as they come; tracks counts and inter-token latency."""
        last_at: dict[int, float] = {}

        def account(g: _Gen, event: TokenEvent) -> None:
            now = time.monotonic()
            if event.token_id is not None:
                if g.index in last_at and ctx.route != "warmup":
                    self.metrics.inter_token_latency.observe(now - last_at[g.index])
                last_at[g.index] = now
                g.num_tokens = max(g.num_tokens + 1, event.num_generated_tokens)
                g.last_token_id = event.token_id
            elif event.num_generated_tokens:
                g.num_tokens = max(g.num_tokens, event.num_generated_tokens)
            g.text += event.text
            if event.finish_reason is not None:
                g.finish_reason = event.finish_reason
                g.done = True
            ctx.completion_tokens = sum(x.num_tokens for x in gens)

        if len(gens) == 1:
            g = gens[0]
            try:
                async for event in self._events(g):
                    account(g, event)
                    yield g, event
            finally:
                await self._close(g)
            return

        queue: asyncio.Queue[tuple[_Gen, TokenEvent | None, BaseException | None]] = asyncio.Queue()

        async def pump(g: _Gen) -> None:
            try:
                async for event in self._events(g):
                    await queue.put((g, event, None))
                await queue.put((g, None, None))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                await queue.put((g, None, exc))

        tasks = [asyncio.create_task(pump(g)) for g in gens]
        try:
            remaining = len(tasks)
            while remaining:
                gen, maybe_event, error = await queue.get()
                if error is not None:
                    raise error
                if maybe_event is None:
                    remaining -= 1
                    continue
                account(gen, maybe_event)
                yield gen, maybe_event
        finally:
            for task in tasks:
                task.cancel()
            for g in gens:
                await self._close(g)

    def _finish(self, ctx: RequestContext, gens: list[_Gen]) -> None:
        """Account a finished (or abandoned) generation request."""
        ctx.completion_tokens = sum(g.num_tokens for g in gens)
        ctx.finish_reasons = [g.finish_reason or "abort" for g in gens]
        if self.settings.log_content:
            ctx.completion_text = json.dumps([g.text for g in gens], ensure_ascii=False)
        model = ctx.model or self.served_name
        self.metrics.prompt_tokens.labels(ctx.key_id, model).inc(ctx.prompt_tokens)
        self.metrics.generation_tokens.labels(ctx.key_id, model).inc(ctx.completion_tokens)
        self.metrics.e2e_latency.labels(ctx.route).observe(time.monotonic() - ctx.arrival)

    async def _collect(self, gens: list[_Gen], ctx: RequestContext, keep_events: bool) -> None:
        try:
            async for g, event in self._merged(gens, ctx):
                if keep_events and event.token_id is not None:
                    g.events.append(event)
        finally:
            self._finish(ctx, gens)

    # ------------------------------------------------------------------------- logprobs

    def _token_bytes(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def _chat_logprobs(self, events: list[TokenEvent], k: int) -> ChoiceLogprobs:
        content = []
        for ev in events:
            if ev.token_id is None or ev.logprob is None:
                continue
            text = self.token_text(ev.token_id)
            tops = [
                TopLogprob(token=t, logprob=lp, bytes=self._token_bytes(t))
                for t, lp in (ev.top_logprobs or [])[:k]
            ]
            content.append(
                TokenLogprob(token=text, logprob=ev.logprob, bytes=self._token_bytes(text), top_logprobs=tops)
            )
        return ChoiceLogprobs(content=content)

    def _completion_logprobs(self, events: list[TokenEvent], k: int, offset: int) -> CompletionLogprobs:
        out = CompletionLogprobs()
        for ev in events:
            if ev.token_id is None:
                continue
            text = self.token_text(ev.token_id)
            out.tokens.append(text)
            out.token_logprobs.append(ev.logprob)
            out.top_logprobs.append(dict((ev.top_logprobs or [])[:k]) if k > 0 else None)
            out.text_offset.append(offset)
            offset += len(text)
        return out

    # ---------------------------------------------------------------- OpenAI: chat completions

    async def chat(
        self, req: ChatCompletionRequest, ctx: RequestContext
    ) -> ChatCompletionResponse | AsyncIterator[str]:
        adapter = self.resolve_model(req.model)
        ctx.model = req.model or self.served_name
        stops = self._common_checks(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_param("top_logprobs", "top_logprobs requires logprobs=true")
        prompt_text, prompt_ids = self.chat_prompt(req)
        ctx.prompt_tokens = len(prompt_ids)
        if self.settings.log_content:
            ctx.prompt_text = prompt_text
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens = self._max_tokens(requested, len(prompt_ids), "messages")
        k = req.top_logprobs or 0
        params = self._openai_params(req, stops, max_tokens, k if req.logprobs else None)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        ctx.request_id = rid
        greqs = [
            GenerationRequest(f"{rid}-{i}", prompt_ids, self._derive(params, i), adapter)
            for i in range(req.n)
        ]
        gens = await self._open(greqs, ctx, "messages")
        model_name = ctx.model
        find_calls = bool(req.tools) and req.tool_choice != "none"
        if req.stream:
            include_usage = req.stream_options is not None and req.stream_options.include_usage
            return self._chat_stream(gens, ctx, rid, model_name, include_usage, req.logprobs, k, find_calls)
        await self._collect(gens, ctx, keep_events=req.logprobs)
        choices = []
        for g in gens:
            content, calls = tool_calls.parse(g.text) if find_calls else (g.text, [])
            choices.append(
                ChatChoice(
                    index=g.index,
                    message=AssistantMessage(content=content, tool_calls=[c.openai() for c in calls] or None),
                    logprobs=self._chat_logprobs(g.events, k) if req.logprobs else None,
                    finish_reason="tool_calls" if calls else _openai_finish(g.finish_reason),
                )
            )
        return ChatCompletionResponse(
            id=rid,
            model=model_name,
            choices=choices,
            usage=_usage(ctx),
        )

    async def _chat_stream(
        self,
        gens: list[_Gen],
        ctx: RequestContext,
        rid: str,
        model: str,
        include_usage: bool,
        logprobs: bool,
        k: int,
        find_calls: bool = False,
    ) -> AsyncIterator[str]:
        created = int(time.time())
        exclude = None if include_usage else {"usage"}
        splitters = {g.index: tool_calls.StreamSplitter() for g in gens} if find_calls else {}

        def chunk(choices: list[ChatChunkChoice]) -> str:
            body = ChatCompletionChunk(id=rid, created=created, model=model, choices=choices)
            return _sse(body.model_dump_json(exclude=exclude))

        try:
            for g in gens:
                yield chunk([ChatChunkChoice(index=g.index, delta=ChatDelta(role="assistant", content=""))])
            async for g, event in self._merged(gens, ctx):
                text, finish = event.text, _openai_finish(event.finish_reason)
                calls: list[tool_calls.ToolCall] = []
                splitter = splitters.get(g.index)
                if splitter is not None:
                    text = splitter.feed(text)
                    if finish is not None:
                        rest, calls = splitter.finish()
                        text += rest
                if not text and finish is None and not logprobs:
                    continue
                lp = self._chat_logprobs([event], k) if logprobs and event.token_id is not None else None
                if calls:  # content first (if any), then the calls with finish_reason tool_calls
                    if text or lp is not None:
                        yield chunk(
                            [ChatChunkChoice(index=g.index, delta=ChatDelta(content=text), logprobs=lp)]
                        )
                    delta = ChatDelta(tool_calls=[c.openai(i) for i, c in enumerate(calls)])
                    yield chunk([ChatChunkChoice(index=g.index, delta=delta, finish_reason="tool_calls")])
                    continue
                yield chunk(
                    [
                        ChatChunkChoice(
                            index=g.index, delta=ChatDelta(content=text), logprobs=lp, finish_reason=finish
                        )
                    ]
                )
            if include_usage:
                usage = _usage(ctx)
                final = ChatCompletionChunk(id=rid, created=created, model=model, choices=[], usage=usage)
                yield _sse(final.model_dump_json())
            yield SSE_DONE
        finally:
            self._finish(ctx, gens)

    # ------------------------------------------------------------------ OpenAI: completions

    def _completion_prompts(self, req: CompletionRequest) -> list[tuple[str, list[int]]]:
        prompt = req.prompt
        if isinstance(prompt, str):
            items: list[str | list[int]] = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            items = [[int(p) for p in prompt]]  # type: ignore[arg-type]
        else:
            items = list(prompt)  # type: ignore[arg-type]
        if not items:
            raise bad_param("prompt", "prompt must not be empty")
        out: list[tuple[str, list[int]]] = []
        vocab = self.info.vocab_size
        for item in items:
            if isinstance(item, str):
                ids = self._encode(item, add_special_tokens=True)
                out.append((item, ids))
            else:
                if any(not 0 <= t < vocab for t in item):
                    raise bad_param("prompt", f"prompt token ids must be in [0, {vocab})")
                out.append((str(self.tokenizer.decode(item)), list(item)))
            if not out[-1][1]:
                raise bad_param("prompt", "prompt must not be empty")
        return out

    async def completion(
        self, req: CompletionRequest, ctx: RequestContext
    ) -> CompletionResponse | AsyncIterator[str]:
        adapter = self.resolve_model(req.model)
        ctx.model = req.model or self.served_name
        stops = self._common_checks(req)
        if req.suffix:
            raise bad_param("suffix", "suffix is not supported")
        if req.echo and req.logprobs is not None:
            raise bad_param("echo", "echo together with logprobs (prompt logprobs) is not supported")
        prompts = self._completion_prompts(req)
        if len(prompts) * req.n > self.settings.max_n:
            raise bad_param("prompt", f"at most {self.settings.max_n} completions (prompts x n) per request")
        ctx.prompt_tokens = sum(len(ids) for _, ids in prompts)
        if self.settings.log_content:
            ctx.prompt_text = json.dumps([p for p, _ in prompts], ensure_ascii=False)
        rid = f"cmpl-{uuid.uuid4().hex}"
        ctx.request_id = rid
        k = req.logprobs or 0
        greqs: list[GenerationRequest] = []
        for p, (_, ids) in enumerate(prompts):
            max_tokens = self._max_tokens(req.max_tokens, len(ids), "prompt")
            params = self._openai_params(req, stops, max_tokens, req.logprobs)
            for j in range(req.n):
                index = p * req.n + j
                greqs.append(GenerationRequest(f"{rid}-{index}", ids, self._derive(params, j), adapter))
        gens = await self._open(greqs, ctx, "prompt")
        prefixes = [prompts[g.index // req.n][0] if req.echo else "" for g in gens]
        if req.stream:
            include_usage = req.stream_options is not None and req.stream_options.include_usage
            return self._completion_stream(gens, ctx, rid, ctx.model, include_usage, req.logprobs, prefixes)
        await self._collect(gens, ctx, keep_events=req.logprobs is not None)
        choices = [
            CompletionChoice(
                index=g.index,
                text=prefix + g.text,
                logprobs=self._completion_logprobs(g.events, k, len(prefix))
                if req.logprobs is not None
                else None,
                finish_reason=_openai_finish(g.finish_reason),
            )
            for g, prefix in zip(gens, prefixes, strict=True)
        ]
        return CompletionResponse(
            id=rid,
            model=ctx.model,
            choices=choices,
            usage=_usage(ctx),
        )

    async def _completion_stream(
        self,
        gens: list[_Gen],
        ctx: RequestContext,
        rid: str,
        model: str,
        include_usage: bool,
        logprobs: int | None,
        prefixes: list[str],
    ) -> AsyncIterator[str]:
        created = int(time.time())
        exclude = None if include_usage else {"usage"}
        offsets = {g.index: len(prefix) for g, prefix in zip(gens, prefixes, strict=True)}

        def chunk(choice: CompletionChoice) -> str:
            body = CompletionResponse(id=rid, created=created, model=model, choices=[choice])
            return _sse(body.model_dump_json(exclude=exclude))

        try:
            for g, prefix in zip(gens, prefixes, strict=True):
                if prefix:
                    yield chunk(CompletionChoice(index=g.index, text=prefix))
            async for g, event in self._merged(gens, ctx):
                if not event.text and event.finish_reason is None and logprobs is None:
                    continue
                lp = None
                if logprobs is not None and event.token_id is not None:
                    lp = self._completion_logprobs([event], logprobs, offsets[g.index])
                    offsets[g.index] += len(lp.tokens[0]) if lp.tokens else 0
                yield chunk(
                    CompletionChoice(
                        index=g.index,
                        text=event.text,
                        logprobs=lp,
                        finish_reason=_openai_finish(event.finish_reason),
                    )
                )
            if include_usage:
                usage = _usage(ctx)
                yield _sse(
                    CompletionResponse(
                        id=rid, created=created, model=model, choices=[], usage=usage
                    ).model_dump_json()
                )
            yield SSE_DONE
        finally:
            self._finish(ctx, gens)

    # ------------------------------------------------------------------------------ TGI

    def _tgi_request(self, req: TGIGenerateRequest, ctx: RequestContext, stream: bool) -> GenerationRequest:
        p = req.parameters
        adapter = self.resolve_model(p.adapter_id) if p.adapter_id else None
        ctx.model = f"{self.served_name}:{adapter}" if adapter else self.served_name
        if p.best_of is not None and p.best_of > 1:
            raise bad_param("best_of", "best_of > 1 is not supported")
        if p.typical_p is not None and p.typical_p < 1.0:
            raise bad_param("typical_p", "typical_p is not supported")
        if p.watermark:
            raise bad_param("watermark", "watermark is not supported")
        json_mode = False
        if p.grammar is not None:
            if p.grammar.type == "regex":
                raise bad_param("grammar", "regex grammars are not supported; use type 'json'")
            json_mode = True
        stops = [s for s in (p.stop or []) if s]
        if len(stops) > self.settings.max_stop_sequences:
            raise bad_param("stop", f"at most {self.settings.max_stop_sequences} stop sequences are allowed")
        if not req.inputs:
            raise bad_param("inputs", "inputs must not be empty")
        ids = self._encode(req.inputs, add_special_tokens=True)
        if p.truncate is not None and len(ids) > p.truncate:
            ids = ids[-p.truncate :]
        ctx.prompt_tokens = len(ids)
        if self.settings.log_content:
            ctx.prompt_text = req.inputs
        sampling = p.do_sample or any(
            (p.temperature not in (None, 1.0), p.top_k is not None, p.top_p not in (None, 1.0))
        )
        requested = (
            p.max_new_tokens
            if p.max_new_tokens is not None
            else min(TGI_DEFAULT_MAX_NEW_TOKENS, max(1, self.info.max_model_len - len(ids)))
        )
        max_tokens = self._max_tokens(requested, len(ids), "inputs")
        seed = p.seed
        if sampling and seed is None:
            seed = secrets.randbits(63)  # reported back in details.seed, so the sample can be redone
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=(p.temperature if p.temperature is not None else 1.0) if sampling else 0.0,
            top_p=p.top_p if p.top_p is not None else 1.0,
            top_k=p.top_k or 0,
            seed=seed,
            stop=tuple(stops),
            frequency_penalty=p.frequency_penalty or 0.0,
            repetition_penalty=p.repetition_penalty if p.repetition_penalty is not None else 1.0,
            logprobs=(p.top_n_tokens or 0) if (p.details or stream) else None,
            json_mode=json_mode,
        )
        self._validate(params)
        rid = f"gen-{uuid.uuid4().hex}"
        ctx.request_id = rid
        return GenerationRequest(rid, ids, params, adapter)

    def _tgi_finish(self, g: _Gen) -> str:
        if g.finish_reason == "length":
            return "length"
        if g.last_token_id is not None and g.last_token_id in self.info.eos_token_ids:
            return "eos_token"
        return "stop_sequence" if g.finish_reason == "stop" else "length"

    def _tgi_token(self, event: TokenEvent, text: str) -> TGIToken:
        tid = event.token_id if event.token_id is not None else 0
        return TGIToken(id=tid, text=text, logprob=event.logprob, special=tid in self._special_ids)

    async def tgi_generate(self, req: TGIGenerateRequest, ctx: RequestContext) -> TGIGenerateResponse:
        greq = self._tgi_request(req, ctx, stream=False)
        p = req.parameters
        gens = await self._open([greq], ctx, "inputs")
        await self._collect(gens, ctx, keep_events=p.details)
        g = gens[0]
        text = (req.inputs + g.text) if p.return_full_text else g.text
        details = None
        if p.details:
            k = p.top_n_tokens or 0
            prefill = []
            if p.decoder_input_details:
                prefill = [TGIPrefillToken(id=t, text=self.token_text(t)) for t in greq.prompt_token_ids]
            details = TGIDetails(
                finish_reason=self._tgi_finish(g),  # type: ignore[arg-type]
                generated_tokens=g.num_tokens,
                seed=greq.params.seed,
                prefill=prefill,
                tokens=[self._tgi_token(ev, self.token_text(ev.token_id or 0)) for ev in g.events],
                top_tokens=[
                    [TGIToken(id=0, text=t, logprob=lp) for t, lp in (ev.top_logprobs or [])[:k]]
                    for ev in g.events
                ]
                if k
                else [],
            )
        return TGIGenerateResponse(generated_text=text, details=details)

    async def tgi_generate_stream(self, req: TGIGenerateRequest, ctx: RequestContext) -> AsyncIterator[str]:
        greq = self._tgi_request(req, ctx, stream=True)
        gens = await self._open([greq], ctx, "inputs")
        return self._tgi_stream(req, greq, gens, ctx)

    async def _tgi_stream(
        self, req: TGIGenerateRequest, greq: GenerationRequest, gens: list[_Gen], ctx: RequestContext
    ) -> AsyncIterator[str]:
        k = req.parameters.top_n_tokens or 0
        index = 0
        try:
            async for g, event in self._merged(gens, ctx):
                if event.token_id is None and event.finish_reason is None:
                    continue
                index += 1
                out = TGIStreamResponse(index=index, token=self._tgi_token(event, event.text))
                if k:
                    out.top_tokens = [
                        TGIToken(id=0, text=t, logprob=lp) for t, lp in (event.top_logprobs or [])[:k]
                    ]
                if event.finish_reason is not None:
                    out.generated_text = (req.inputs + g.text) if req.parameters.return_full_text else g.text
                    out.details = TGIStreamDetails(
                        finish_reason=self._tgi_finish(g),  # type: ignore[arg-type]
                        generated_tokens=g.num_tokens,
                        seed=greq.params.seed,
                        input_length=len(greq.prompt_token_ids),
                    )
                yield _sse(out.model_dump_json())
        finally:
            self._finish(ctx, gens)

    # ---------------------------------------------------------------------------- warm-up

    async def warm_up(self) -> str:
        """Run one short greedy generation through the whole engine; return its text."""
        ids = self._encode("Hello", add_special_tokens=True)
        greq = GenerationRequest(
            f"warmup-{uuid.uuid4().hex[:8]}", ids, SamplingParams(max_tokens=2, temperature=0.0)
        )
        ctx = RequestContext(route="warmup")
        gens = await self._open([greq], ctx, "prompt")
        async for _ in self._merged(gens, ctx):
            pass
        return gens[0].text


def _openai_finish(reason: str | None) -> str | None:
    if reason is None:
        return None
    return "length" if reason == "length" else "stop"
