"""The serving layer: OpenAI / TGI / DashScope protocol <-> engine.

It applies the model's chat template, tokenizes, turns request fields into ``SamplingParams``
(rejecting what the model or engine cannot do with a 400 that names the parameter), runs ``n``
choices as ``n`` engine requests with derived seeds, and turns ``TokenEvent`` streams into
responses or server-sent-event chunks, with usage, logprobs, metrics and the access-log fields.

Modules, as vLLM keeps ``serving_chat`` / ``serving_completion`` on a shared base:
- ``errors``: ``ApiError`` and the errors several places raise (draining, not ready, engine errors);
- ``context``: ``RequestContext``, what a request's metrics and access-log line need;
- ``stream``: the engine stream of one request (open, merged events, close, accounting);
- ``base``: the served model (names, tokenizer, limits) and warm-up; ``sampling``: OpenAI fields;
- ``chat``, ``completions``, ``tgi``, ``dashscope``: one module per protocol family.

Nothing here knows about HTTP beyond status codes: ``berth.server.routes`` maps it to FastAPI.
"""

from __future__ import annotations

from berth.server.engine.types import ModelInfo
from berth.server.metrics import ServerMetrics
from berth.server.serving.base import ServedModel
from berth.server.serving.chat import OpenAIServingChat
from berth.server.serving.completions import OpenAIServingCompletion
from berth.server.serving.context import RequestContext
from berth.server.serving.dashscope import DashScopeServing
from berth.server.serving.errors import ApiError, bad_param
from berth.server.serving.stream import EngineLike
from berth.server.serving.tgi import TGIServing
from berth.server.settings import ServerSettings

__all__ = ["ApiError", "RequestContext", "Serving", "bad_param"]


class Serving:
    """Everything the routes call for one served model, one object per protocol family."""

    def __init__(self, engine: EngineLike, settings: ServerSettings, metrics: ServerMetrics) -> None:
        self.model = ServedModel(engine, settings, metrics)
        self.chat = OpenAIServingChat(self.model)
        self.completions = OpenAIServingCompletion(self.model)
        self.tgi = TGIServing(self.model)
        self.dashscope = DashScopeServing(self.model, self.chat)

    @property
    def info(self) -> ModelInfo:
        return self.model.info

    async def warm_up(self) -> str:
        return await self.model.warm_up()
