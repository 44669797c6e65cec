"""``POST /v1/completions``: text or token-id prompts, ``echo``, logprobs, streamed and whole."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

from berth.server.engine.types import GenerationRequest
from berth.server.protocol import CompletionChoice, CompletionRequest, CompletionResponse
from berth.server.serving.base import SSE_DONE, ServedModel, for_choice, openai_finish, sse
from berth.server.serving.context import RequestContext
from berth.server.serving.errors import bad_param
from berth.server.serving.sampling import common_checks, completion_logprobs, openai_params, usage
from berth.server.serving.stream import Generations


class OpenAIServingCompletion:
    def __init__(self, model: ServedModel) -> None:
        self.model = model

    def prompts(self, req: CompletionRequest) -> list[tuple[str, list[int]]]:
        """(text, token ids) of every prompt of the request."""
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
        vocab = self.model.info.vocab_size
        for item in items:
            if isinstance(item, str):
                out.append((item, self.model.encode(item, add_special_tokens=True)))
            else:
                if any(not 0 <= t < vocab for t in item):
                    raise bad_param("prompt", f"prompt token ids must be in [0, {vocab})")
                out.append((str(self.model.tokenizer.decode(item)), list(item)))
            if not out[-1][1]:
                raise bad_param("prompt", "prompt must not be empty")
        return out

    def _check(self, req: CompletionRequest) -> list[str]:
        stops = common_checks(self.model, req)
        if req.suffix:
            raise bad_param("suffix", "suffix is not supported")
        if req.echo and req.logprobs is not None:
            raise bad_param("echo", "echo together with logprobs (prompt logprobs) is not supported")
        return stops

    async def create(
        self, req: CompletionRequest, ctx: RequestContext
    ) -> CompletionResponse | AsyncIterator[str]:
        model = self.model
        adapter = model.resolve_model(req.model)
        ctx.model = req.model or model.served_name
        stops = self._check(req)
        prompts = self.prompts(req)
        if len(prompts) * req.n > model.settings.max_n:
            raise bad_param("prompt", f"at most {model.settings.max_n} completions (prompts x n) per request")
        ctx.prompt_tokens = sum(len(ids) for _, ids in prompts)
        if model.settings.log_content:
            ctx.prompt_text = json.dumps([p for p, _ in prompts], ensure_ascii=False)
        rid = f"cmpl-{uuid.uuid4().hex}"
        ctx.request_id = rid
        greqs: list[GenerationRequest] = []
        for p, (_, ids) in enumerate(prompts):
            params = openai_params(
                req, stops, model.max_tokens(req.max_tokens, len(ids), "prompt"), req.logprobs
            )
            for j in range(req.n):
                index = p * req.n + j
                greqs.append(GenerationRequest(f"{rid}-{index}", ids, for_choice(params, j), adapter))
        gens = await model.open(greqs, ctx, "prompt")
        prefixes = [prompts[g.index // req.n][0] if req.echo else "" for g in gens]
        if req.stream:
            include_usage = req.stream_options is not None and req.stream_options.include_usage
            return self._stream(gens, rid, ctx.model, include_usage, req.logprobs, prefixes)
        await gens.collect(keep_events=req.logprobs is not None)
        k = req.logprobs or 0
        choices = [
            CompletionChoice(
                index=g.index,
                text=prefix + g.text,
                logprobs=completion_logprobs(model, g.events, k, len(prefix))
                if req.logprobs is not None
                else None,
                finish_reason=openai_finish(g.finish_reason),
            )
            for g, prefix in zip(gens, prefixes, strict=True)
        ]
        return CompletionResponse(id=rid, model=ctx.model, choices=choices, usage=usage(ctx))

    async def _stream(
        self,
        gens: Generations,
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
            return sse(body.model_dump_json(exclude=exclude))

        try:
            for g, prefix in zip(gens, prefixes, strict=True):
                if prefix:
                    yield chunk(CompletionChoice(index=g.index, text=prefix))
            async for g, event in gens.events():
                if not event.text and event.finish_reason is None and logprobs is None:
                    continue
                lp = None
                if logprobs is not None and event.token_id is not None:
                    lp = completion_logprobs(self.model, [event], logprobs, offsets[g.index])
                    offsets[g.index] += len(lp.tokens[0]) if lp.tokens else 0
                yield chunk(
                    CompletionChoice(
                        index=g.index,
                        text=event.text,
                        logprobs=lp,
                        finish_reason=openai_finish(event.finish_reason),
                    )
                )
            if include_usage:
                final = CompletionResponse(
                    id=rid, created=created, model=model, choices=[], usage=usage(gens.ctx)
                )
                yield sse(final.model_dump_json())
            yield SSE_DONE
        finally:
            gens.finish()
