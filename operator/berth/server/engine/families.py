"""The model families Berth serves, as data: what docs/models.md (``tools/render_models_doc.py``) shows and
what the correctness tests (tests/server/test_backends.py) must cover, one entry per ``model_type``.

``native`` families run on Berth's own forward under ``--backend auto`` (and on the transformers backend
when asked); every other decoder that transformers can build runs on the transformers backend, these
and any other: the list is what is tested, not a limit.
"""

from __future__ import annotations

from dataclasses import dataclass

# The native forward covers these model types (the same decoder-layer shape: Llama, Mistral, Qwen2 with
# its q/k/v bias, Qwen3 with its q/k norms).
NATIVE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class Family:
    model_type: str
    name: str  # the models people know it by
    features: tuple[str, ...] = ()  # what the attention or the layers need beyond plain GQA
    tool_format: str = "hermes"  # the format its chat template teaches (server/tool_parsers.py)
    reasoning: bool = False  # the template teaches <think>...</think>
    side_by_side_lora: bool = True  # several adapters per batch (standard q/k/v/o, gate/up/down names)

    @property
    def native(self) -> bool:
        return self.model_type in NATIVE_MODEL_TYPES

    @property
    def backends(self) -> tuple[str, ...]:
        return ("native", "transformers") if self.native else ("transformers",)


FAMILIES: tuple[Family, ...] = (
    Family("llama", "Llama 2/3.x, SmolLM2, many fine-tunes", ("GQA",), tool_format="llama3_json"),
    Family("mistral", "Mistral 7B, Ministral", ("GQA", "sliding window"), tool_format="mistral"),
    Family("qwen2", "Qwen2 / Qwen2.5", ("GQA", "q/k/v bias", "sliding window (use_sliding_window)")),
    Family("qwen3", "Qwen3 (dense)", ("GQA", "q/k norms"), reasoning=True),
    Family("qwen3_moe", "Qwen3 MoE (30B-A3B, 235B-A22B)", ("GQA", "MoE"), reasoning=True),
    Family("glm", "GLM-4 (0414 architecture 'glm')", ("GQA", "partial rotary"), side_by_side_lora=False),
    Family("glm4", "GLM-4-9B-0414, GLM-Z1", ("GQA", "partial rotary"), side_by_side_lora=False),
    Family(
        "glm4_moe",
        "GLM-4.5, GLM-4.5-Air, GLM-4.6",
        ("GQA", "partial rotary", "MoE"),
        tool_format="glm45",
        reasoning=True,
        side_by_side_lora=False,
    ),
    Family("mixtral", "Mixtral 8x7B / 8x22B", ("GQA", "MoE", "sliding window"), tool_format="mistral"),
    Family(
        "gemma2",
        "Gemma 2",
        ("GQA", "alternating local/global layers", "logit soft-capping", "query_pre_attn_scalar"),
    ),
    Family("gemma3_text", "Gemma 3 (text)", ("GQA", "alternating local/global layers", "q/k norms")),
    Family("phi3", "Phi-3 / Phi-3.5 / Phi-4-mini", ("fused qkv", "partial rotary"), side_by_side_lora=False),
    Family("olmo2", "OLMo 2", ("q/k norms",)),
    Family("granite", "IBM Granite 3.x", ("GQA", "residual/embedding/logit multipliers")),
    Family(
        "deepseek_v3",
        "DeepSeek-V3 / R1, Kimi K2 (same architecture)",
        ("multi-head latent attention (generic path)", "MoE"),
        reasoning=True,
        side_by_side_lora=False,
    ),
    Family(
        "gpt_oss",
        "gpt-oss-20b / -120b",
        ("GQA", "attention sinks", "alternating sliding windows", "MoE"),
        side_by_side_lora=False,
    ),
)

BY_TYPE = {f.model_type: f for f in FAMILIES}


@dataclass(frozen=True)
class VisionFamily:
    """An image-text-to-text model type the vision runner serves (transformers backend only)."""

    model_type: str
    name: str
    positions: str  # how image tokens get their rotary positions
    features: tuple[str, ...] = ()


# What tests/server/test_vision.py checks token for token against transformers generate.
VISION_FAMILIES: tuple[VisionFamily, ...] = (
    VisionFamily("qwen2_vl", "Qwen2-VL", "M-RoPE (get_rope_index)"),
    VisionFamily("qwen2_5_vl", "Qwen2.5-VL", "M-RoPE (get_rope_index)", ("window attention vision tower",)),
    VisionFamily(
        "qwen3_vl", "Qwen3-VL (dense)", "interleaved M-RoPE", ("deepstack features in early layers",)
    ),
    VisionFamily(
        "qwen3_vl_moe",
        "Qwen3-VL MoE (30B-A3B, 235B-A22B)",
        "interleaved M-RoPE",
        ("deepstack features", "MoE"),
    ),
    VisionFamily("glm4v", "GLM-4.1V-Thinking, GLM-4.6V-Flash", "M-RoPE", ("partial rotary",)),
    VisionFamily("glm4v_moe", "GLM-4.5V, GLM-4.6V", "M-RoPE", ("partial rotary", "MoE")),
    VisionFamily("idefics3", "Idefics3", "1-D", ("image splitting into crops", "pixel-shuffle connector")),
    VisionFamily("smolvlm", "SmolVLM / SmolVLM2 (images)", "1-D", ("image splitting into crops",)),
)
