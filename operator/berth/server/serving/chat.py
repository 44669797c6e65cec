"""``POST /v1/chat/completions``: the chat template, tool calls, streamed and whole answers."""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from berth.server import reasoning, tool_calls, tool_parsers
from berth.server.engine.multimodal import MultiModalInput
from berth.server.engine.types import GenerationRequest
from berth.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatMessage,
)
from berth.server.serving import images
from berth.server.serving.base import SSE_DONE, ServedModel, for_choice, openai_finish, sse
from berth.server.serving.context import RequestContext
from berth.server.serving.errors import ApiError, bad_param
from berth.server.serving.guided import ForcedSplitter, forced_calls, forced_tool
from berth.server.serving.sampling import chat_logprobs, common_checks, openai_params, usage
from berth.server.serving.stream import Generations


def _template_of(tokenizer: Any) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = " ".join(str(v) for v in template.values())
    return template if isinstance(template, str) else None


class _AnswerStream:
    """One streamed choice's text: reasoning apart, then what may be tool calls held back."""

    def __init__(
        self, thinker: reasoning.ReasoningSplitter | None, splitter: tool_parsers.Splitter | None
    ) -> None:
        self.thinker = thinker
        self.splitter = splitter

    def feed(self, text: str, last: bool) -> tuple[str, str, list[tool_calls.ToolCall]]:
        """(reasoning, content, calls) to send for this delta (``last``: the choice ends with it)."""
        thought = ""
        if self.thinker is not None:
            thought, text = self.thinker.feed(text)
            if last:
                more_thought, more_text = self.thinker.finish()
                thought, text = thought + more_thought, text + more_text
        calls: list[tool_calls.ToolCall] = []
        if self.splitter is not None:
            text = self.splitter.feed(text)
            if last:
                rest, calls = self.splitter.finish()
                text += rest
        return thought, text, calls


class OpenAIServingChat:
    def __init__(self, model: ServedModel) -> None:
        self.model = model
        self.template = _template_of(model.tokenizer)
        self.tool_format = tool_parsers.for_template(self.template)
        self.thinking = reasoning.teaches_thinking(self.template)
        self.image_processor = getattr(model.engine, "image_processor", None)

    @property
    def supports_tools(self) -> bool:
        return self.template is not None and "tools" in self.template

    # ------------------------------------------------------------------------- the prompt

    def _check(self, req: ChatCompletionRequest) -> None:
        name = self.model.served_name
        if self.template is None:
            raise bad_param("messages", "this model has no chat template; use /v1/completions")
        if req.tools:
            if not self.supports_tools:
                raise bad_param("tools", f"the model {name!r} has no tool-calling chat template")
        elif req.tool_choice not in (None, "none", "auto"):
            raise bad_param("tool_choice", "tool_choice requires tools")
        if req.modalities and any(m != "text" for m in req.modalities):
            raise bad_param("modalities", f"the model {name!r} only produces text")
        if req.audio is not None:
            raise bad_param("audio", f"the model {name!r} only produces text")

    def _content(self, i: int, msg: ChatMessage, refs: list[images.ImageRef]) -> str | list[dict[str, Any]]:
        """The message's content for the template (a list with image parts when it holds images)."""
        if not isinstance(msg.content, list):
            return msg.content if msg.content is not None else ""
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(msg.content):
            where = f"messages[{i}].content[{j}]"
            if part.type == "text" and part.text is not None:
                parts.append({"type": "text", "text": part.text})
                continue
            if part.type != "image_url":
                raise bad_param(where, f"unknown content part type {part.type!r} (text, image_url)")
            if not self.accepts_images:
                raise bad_param(
                    where,
                    f"content parts of type {part.type!r} are not supported: "
                    f"the model {self.model.served_name!r} is text-only",
                )
            refs.append(
                images.ImageRef(where, images.url_of(where, (part.model_extra or {}).get("image_url")))
            )
            if len(refs) > self.model.settings.max_images_per_request:
                raise bad_param(
                    where, f"more than {self.model.settings.max_images_per_request} images in one request"
                )
            parts.append({"type": "image"})
        if all(p["type"] == "text" for p in parts):
            return "".join(p["text"] for p in parts)
        return parts

    def _encode_plain(self, text: str) -> list[int]:
        return self.model.encode(text, add_special_tokens=False)

    @property
    def accepts_images(self) -> bool:
        return self.image_processor is not None and self.model.info.image_token_id is not None

    def _template_messages(
        self, req: ChatCompletionRequest, refs: list[images.ImageRef]
    ) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        for i, msg in enumerate(req.messages):
            entry: dict[str, Any] = {
                "role": "system" if msg.role == "developer" else msg.role,
                "content": self._content(i, msg, refs),
            }
            if msg.name is not None:
                entry["name"] = msg.name
            if msg.tool_calls is not None:
                entry["tool_calls"] = tool_calls.arguments_for_template(msg.tool_calls)
            if msg.tool_call_id is not None:
                entry["tool_call_id"] = msg.tool_call_id
            messages.append(entry)
        return messages

    def prompt(self, req: ChatCompletionRequest) -> tuple[str, list[int]]:
        """Apply the model's chat template and tokenize; 400 for what a text-only model can't take."""
        text, ids, _ = self.prompt_with_images(req)
        return text, ids

    def prompt_with_images(self, req: ChatCompletionRequest) -> tuple[str, list[int], list[images.ImageRef]]:
        """``prompt``, and the image parts in prompt order (their placeholders not yet expanded)."""
        self._check(req)
        refs: list[images.ImageRef] = []
        messages = self._template_messages(req, refs)
        kwargs: dict[str, Any] = {"tokenize": False, "add_generation_prompt": True}
        if req.tools:
            kwargs["tools"] = req.tools
        try:
            text = self.model.tokenizer.apply_chat_template(messages, **kwargs)
        except Exception as exc:  # jinja raise_exception() in templates: e.g. roles out of order
            raise bad_param("messages", f"the chat template rejected the messages: {exc}") from exc
        return str(text), self.model.encode(str(text), add_special_tokens=False), refs

    async def _images(
        self, refs: list[images.ImageRef], ids: list[int], ctx: RequestContext
    ) -> tuple[list[int], MultiModalInput]:
        model = self.model
        name = ctx.model or model.served_name
        token = model.info.image_token_id
        assert token is not None
        started = time.monotonic()
        try:
            expanded, mm = await images.prepare(
                refs, model.settings, self.image_processor, ids, token, self._encode_plain
            )
        except ApiError:
            model.metrics.image_rejected.inc()
            raise
        model.metrics.image_preprocess_seconds.observe(time.monotonic() - started)
        model.metrics.image_requests.labels(name).inc()
        model.metrics.images.labels(name).inc(len(refs))
        model.metrics.image_tokens.labels(name).inc(mm.num_image_tokens)
        ctx.images = len(refs)
        return expanded, mm

    # ---------------------------------------------------------------------------- answers

    async def create(
        self, req: ChatCompletionRequest, ctx: RequestContext
    ) -> ChatCompletionResponse | AsyncIterator[str]:
        model = self.model
        adapter = model.resolve_model(req.model)
        ctx.model = req.model or model.served_name
        stops = common_checks(model, req)
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_param("top_logprobs", "top_logprobs requires logprobs=true")
        prompt_text, prompt_ids, refs = self.prompt_with_images(req)
        mm: MultiModalInput | None = None
        if refs:
            prompt_ids, mm = await self._images(refs, prompt_ids, ctx)
        ctx.prompt_tokens = len(prompt_ids)
        if model.settings.log_content:
            ctx.prompt_text = prompt_text
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens = model.max_tokens(requested, len(prompt_ids), "messages")
        k = req.top_logprobs or 0
        forced = forced_tool(req.tools, req.tool_choice, req.parallel_tool_calls)
        params = openai_params(
            req, stops, max_tokens, k if req.logprobs else None, guided=forced[0] if forced else None
        )
        find_calls = bool(req.tools) and req.tool_choice != "none"
        if find_calls and not forced and self.tool_format.keeps_special_tokens:
            params = dataclasses.replace(
                params, skip_special_tokens=False
            )  # the call markers are special tokens
        opened = self.thinking and reasoning.starts_open(prompt_text)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        ctx.request_id = rid
        greqs = [
            GenerationRequest(f"{rid}-{i}", prompt_ids, for_choice(params, i), adapter, multimodal=mm)
            for i in range(req.n)
        ]
        gens = await model.open(greqs, ctx, "messages")
        tools = req.tools if find_calls else None
        splitter = (lambda: ForcedSplitter(forced[1])) if forced else (lambda: self._splitter(tools))
        if req.stream:
            include_usage = req.stream_options is not None and req.stream_options.include_usage
            return self._stream(gens, rid, ctx.model, include_usage, req.logprobs, k, splitter, opened)
        await gens.collect(keep_events=req.logprobs)
        choices = []
        for g in gens:
            thought, answer = reasoning.split(g.text, opened) if self.thinking else (None, g.text)
            if forced:
                calls = forced_calls(answer, forced[1])
                content: str | None = None if calls else answer
            else:
                content, calls = self.tool_format.parse(answer, tools) if tools else (answer, [])
            choices.append(
                ChatChoice(
                    index=g.index,
                    message=AssistantMessage(
                        content=content,
                        reasoning_content=thought,
                        tool_calls=[c.openai() for c in calls] or None,
                    ),
                    logprobs=chat_logprobs(model, g.events, k) if req.logprobs else None,
                    finish_reason="tool_calls" if calls else openai_finish(g.finish_reason),
                )
            )
        return ChatCompletionResponse(id=rid, model=ctx.model, choices=choices, usage=usage(ctx))

    def _splitter(self, tools: tool_parsers.Tools) -> tool_parsers.Splitter | None:
        return self.tool_format.splitter(tools) if tools else None

    async def _stream(
        self,
        gens: Generations,
        rid: str,
        model: str,
        include_usage: bool,
        logprobs: bool,
        k: int,
        splitter: Callable[[], tool_parsers.Splitter | None],
        opened: bool,
    ) -> AsyncIterator[str]:
        created = int(time.time())
        exclude = None if include_usage else {"usage"}
        answers = {
            g.index: _AnswerStream(reasoning.ReasoningSplitter(opened) if self.thinking else None, splitter())
            for g in gens
        }

        def chunk(choices: list[ChatChunkChoice]) -> str:
            body = ChatCompletionChunk(id=rid, created=created, model=model, choices=choices)
            return sse(body.model_dump_json(exclude=exclude))

        try:
            for g in gens:
                yield chunk([ChatChunkChoice(index=g.index, delta=ChatDelta(role="assistant", content=""))])
            async for g, event in gens.events():
                finish = openai_finish(event.finish_reason)
                thought, text, calls = answers[g.index].feed(event.text, finish is not None)
                if thought:
                    yield chunk([ChatChunkChoice(index=g.index, delta=ChatDelta(reasoning_content=thought))])
                if not text and finish is None and not logprobs:
                    continue
                lp = (
                    chat_logprobs(self.model, [event], k) if logprobs and event.token_id is not None else None
                )
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
                final = ChatCompletionChunk(
                    id=rid, created=created, model=model, choices=[], usage=usage(gens.ctx)
                )
                yield sse(final.model_dump_json())
            yield SSE_DONE
        finally:
            gens.finish()
