"""The models: the real shapes (configs as published, weights random), and HF model directories of them.

A model directory holds the config, random weights (safetensors) and a byte-level BPE tokenizer
that fills the model's whole vocabulary, so the engine, ``berth serve`` and transformers load the
same thing and token ids round-trip through text.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import torch

from bench.gpu.device import free

log = logging.getLogger(__name__)

# Shapes of the real models (from their published config.json), weights random.
MODEL_SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": {
        "model_type": "qwen2",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": True,
        "use_sliding_window": False,
    },
    "llama-3.2-1b": {
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "vocab_size": 128256,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 131072,
        "tie_word_embeddings": True,
    },
    "llama-3.1-8b": {  # optional: --models llama-3.1-8b
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 128256,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 131072,
        "tie_word_embeddings": False,
    },
}

# --smoke: the same two architectures, tiny.
SMOKE_SHAPES: dict[str, dict[str, Any]] = {
    "tiny-qwen2": {
        "model_type": "qwen2",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 512,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
        "use_sliding_window": False,
    },
    "tiny-llama": {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 160,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "vocab_size": 640,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
        },
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
    },
}


def save_tokenizer(vocab_size: int, directory: Path) -> None:
    """A byte-level BPE tokenizer that fills the model's whole vocabulary, saved next to the model.

    Its pipeline is Qwen2's (NFC, Qwen's split regex, byte-level), because transformers loads a
    qwen2 model directory's tokenizer as ``Qwen2Tokenizer`` whatever the directory declares; the
    Llama shapes load the same tokenizer.json as it is. The vocabulary: the 256 byte symbols, then
    the words " a", " b", ... " ab", ... (letters a-p, shortest first) with one merge per word
    (prefix + last letter), and ``<|endoftext|>`` as the last id. Every id decodes to text, and a
    run of words re-encodes to the same ids.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    letters = "abcdefghijklmnop"
    byte_syms = sorted(pre_tokenizers.ByteLevel.alphabet())
    space = "\u0120"  # the byte-level symbol of " "
    vocab: dict[str, int] = {sym: i for i, sym in enumerate(byte_syms)}
    merges: list[tuple[str, str]] = []
    frontier = [space]
    while len(vocab) < vocab_size - 1:
        nxt = []
        for prefix in frontier:
            for ch in letters:
                if len(vocab) >= vocab_size - 1:
                    break
                word = prefix + ch
                vocab[word] = len(vocab)
                merges.append((prefix, ch))
                nxt.append(word)
        frontier = nxt
    vocab["<|endoftext|>"] = len(vocab)
    assert len(vocab) == vocab_size, (len(vocab), vocab_size)
    split = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    make_fast: Any = PreTrainedTokenizerFast  # untyped
    fast = make_fast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>"
    )
    fast.save_pretrained(directory)


def build_model_dir(name: str, shape: dict[str, Any], root: Path, dtype: torch.dtype, seed: int) -> Path:
    """Random weights of ``shape`` saved as a HF model directory (config, safetensors, tokenizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = root / name
    directory.mkdir(parents=True, exist_ok=True)
    kwargs = dict(shape)
    model_type = kwargs.pop("model_type")
    v = kwargs["vocab_size"]
    config = AutoConfig.for_model(
        model_type, eos_token_id=v - 1, pad_token_id=v - 1, bos_token_id=None, **kwargs
    )
    torch.manual_seed(seed)
    init_device = "cuda" if torch.cuda.is_available() else "cpu"
    auto: Any = AutoModelForCausalLM  # partly untyped
    with torch.device(init_device):
        model = auto.from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = v - 1
    model.generation_config.pad_token_id = v - 1
    model.save_pretrained(directory)
    save_tokenizer(v, directory)
    n = sum(p.numel() for p in model.parameters())
    del model
    free(torch.device(init_device))
    log.info("built %s: %.0fM parameters at %s", name, n / 1e6, directory)
    return directory


def random_prompts(n: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size - 1) for _ in range(length)] for _ in range(n)]
