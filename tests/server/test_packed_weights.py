"""The native forward with packed lower-precision weights on CPU (runner/packed.py), on SmolLM2.

Tolerances, on this fixed prompt set (greedy, EOS ignored): fp16 weights give the fp32 tokens exactly
(measured: 4 prompts x 32 tokens identical); int8 (dynamic activation quantization) only keeps the
start of a known answer (measured: 19 of 32 tokens on the capital question, 0-4 on others).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from berth.server.engine.types import LoadedModel

PROMPTS = ["What is the capital of France?", "Name three colors of the rainbow."]


def _greedy(model: LoadedModel, prompts: list[list[int]], fmt: str, n: int) -> list[list[int]]:
    from berth.server.engine import EngineConfig, EngineCore, GenerationRequest, SamplingParams

    core = EngineCore(model, EngineConfig(max_num_seqs=8, prepare_guided=False, weight_format=fmt))
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    out = core.run(GenerationRequest(f"{fmt}-{i}", p, params) for i, p in enumerate(prompts))
    return [[e.token_id for e in out[f"{fmt}-{i}"] if e.token_id is not None] for i in range(len(prompts))]


def test_packed_weights_within_tolerance(smollm2: LoadedModel, chat_ids: Callable[..., list[int]]) -> None:
    prompts = [chat_ids(q) for q in PROMPTS]
    ref = _greedy(smollm2, prompts, "none", 16)
    assert all(len(r) == 16 for r in ref)
    assert _greedy(smollm2, prompts, "fp16", 16) == ref
    int8 = _greedy(smollm2, prompts, "int8", 16)
    assert int8[0][:8] == ref[0][:8]
    assert "Paris" in smollm2.tokenizer.decode(int8[0])


def test_unknown_weight_format_is_refused(smollm2: LoadedModel) -> None:
    from berth.server.engine.runner import ModelRunner, UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="unknown weight format 'int3'"):
        ModelRunner(smollm2.model, num_blocks=4, block_size=16, weight_format="int3")
