"""The model runner: the only part of the engine that runs the model (tensors live here).

Two backends with one interface (``step``, ``execute``, ``bytes_per_block``, ``free_device_memory``,
``vocab_size``, ``k_cache``/``v_cache``):
- ``native`` (``model_runner.ModelRunner``): Berth's own Llama-family forward, the fast path, with the
  static-shape decode path and CUDA graphs (``static_decode``);
- ``transformers`` (``hf.TransformersRunner``): any decoder transformers can build, its own modeling
  code, Berth's paged attention registered through transformers' attention interface (``hf_attention``).
``attention`` holds a step's flat inputs over the paged cache, shared by both.

``choose_backend`` picks one for a model: ``auto`` takes the native forward where it covers the model
type and the transformers backend for everything else.
"""

from __future__ import annotations

from typing import Any, Literal

from berth.server.engine.runner.hf import TransformersRunner, TransformersUnsupported, probe
from berth.server.engine.runner.model_runner import (
    LORA_TARGETS,
    SUPPORTED_MODEL_TYPES,
    ModelRunner,
    UnsupportedModelError,
    check_supported,
    sliding_window,
)
from berth.server.engine.runner.vision import VisionRunner, is_vision_model

Backend = Literal["auto", "native", "transformers"]
BACKENDS: tuple[str, ...] = ("native", "transformers")
RUNNERS: dict[str, type[ModelRunner] | type[TransformersRunner]] = {
    "native": ModelRunner,
    "transformers": TransformersRunner,
}

__all__ = [
    "BACKENDS",
    "LORA_TARGETS",
    "RUNNERS",
    "SUPPORTED_MODEL_TYPES",
    "Backend",
    "ModelRunner",
    "TransformersRunner",
    "UnsupportedModelError",
    "check_supported",
    "choose_backend",
    "is_vision_model",
    "runner_class",
    "sliding_window",
]


def runner_class(backend: str, model: Any) -> type[ModelRunner] | type[TransformersRunner]:
    """The runner for ``model`` on ``backend`` (image-text-to-text models: the vision runner)."""
    if backend == "transformers" and is_vision_model(model):
        return VisionRunner
    return RUNNERS[backend]


def _native_problem(model: Any) -> str | None:
    try:
        check_supported(model)
    except UnsupportedModelError as e:
        return str(e)
    return None


def choose_backend(model: Any, requested: str) -> tuple[str, str]:
    """(backend, why) for ``model``; raises UnsupportedModelError naming the model and what to do."""
    if requested not in ("auto", *BACKENDS):
        raise UnsupportedModelError(f"unknown backend {requested!r}: use auto, native or transformers")
    problem = _native_problem(model)
    if requested == "native":
        if problem is not None:
            raise UnsupportedModelError(f"{problem}; use --backend transformers (or auto)")
        return "native", "asked for (--backend native)"
    window = sliding_window(model)
    if requested == "auto" and problem is None and window is None:
        return "native", f"model_type {model.config.model_type!r} is covered by the native forward"
    try:
        probe(model)
    except TransformersUnsupported as e:
        raise UnsupportedModelError(str(e)) from e
    if requested == "transformers":
        return "transformers", "asked for (--backend transformers)"
    why = problem or f"a sliding window of {window} tokens (the native forward would cap the context at it)"
    return "transformers", f"not the native forward: {why}"
