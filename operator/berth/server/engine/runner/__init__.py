"""The model runner: the only part of the engine that runs the model (tensors live here).

- ``model_runner``: ``ModelRunner`` (the KV cache tensors, the forward pass, the step -> sampler);
- ``attention``: a step's flat inputs over the paged cache and the attention over it;
- ``static_decode``: pure decode steps through static shapes, as CUDA graphs on CUDA.
"""

from __future__ import annotations

from berth.server.engine.runner.model_runner import (
    LORA_TARGETS,
    SUPPORTED_MODEL_TYPES,
    ModelRunner,
    UnsupportedModelError,
    check_supported,
)

__all__ = ["LORA_TARGETS", "SUPPORTED_MODEL_TYPES", "ModelRunner", "UnsupportedModelError", "check_supported"]
