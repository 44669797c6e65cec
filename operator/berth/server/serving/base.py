"""The shared base of the protocol modules: the served model (names, tokenizer, limits), the checks
every protocol makes on sampling parameters, logprob formatting, and the warm-up generation."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from berth.server.engine.types import GenerationRequest, ModelInfo, ParamError, SamplingParams
from berth.server.metrics import ServerMetrics
from berth.server.protocol import ModelCard, ModelList
from berth.server.serving.context import RequestContext
from berth.server.serving.errors import ApiError, bad_param
from berth.server.serving.stream import EngineLike, Generations
from berth.server.settings import ServerSettings

# Names clients send when they do not know the served name: huggingface_hub sends "dummy" (or "tgi").
_BASE_MODEL_ALIASES = frozenset({"tgi", "dummy"})
_TOKEN_TEXT_CACHE_MAX = 200_000


class ServedModel:
    """One served model: its engine, tokenizer and limits, and the names clients may call it by."""

    def __init__(self, engine: EngineLike, settings: ServerSettings, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self.info: ModelInfo = engine.model_info
        self.tokenizer = engine.tokenizer
        self.served_name = self.info.served_name
        self.created = int(time.time())
        self.special_ids: frozenset[int] = frozenset(
            list(getattr(self.tokenizer, "all_special_ids", []) or []) + list(self.info.eos_token_ids)
        )
        self._token_text_cache: dict[int, str] = {}

    # ------------------------------------------------------------------------------ names

    def model_list(self) -> ModelList:
        cards = [
            ModelCard(
                id=self.served_name,
                created=self.created,
                root=self.info.source,
                max_model_len=self.info.max_model_len,
                backend=self.info.backend,
            )
        ]
        cards += [
            ModelCard(
                id=f"{self.served_name}:{adapter}",
                created=self.created,
                root=adapter,
                parent=self.served_name,
                max_model_len=self.info.max_model_len,
                backend=self.info.backend,
            )
            for adapter in self.info.adapters
        ]
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

    # ----------------------------------------------------------------------- tokenization

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        return [int(i) for i in ids]

    def token_text(self, token_id: int) -> str:
        text = self._token_text_cache.get(token_id)
        if text is None:
            text = str(self.tokenizer.decode([token_id]))
            if len(self._token_text_cache) < _TOKEN_TEXT_CACHE_MAX:
                self._token_text_cache[token_id] = text
        return text

    # ---------------------------------------------------------------------------- limits

    def max_tokens(self, requested: int | None, prompt_len: int, prompt_param: str) -> int:
        """``requested`` checked against the context (the room left when None)."""
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

    def check_stops(self, stops: Sequence[str]) -> list[str]:
        out = [s for s in stops if s]
        if len(out) > self.settings.max_stop_sequences:
            raise bad_param("stop", f"at most {self.settings.max_stop_sequences} stop sequences are allowed")
        return out

    async def open(
        self, greqs: Sequence[GenerationRequest], ctx: RequestContext, prompt_param: str
    ) -> Generations:
        """Submit the engine requests of one API request (see ``Generations.open``)."""
        return await Generations.open(
            self.engine, greqs, ctx, self.metrics, prompt_param, self.settings.log_content
        )

    async def warm_up(self) -> str:
        """Run one short greedy generation through the whole engine; return its text."""
        ids = self.encode("Hello", add_special_tokens=True)
        greq = GenerationRequest(
            f"warmup-{uuid.uuid4().hex[:8]}", ids, SamplingParams(max_tokens=2, temperature=0.0)
        )
        gens = await self.open([greq], RequestContext(route="warmup"), "prompt")
        async for _ in gens.events():
            pass
        return gens[0].text


def sampling_params(**fields: Any) -> SamplingParams:
    """``SamplingParams(**fields)``; the engine's own validation failing is a 400 naming the field."""
    try:
        return SamplingParams(**fields)
    except ParamError as exc:
        raise bad_param(exc.param, str(exc)) from exc


def for_choice(params: SamplingParams, index: int) -> SamplingParams:
    """The params of choice ``index``: same, with seed + index so choices differ but reproduce."""
    if params.seed is None or index == 0:
        return params
    return replace(params, seed=(params.seed + index) % (1 << 63))


def openai_finish(reason: str | None) -> str | None:
    if reason is None:
        return None
    return "length" if reason == "length" else "stop"


def sse(payload: str) -> str:
    return f"data: {payload}\n\n"


SSE_DONE = "data: [DONE]\n\n"
