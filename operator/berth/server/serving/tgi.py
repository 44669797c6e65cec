"""TGI's API: ``/generate``, ``/generate_stream``, ``/info`` (``huggingface_hub.InferenceClient``)."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import AsyncIterator
from typing import Literal

from berth.server.engine.types import GenerationRequest, SamplingParams, TokenEvent
from berth.server.protocol import (
    TGIDetails,
    TGIGenerateRequest,
    TGIGenerateResponse,
    TGIInfo,
    TGIParameters,
    TGIPrefillToken,
    TGIStreamDetails,
    TGIStreamResponse,
    TGIToken,
)
from berth.server.serving.base import ServedModel, sampling_params, sse
from berth.server.serving.context import RequestContext
from berth.server.serving.errors import bad_param
from berth.server.serving.guided import grammar_spec
from berth.server.serving.stream import Generation, Generations

TGI_DEFAULT_MAX_NEW_TOKENS = 100


def _check(p: TGIParameters) -> None:
    if p.best_of is not None and p.best_of > 1:
        raise bad_param("best_of", "best_of > 1 is not supported")
    if p.typical_p is not None and p.typical_p < 1.0:
        raise bad_param("typical_p", "typical_p is not supported")
    if p.watermark:
        raise bad_param("watermark", "watermark is not supported")


def _top_tokens(event: TokenEvent, k: int) -> list[TGIToken]:
    return [TGIToken(id=0, text=t, logprob=lp) for t, lp in (event.top_logprobs or [])[:k]]


class TGIServing:
    def __init__(self, model: ServedModel) -> None:
        self.model = model

    def info(self, version: str) -> TGIInfo:
        m = self.model
        return TGIInfo(
            model_id=m.served_name,
            model_dtype=m.info.dtype,
            model_device_type=m.info.device.split(":")[0],
            max_concurrent_requests=m.settings.max_num_seqs + m.settings.max_queue,
            max_best_of=1,
            max_stop_sequences=m.settings.max_stop_sequences,
            max_input_tokens=max(1, m.info.max_model_len - 1),
            max_total_tokens=m.info.max_model_len,
            backend=m.info.backend,
            threads=int(m.info.extra["threads"]) if "threads" in m.info.extra else None,
            version=version,
        )

    def _params(self, p: TGIParameters, stops: list[str], prompt_len: int, stream: bool) -> SamplingParams:
        sampling = p.do_sample or any(
            (p.temperature not in (None, 1.0), p.top_k is not None, p.top_p not in (None, 1.0))
        )
        requested = (
            p.max_new_tokens
            if p.max_new_tokens is not None
            else min(TGI_DEFAULT_MAX_NEW_TOKENS, max(1, self.model.info.max_model_len - prompt_len))
        )
        seed = p.seed
        if sampling and seed is None:
            seed = secrets.randbits(63)  # reported back in details.seed, so the sample can be redone
        return sampling_params(
            max_tokens=self.model.max_tokens(requested, prompt_len, "inputs"),
            temperature=(p.temperature if p.temperature is not None else 1.0) if sampling else 0.0,
            top_p=p.top_p if p.top_p is not None else 1.0,
            top_k=p.top_k or 0,
            seed=seed,
            stop=tuple(stops),
            frequency_penalty=p.frequency_penalty or 0.0,
            repetition_penalty=p.repetition_penalty if p.repetition_penalty is not None else 1.0,
            logprobs=(p.top_n_tokens or 0) if (p.details or stream) else None,
            guided=grammar_spec(p.grammar),
        )

    def _request(self, req: TGIGenerateRequest, ctx: RequestContext, stream: bool) -> GenerationRequest:
        p = req.parameters
        m = self.model
        adapter = m.resolve_model(p.adapter_id) if p.adapter_id else None
        ctx.model = f"{m.served_name}:{adapter}" if adapter else m.served_name
        _check(p)
        stops = m.check_stops(p.stop or [])
        if not req.inputs:
            raise bad_param("inputs", "inputs must not be empty")
        ids = m.encode(req.inputs, add_special_tokens=True)
        if p.truncate is not None and len(ids) > p.truncate:
            ids = ids[-p.truncate :]
        ctx.prompt_tokens = len(ids)
        if m.settings.log_content:
            ctx.prompt_text = req.inputs
        params = self._params(p, stops, len(ids), stream)
        rid = f"gen-{uuid.uuid4().hex}"
        ctx.request_id = rid
        return GenerationRequest(rid, ids, params, adapter)

    def _finish_reason(self, g: Generation) -> Literal["length", "eos_token", "stop_sequence"]:
        if g.finish_reason == "length":
            return "length"
        if g.last_token_id is not None and g.last_token_id in self.model.info.eos_token_ids:
            return "eos_token"
        return "stop_sequence" if g.finish_reason == "stop" else "length"

    def _token(self, event: TokenEvent, text: str) -> TGIToken:
        tid = event.token_id if event.token_id is not None else 0
        return TGIToken(id=tid, text=text, logprob=event.logprob, special=tid in self.model.special_ids)

    async def generate(self, req: TGIGenerateRequest, ctx: RequestContext) -> TGIGenerateResponse:
        greq = self._request(req, ctx, stream=False)
        p = req.parameters
        gens = await self.model.open([greq], ctx, "inputs")
        await gens.collect(keep_events=p.details)
        g = gens[0]
        text = (req.inputs + g.text) if p.return_full_text else g.text
        if not p.details:
            return TGIGenerateResponse(generated_text=text)
        k = p.top_n_tokens or 0
        m = self.model
        prefill = [TGIPrefillToken(id=t, text=m.token_text(t)) for t in greq.prompt_token_ids]
        details = TGIDetails(
            finish_reason=self._finish_reason(g),
            generated_tokens=g.num_tokens,
            seed=greq.params.seed,
            prefill=prefill if p.decoder_input_details else [],
            tokens=[self._token(ev, m.token_text(ev.token_id or 0)) for ev in g.events],
            top_tokens=[_top_tokens(ev, k) for ev in g.events] if k else [],
        )
        return TGIGenerateResponse(generated_text=text, details=details)

    async def generate_stream(self, req: TGIGenerateRequest, ctx: RequestContext) -> AsyncIterator[str]:
        greq = self._request(req, ctx, stream=True)
        gens = await self.model.open([greq], ctx, "inputs")
        return self._stream(req, greq, gens)

    async def _stream(
        self, req: TGIGenerateRequest, greq: GenerationRequest, gens: Generations
    ) -> AsyncIterator[str]:
        k = req.parameters.top_n_tokens or 0
        index = 0
        try:
            async for g, event in gens.events():
                if event.token_id is None and event.finish_reason is None:
                    continue
                index += 1
                out = TGIStreamResponse(index=index, token=self._token(event, event.text))
                if k:
                    out.top_tokens = _top_tokens(event, k)
                if event.finish_reason is not None:
                    out.generated_text = (req.inputs + g.text) if req.parameters.return_full_text else g.text
                    out.details = TGIStreamDetails(
                        finish_reason=self._finish_reason(g),
                        generated_tokens=g.num_tokens,
                        seed=greq.params.seed,
                        input_length=len(greq.prompt_token_ids),
                    )
                yield sse(out.model_dump_json())
        finally:
            gens.finish()
