"""Tiny random-weight vision-language models (no download): config from transformers' classes, the
built-in SmolLM2 tokenizer plus the model's image tokens, the model's own (PIL) image processor and
processor, saved as a Hugging Face directory ``berth serve --model DIR`` loads.
"""

from __future__ import annotations

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
MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v", "glm4v_moe", *SPLIT_MODEL_TYPES)
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


def build(model_type: str, directory: Path, tokenizer: Any) -> Path:
    import copy

    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    tok = copy.deepcopy(tokenizer)
    torch.manual_seed(0)
    if model_type in ("qwen2_vl", "qwen2_5_vl"):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        tok.add_special_tokens({"additional_special_tokens": QWEN_TOKENS})
        ids = tok.convert_tokens_to_ids(QWEN_TOKENS)
        config = AutoConfig.for_model(
            model_type,
            text_config={
                **TEXT,
                "vocab_size": len(tok),
                "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
            },
            vision_config=QWEN2_VISION if model_type == "qwen2_vl" else QWEN25_VISION,
            vision_start_token_id=ids[0],
            vision_end_token_id=ids[1],
            image_token_id=ids[2],
            video_token_id=ids[3],
        )
        image = "<|vision_start|><|image_pad|><|vision_end|>"
        tok.chat_template = CHAT_TEMPLATE.replace("{{ IMAGE }}", image)
        processor: Any = Qwen2VLImageProcessorPil(**PIXELS)
    elif model_type in ("qwen3_vl", "qwen3_vl_moe"):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        tok.add_special_tokens({"additional_special_tokens": QWEN_TOKENS})
        ids = tok.convert_tokens_to_ids(QWEN_TOKENS)
        config = AutoConfig.for_model(
            model_type,
            text_config={
                **TEXT,
                "vocab_size": len(tok),
                "head_dim": 16,
                "rope_parameters": {
                    "rope_type": "default",
                    "mrope_section": [2, 3, 3],
                    "mrope_interleaved": True,
                },
                **(QWEN3_MOE if model_type == "qwen3_vl_moe" else {}),
            },
            vision_config={  # deepstack: vision layers 0 and 1 feed decoder layers 0 and 1
                "depth": 2,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_heads": 2,
                "out_hidden_size": 64,
                "patch_size": 16,
                "num_position_embeddings": 64,
                "deepstack_visual_indexes": [0, 1],
            },
            vision_start_token_id=ids[0],
            vision_end_token_id=ids[1],
            image_token_id=ids[2],
            video_token_id=ids[3],
        )
        image = "<|vision_start|><|image_pad|><|vision_end|>"
        tok.chat_template = CHAT_TEMPLATE.replace("{{ IMAGE }}", image)
        # 16 px patches: 32 px per merged patch
        processor = Qwen2VLImageProcessorPil(
            patch_size=16,
            min_pixels=32 * 32 * 4,
            max_pixels=32 * 32 * 16,
            image_mean=[0.5] * 3,
            image_std=[0.5] * 3,
        )
    elif model_type in ("glm4v", "glm4v_moe"):
        from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

        tok.add_special_tokens({"additional_special_tokens": GLM_TOKENS})
        ids = tok.convert_tokens_to_ids(GLM_TOKENS)
        config = AutoConfig.for_model(
            model_type,
            text_config={
                **TEXT,
                "vocab_size": len(tok),
                "head_dim": 16,
                "pad_token_id": 0,
                **(GLM_MOE if model_type == "glm4v_moe" else {}),
                "rope_parameters": {
                    "rope_type": "default",
                    "mrope_section": [1, 1, 2],
                    "partial_rotary_factor": 0.5,
                },
            },
            vision_config={
                "depth": 2,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_heads": 2,
                "out_hidden_size": 64,
                "image_size": 56,
                "patch_size": 14,
            },
            image_start_token_id=ids[0],
            image_end_token_id=ids[1],
            image_token_id=ids[2],
            video_token_id=ids[3],
        )
        image = "<|begin_of_image|><|image|><|end_of_image|>"
        tok.chat_template = CHAT_TEMPLATE.replace("{{ IMAGE }}", image)
        processor = Glm4vImageProcessorPil(
            size={"shortest_edge": PIXELS["min_pixels"], "longest_edge": PIXELS["max_pixels"]}
        )
    elif model_type in SPLIT_MODEL_TYPES:
        # 32 px crops of 8 px patches, pixel-shuffled by 2: 4 image tokens per crop; an image's longest
        # edge is resized to 64 px: up to 2x2 crops plus the global image
        if model_type == "idefics3":
            from transformers.models.idefics3.image_processing_pil_idefics3 import (
                Idefics3ImageProcessorPil as SplitProcessor,
            )
        else:
            from transformers.models.smolvlm.image_processing_pil_smolvlm import (
                SmolVLMImageProcessorPil as SplitProcessor,
            )
        tok.add_special_tokens({"additional_special_tokens": SPLIT_TOKENS})
        config = AutoConfig.for_model(
            model_type,
            text_config={"model_type": "llama", **TEXT, "vocab_size": len(tok)},
            vision_config={
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "image_size": 32,
                "patch_size": 8,
            },
            scale_factor=2,
            image_token_id=tok.convert_tokens_to_ids("<image>"),
        )
        tok.chat_template = CHAT_TEMPLATE.replace("{{ IMAGE }}", "<image>")
        processor = SplitProcessor(
            size={"longest_edge": 64}, max_image_size={"longest_edge": 32}, do_image_splitting=True
        )
    else:
        raise ValueError(model_type)
    model = AutoModelForImageTextToText.from_config(config)
    model.generation_config.pad_token_id = tok.eos_token_id
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory
