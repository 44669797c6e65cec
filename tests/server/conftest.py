"""Shared fixtures for the server tests: the built-in SmolLM2 model, loaded once per session.

The first load converts the GGUF file (about 30 s) and keeps a safetensors copy under
``~/.cache/berth/converted`` (``BERTH_CACHE_DIR`` moves it), so later sessions load in seconds.
Tests in this directory run torch on ``BERTH_TORCH_THREADS`` threads (default 1): on a small
shared machine, OpenMP threads competing for cores make every step many times slower.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from berth.server.engine.types import LoadedModel

BUILTIN = "builtin://smollm2-135m-instruct"


@pytest.fixture(scope="session")
def torch_threads() -> int:
    torch = pytest.importorskip("torch")
    n = int(os.environ.get("BERTH_TORCH_THREADS", "1"))
    torch.set_num_threads(n)
    return n


@pytest.fixture(scope="session")
def smollm2(torch_threads: int) -> LoadedModel:
    """The built-in SmolLM2-135M-Instruct, fp32 on CPU, shared by every test of the session.

    Tests must not change its weights; engines built on it allocate their own KV caches.
    """
    pytest.importorskip("transformers")
    from berth.server.loader import load_model

    return load_model(BUILTIN, dtype="float32", device="cpu", served_name="smollm2")


@pytest.fixture(scope="session")
def chat_ids(smollm2: LoadedModel) -> Callable[[str], list[int]]:
    """Token ids of a one-turn chat prompt (user message, generation prompt) for SmolLM2."""

    def make(text: str, system: str | None = None) -> list[int]:
        messages: list[dict[str, Any]] = []
        if system is not None:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": text})
        out = smollm2.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = out["input_ids"] if not isinstance(out, list) else out
        return [int(i) for i in ids]

    return make
