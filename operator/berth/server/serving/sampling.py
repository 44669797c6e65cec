"""OpenAI request fields -> ``SamplingParams``, shared by chat and completions, and the logprob
shapes both return."""

from __future__ import annotations

from berth.server.engine.types import GuidedSpec, SamplingParams, TokenEvent
from berth.server.protocol import (
    ChatCompletionRequest,
    ChoiceLogprobs,
    CompletionLogprobs,
    CompletionRequest,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from berth.server.serving.base import ServedModel, sampling_params
from berth.server.serving.context import RequestContext
from berth.server.serving.errors import bad_param
from berth.server.serving.guided import response_format_spec

OpenAIRequest = ChatCompletionRequest | CompletionRequest


def common_checks(model: ServedModel, req: OpenAIRequest) -> list[str]:
    """What chat and completions refuse alike; returns the request's stop strings."""
    limit = model.settings.max_n
    if req.n > limit:
        raise bad_param("n", f"n must be at most {limit}, got {req.n}")
    if req.best_of is not None and req.best_of != req.n:
        raise bad_param("best_of", "best_of other than n is not supported")
    if req.logit_bias:
        raise bad_param("logit_bias", "logit_bias is not supported")
    return model.check_stops(req.stop_list())


def openai_params(
    req: OpenAIRequest,
    stops: list[str],
    max_tokens: int,
    logprobs: int | None,
    guided: GuidedSpec | None = None,
) -> SamplingParams:
    """The engine's parameters; ``guided`` (a forced tool choice's grammar) overrides ``response_format``."""
    temperature = 1.0 if req.temperature is None else req.temperature
    top_p = 1.0 if req.top_p is None else req.top_p
    if top_p == 0.0:  # "only the most likely token": greedy
        temperature, top_p = 0.0, 1.0
    return sampling_params(
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
        guided=guided or response_format_spec(req.response_format),
    )


def usage(ctx: RequestContext) -> Usage:
    return Usage(
        prompt_tokens=ctx.prompt_tokens,
        completion_tokens=ctx.completion_tokens,
        total_tokens=ctx.prompt_tokens + ctx.completion_tokens,
    )


def _token_bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def chat_logprobs(model: ServedModel, events: list[TokenEvent], k: int) -> ChoiceLogprobs:
    content = []
    for ev in events:
        if ev.token_id is None or ev.logprob is None:
            continue
        text = model.token_text(ev.token_id)
        tops = [
            TopLogprob(token=t, logprob=lp, bytes=_token_bytes(t)) for t, lp in (ev.top_logprobs or [])[:k]
        ]
        content.append(
            TokenLogprob(token=text, logprob=ev.logprob, bytes=_token_bytes(text), top_logprobs=tops)
        )
    return ChoiceLogprobs(content=content)


def completion_logprobs(
    model: ServedModel, events: list[TokenEvent], k: int, offset: int
) -> CompletionLogprobs:
    out = CompletionLogprobs()
    for ev in events:
        if ev.token_id is None:
            continue
        text = model.token_text(ev.token_id)
        out.tokens.append(text)
        out.token_logprobs.append(ev.logprob)
        out.top_logprobs.append(dict((ev.top_logprobs or [])[:k]) if k > 0 else None)
        out.text_offset.append(offset)
        offset += len(text)
    return out
