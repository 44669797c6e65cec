"""DashScope's native text generation: ``POST /api/v1/services/aigc/text-generation/generation``.

What ``dashscope.Generation.call(model=..., prompt=... or messages=...)`` sends with
``dashscope.base_http_api_url`` pointed at Berth: ``{"model", "input": {"prompt"} | {"messages"},
"parameters": {...}}``. The answer is ``output.text`` (``result_format: "text"``, the default) or
``output.choices[].message`` (``"message"``), with ``usage.input_tokens/output_tokens`` and a
``request_id``. Streams (``X-DashScope-SSE: enable`` or ``Accept: text/event-stream``) are SSE
events ``id:N / event:result / data:{...}``, each with the text so far (or only the new text with
``incremental_output``), ``finish_reason: "null"`` until the last, and the usage so far; an error
after the stream started is an ``event:error`` with DashScope's ``{"code", "message", "request_id"}``.

A prompt is the user turn of the model's chat template (as DashScope's chat models take it); a model
without a chat template takes it as raw text. Messages go through the chat serving's template.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

from berth.server.engine.types import GenerationRequest, SamplingParams
from berth.server.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    DashScopeAssistant,
    DashScopeChoice,
    DashScopeError,
    DashScopeMessage,
    DashScopeOutput,
    DashScopeParameters,
    DashScopeRequest,
    DashScopeResponse,
    DashScopeUsage,
)
from berth.server.serving.base import ServedModel, openai_finish, sampling_params
from berth.server.serving.chat import OpenAIServingChat
from berth.server.serving.context import RequestContext
from berth.server.serving.errors import ApiError, bad_param, internal
from berth.server.serving.stream import Generations

log = logging.getLogger(__name__)

DASHSCOPE_PATH = "/api/v1/services/aigc/text-generation/generation"
STREAMING_FINISH = "null"  # DashScope's finish_reason (a string) while a stream goes on

_CODES = {
    400: "InvalidParameter",
    401: "InvalidApiKey",
    403: "AccessDenied",
    404: "ModelNotFound",
    405: "MethodNotAllowed",
    413: "InvalidParameter",
    429: "Throttling",
    500: "InternalError",
    503: "ServiceUnavailable",
}


def new_request_id() -> str:
    return str(uuid.uuid4())


def error_code(err: ApiError) -> str:
    if err.status == 404 and err.code != "model_not_found":
        return "NotFound"
    return _CODES.get(err.status, "InternalError" if err.status >= 500 else "InvalidParameter")


def error_body(err: ApiError, request_id: str) -> DashScopeError:
    """An ApiError in DashScope's shape (the parameter it names, if any, leads the message)."""
    message = err.message
    if err.param and not message.startswith(err.param):
        message = f"{err.param}: {message}"
    return DashScopeError(code=error_code(err), message=message, request_id=request_id)


def wants_sse(x_dashscope_sse: str | None, accept: str | None) -> bool:
    """DashScope streams when asked by ``X-DashScope-SSE: enable`` or ``Accept: text/event-stream``."""
    return (x_dashscope_sse or "").strip().lower() == "enable" or "text/event-stream" in (accept or "")


def _event(index: int, kind: str, status: int, payload: str) -> str:
    return f"id:{index}\nevent:{kind}\n:HTTP_STATUS/{status}\ndata:{payload}\n\n"


def _text_content(i: int, content: str | list[dict[str, Any]]) -> str:
    """A message's content as text: a string, or DashScope's ``[{"text": ...}]`` parts."""
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for j, part in enumerate(content):
        text = part.get("text")
        if not isinstance(text, str):
            kinds = sorted(k for k in part if k != "text")
            raise bad_param(
                f"input.messages[{i}].content[{j}]",
                f"only text parts are supported on this route (got {kinds})",
            )
        parts.append(text)
    return "".join(parts)


def _stops(p: DashScopeParameters) -> list[str]:
    if p.stop is None:
        return []
    if isinstance(p.stop, str):
        return [p.stop]
    if all(isinstance(s, str) for s in p.stop):
        return [str(s) for s in p.stop]
    raise bad_param("parameters.stop", "token-id stop sequences are not supported; send strings")


class DashScopeServing:
    """DashScope's generation on the shared base: the chat serving's template, the model's limits."""

    def __init__(self, model: ServedModel, chat: OpenAIServingChat) -> None:
        self.model = model
        self.chat = chat

    # ------------------------------------------------------------------------- the prompt

    def _chat_prompt(self, messages: list[DashScopeMessage]) -> tuple[str, list[int]]:
        converted = [
            ChatMessage(
                role=m.role,
                content=_text_content(i, m.content),
                name=m.name,
                tool_calls=m.tool_calls,
                tool_call_id=m.tool_call_id,
            )
            for i, m in enumerate(messages)
        ]
        try:
            return self.chat.prompt(ChatCompletionRequest(messages=converted))
        except ApiError as exc:
            if exc.param == "messages":
                exc.param = "input.messages"
            raise

    def prompt(self, req: DashScopeRequest) -> tuple[str, list[int]]:
        """(text, token ids) of the request's input; 400 naming ``input`` when there is none."""
        inp = req.input
        messages = list(inp.messages or [])
        if inp.prompt and messages:  # what the SDK sends for messages=... plus prompt=...
            messages.append(DashScopeMessage(role="user", content=inp.prompt))
        if messages:
            return self._chat_prompt(messages)
        if not inp.prompt:
            raise bad_param("input", "input.prompt or input.messages is required")
        if self.chat.template is not None:
            return self._chat_prompt([DashScopeMessage(role="user", content=inp.prompt)])
        ids = self.model.encode(inp.prompt, add_special_tokens=True)
        if not ids:
            raise bad_param("input.prompt", "input.prompt must not be empty")
        return inp.prompt, ids

    def params(self, p: DashScopeParameters, prompt_len: int) -> SamplingParams:
        if p.n != 1:
            raise bad_param("parameters.n", "only n=1 is supported on this route")
        stops = self.model.check_stops(_stops(p))
        temperature = 1.0 if p.temperature is None else p.temperature
        top_p = 1.0 if p.top_p is None else p.top_p
        return sampling_params(
            max_tokens=self.model.max_tokens(p.max_tokens, prompt_len, "input"),
            temperature=temperature,
            top_p=top_p,
            top_k=p.top_k or 0,
            seed=p.seed,
            stop=tuple(stops),
            presence_penalty=p.presence_penalty or 0.0,
            repetition_penalty=1.0 if p.repetition_penalty is None else p.repetition_penalty,
        )

    # ---------------------------------------------------------------------------- answers

    @staticmethod
    def answer(
        rid: str, result_format: str, text: str, finish: str, input_tokens: int, output_tokens: int
    ) -> DashScopeResponse:
        if result_format == "message":
            output = DashScopeOutput(
                choices=[DashScopeChoice(finish_reason=finish, message=DashScopeAssistant(content=text))]
            )
        else:
            output = DashScopeOutput(text=text, finish_reason=finish)
        usage = DashScopeUsage(
            input_tokens=input_tokens, output_tokens=output_tokens, total_tokens=input_tokens + output_tokens
        )
        return DashScopeResponse(output=output, usage=usage, request_id=rid)

    async def create(
        self, req: DashScopeRequest, ctx: RequestContext, stream: bool
    ) -> DashScopeResponse | AsyncIterator[str]:
        model = self.model
        adapter = model.resolve_model(req.model)
        ctx.model = req.model
        prompt_text, ids = self.prompt(req)
        ctx.prompt_tokens = len(ids)
        if model.settings.log_content:
            ctx.prompt_text = prompt_text
        params = self.params(req.parameters, len(ids))
        rid = ctx.request_id or new_request_id()
        ctx.request_id = rid
        gens = await model.open([GenerationRequest(rid, ids, params, adapter)], ctx, "input")
        result_format = req.parameters.result_format or "text"
        if stream:
            return self._stream(gens, rid, result_format, req.parameters.incremental_output)
        await gens.collect(keep_events=False)
        g = gens[0]
        finish = openai_finish(g.finish_reason) or "stop"
        return self.answer(rid, result_format, g.text, finish, ctx.prompt_tokens, g.num_tokens)

    async def _stream(
        self, gens: Generations, rid: str, result_format: str, incremental: bool
    ) -> AsyncIterator[str]:
        index = 0
        try:
            async for g, event in gens.events():
                finish = openai_finish(event.finish_reason)
                if not event.text and finish is None:
                    continue
                index += 1
                body = self.answer(
                    rid,
                    result_format,
                    event.text if incremental else g.text,
                    finish or STREAMING_FINISH,
                    gens.ctx.prompt_tokens,
                    g.num_tokens,
                )
                yield _event(index, "result", 200, body.model_dump_json(exclude_none=True))
        except ApiError as exc:
            gens.ctx.error = exc.message[:300]
            yield _event(index + 1, "error", exc.status, error_body(exc, rid).model_dump_json())
        except Exception as exc:
            log.exception("DashScope stream %s failed", rid)
            err = internal(exc)
            gens.ctx.error = err.message[:300]
            yield _event(index + 1, "error", 500, error_body(err, rid).model_dump_json())
        finally:
            gens.finish()
