"""Tiny random-weight models of many architectures, built from transformers' config classes (no download).

Each has 2 decoder layers, hidden size 64 and the built-in SmolLM2 tokenizer's vocabulary; sliding-window
architectures get a window of 8 tokens, so test prompts are longer than the window. ``build(model_type, dir)``
saves the model and the tokenizer as a Hugging Face directory that ``berth serve --model DIR`` loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

WINDOW = 8
BASE: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}
MOE = {"num_experts_per_tok": 2, "moe_intermediate_size": 32}
DEEPSEEK_ROUTING = {"n_routed_experts": 4, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1}
# model_type -> config overrides (on top of BASE)
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "llama": {},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "mistral": {"sliding_window": None},
    "glm": {"head_dim": 16, "pad_token_id": 0},
    "glm4": {"head_dim": 16, "pad_token_id": 0},
    "glm4_moe": {"head_dim": 16, **MOE, **DEEPSEEK_ROUTING},
    "qwen3_moe": {"head_dim": 16, "num_experts": 4, **MOE},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": WINDOW},
    "gemma2": {"head_dim": 16, "sliding_window": WINDOW},
    "gemma3_text": {"head_dim": 16, "sliding_window": WINDOW, "sliding_window_pattern": 2},
    "phi3": {"pad_token_id": 0},
    "olmo2": {},
    "granite": {},
    "deepseek_v3": {
        "num_key_value_heads": 4,
        "q_lora_rank": 32,
        "kv_lora_rank": 16,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 8,
        **MOE,
        **DEEPSEEK_ROUTING,
    },
    "gpt_oss": {"head_dim": 16, "sliding_window": WINDOW, "num_local_experts": 4, "num_experts_per_tok": 2},
}
# Sliding-window variants of the native families (they run on the transformers backend under auto).
SLIDING: dict[str, dict[str, Any]] = {
    "mistral": {"sliding_window": WINDOW},
    "qwen2": {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 0},
}
NATIVE = ("llama", "qwen2", "qwen3", "mistral")


def build(model_type: str, directory: Path, tokenizer: Any, overrides: dict[str, Any] | None = None) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    fields = {**BASE, **ARCHITECTURES.get(model_type, {}), **(overrides or {})}
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), **fields)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
