"""Tiny random-weight vision-language models (no download): config from transformers' classes, the
built-in SmolLM2 tokenizer plus the model's image tokens, the model's own (PIL) image processor and
processor, saved as a Hugging Face directory ``berth serve --model DIR`` loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TEXT: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
}
# small images: 28 px per merged patch, at most 16 merged patches (image tokens) per image
PIXELS = {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 16}
QWEN_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
GLM_TOKENS = ["<|begin_of_image|>", "<|end_of_image|>", "<|image|>", "<|video|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}{{ IMAGE }}{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Idefics3 / SmolVLM: the image token, crop frames, the global-image tag and the crop grid tags
SPLIT_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"] + [
    f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)
]
SPLIT_MODEL_TYPES = ("idefics3", "smolvlm")
# Qwen2-VL's vision tower (full attention, hidden_size = the text model's) and Qwen2.5-VL's (windowed)
QWEN2_VISION = {"depth": 2, "embed_dim": 32, "hidden_size": 64, "mlp_ratio": 2, "num_heads": 2}
QWEN25_VISION = {
    "depth": 2,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "out_hidden_size": 64,
    "fullatt_block_indexes": [1],
    "window_size": 56,
}
# Qwen3-VL-30B-A3B's text model: layer 0 dense, layer 1 a mixture of 4 experts (2 per token)
QWEN3_MOE = {
    "moe_intermediate_size": 32,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [0],
}
# GLM-4.5V's text model: layer 0 dense, layer 1 a mixture of 4 routed experts (2 per token) and a shared one
GLM_MOE = {
    "moe_intermediate_size": 32,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "n_group": 1,
    "topk_group": 1,
}


QWEN3_VISION = {  # deepstack: vision layers 0 and 1 feed decoder layers 0 and 1
    "depth": 2,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "out_hidden_size": 64,
    "patch_size": 16,
    "num_position_embeddings": 64,
    "deepstack_visual_indexes": [0, 1],
}
GLM_VISION = {
    "depth": 2,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "out_hidden_size": 64,
    "image_size": 56,
    "patch_size": 14,
}
# 32 px crops of 8 px patches, pixel-shuffled by 2: 4 image tokens per crop
SPLIT_VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
}
QWEN_IDS = dict(
    zip(
        ("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id"),
        QWEN_TOKENS,
        strict=True,
    )
)
GLM_IDS = dict(
    zip(
        ("image_start_token_id", "image_end_token_id", "image_token_id", "video_token_id"),
        GLM_TOKENS,
        strict=True,
    )
)
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
GLM_IMAGE = "<|begin_of_image|><|image|><|end_of_image|>"
SPLIT_IDS = {"image_token_id": "<image>"}
QWEN2_TEXT = {"rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}}
QWEN2_PROCESSOR = ("qwen2_vl.image_processing_pil_qwen2_vl", "Qwen2VLImageProcessorPil")
QWEN3_ROPE = {"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True}
GLM_ROPE = {"rope_type": "default", "mrope_section": [1, 1, 2], "partial_rotary_factor": 0.5}


@dataclass(frozen=True)
class Family:
    """How one model type's tiny checkpoint is made."""

    tokens: list[str]  # special tokens added to the tokenizer
    ids: dict[str, str]  # config key -> the token whose id it holds
    image: str  # what an image part stands for in the chat template
    text: dict[str, Any]  # text_config beyond TEXT and vocab_size
    vision: dict[str, Any]
    processor: tuple[str, str]  # (module under transformers.models, class): the PIL image processor
    processor_args: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)  # more top-level config


def _qwen3(moe: bool) -> Family:
    text = {"head_dim": 16, "rope_parameters": QWEN3_ROPE, **(QWEN3_MOE if moe else {})}
    # 16 px patches: 32 px per merged patch
    args = {
        "patch_size": 16,
        "min_pixels": 32 * 32 * 4,
        "max_pixels": 32 * 32 * 16,
        "image_mean": [0.5] * 3,
        "image_std": [0.5] * 3,
    }
    return Family(QWEN_TOKENS, QWEN_IDS, QWEN_IMAGE, text, QWEN3_VISION, QWEN2_PROCESSOR, args)


def _glm(moe: bool) -> Family:
    text = {"head_dim": 16, "pad_token_id": 0, **(GLM_MOE if moe else {}), "rope_parameters": GLM_ROPE}
    processor = ("glm4v.image_processing_pil_glm4v", "Glm4vImageProcessorPil")
    args = {"size": {"shortest_edge": PIXELS["min_pixels"], "longest_edge": PIXELS["max_pixels"]}}
    return Family(GLM_TOKENS, GLM_IDS, GLM_IMAGE, text, GLM_VISION, processor, args)


def _split(processor: tuple[str, str]) -> Family:
    # an image's longest edge is resized to 64 px: up to 2x2 crops plus the global image
    args = {"size": {"longest_edge": 64}, "max_image_size": {"longest_edge": 32}, "do_image_splitting": True}
    text = {"model_type": "llama"}
    config = {"scale_factor": 2}
    return Family(SPLIT_TOKENS, SPLIT_IDS, "<image>", text, SPLIT_VISION, processor, args, config)


FAMILIES: dict[str, Family] = {
    "qwen2_vl": Family(QWEN_TOKENS, QWEN_IDS, QWEN_IMAGE, QWEN2_TEXT, QWEN2_VISION, QWEN2_PROCESSOR, PIXELS),
    "qwen2_5_vl": Family(
        QWEN_TOKENS, QWEN_IDS, QWEN_IMAGE, QWEN2_TEXT, QWEN25_VISION, QWEN2_PROCESSOR, PIXELS
    ),
    "qwen3_vl": _qwen3(moe=False),
    "qwen3_vl_moe": _qwen3(moe=True),
    "glm4v": _glm(moe=False),
    "glm4v_moe": _glm(moe=True),
    "idefics3": _split(("idefics3.image_processing_pil_idefics3", "Idefics3ImageProcessorPil")),
    "smolvlm": _split(("smolvlm.image_processing_pil_smolvlm", "SmolVLMImageProcessorPil")),
}
MODEL_TYPES = tuple(FAMILIES)


def build(model_type: str, directory: Path, tokenizer: Any) -> Path:
    import copy
    import importlib

    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    family = FAMILIES[model_type]
    tok = copy.deepcopy(tokenizer)
    torch.manual_seed(0)
    tok.add_special_tokens({"additional_special_tokens": family.tokens})
    config = AutoConfig.for_model(
        model_type,
        text_config={**TEXT, "vocab_size": len(tok), **family.text},
        vision_config=family.vision,
        **{key: tok.convert_tokens_to_ids(token) for key, token in family.ids.items()},
        **family.config,
    )
    tok.chat_template = CHAT_TEMPLATE.replace("{{ IMAGE }}", family.image)
    module, name = family.processor
    processor = getattr(importlib.import_module(f"transformers.models.{module}"), name)(
        **family.processor_args
    )
    model = AutoModelForImageTextToText.from_config(config)
    model.generation_config.pad_token_id = tok.eos_token_id
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory
