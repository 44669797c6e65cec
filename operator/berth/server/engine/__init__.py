"""Berth's inference engine: scheduler, paged KV cache, model runner, sampler, detokenizer.

``Engine`` and ``EngineCore`` are imported lazily so that ``berth.server.engine.types`` stays
importable without torch (the serving layer's types and its fake-engine tests only need the types).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from berth.server.engine.types import (
    AdapterNotFoundError,
    EngineConfig,
    EngineDrainingError,
    EngineStats,
    GenerationRequest,
    LoadedModel,
    ModelInfo,
    QueueFullError,
    SamplingParams,
    TokenEvent,
)

if TYPE_CHECKING:
    from berth.server.engine.core import EngineCore
    from berth.server.engine.engine import Engine

__all__ = [
    "AdapterNotFoundError",
    "Engine",
    "EngineConfig",
    "EngineCore",
    "EngineDrainingError",
    "EngineStats",
    "GenerationRequest",
    "LoadedModel",
    "ModelInfo",
    "QueueFullError",
    "SamplingParams",
    "TokenEvent",
]


def __getattr__(name: str) -> Any:
    if name == "Engine":
        from berth.server.engine.engine import Engine

        return Engine
    if name == "EngineCore":
        from berth.server.engine.core import EngineCore

        return EngineCore
    raise AttributeError(name)
