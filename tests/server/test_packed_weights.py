"""Weight formats of the native forward on CPU (runner/packed.py, `berth serve --weight-format`), on SmolLM2.

Tolerances, on this fixed prompt set (greedy, EOS ignored, 16 tokens each):
- fp32 (the default of EngineConfig) and fp16 (weights rounded, fp32 compute): the fp32 tokens exactly
  (measured: 8 prompts x 32 tokens identical); ``auto`` picks one of these two, so it is exact too.
- bf16 (weights and activations rounded): at least 3 of the 4 prompts keep their first 8 tokens (measured on
  8 x 32: matching prefixes 32, 0, 29, 32, 22, 32, 32, 32; the capital answer is lost from its first token).
- int8 (dynamic activation quantization): only the start of the known answer (measured: 19 of 32 tokens on
  the capital question, 0-4 on others), so the test asks its first 8 tokens and "Paris".
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from berth.server.engine.types import LoadedModel

PROMPTS = [
    "What is the capital of France?",
    "Name three colors of the rainbow.",
    "Hi",
    "Explain in simple words why the sky is blue.",
]


def _core(model: LoadedModel, fmt: str) -> object:
    from berth.server.engine import EngineConfig, EngineCore

    return EngineCore(model, EngineConfig(max_num_seqs=8, prepare_guided=False, weight_format=fmt))


def _greedy(model: LoadedModel, prompts: list[list[int]], fmt: str, n: int) -> list[list[int]]:
    from berth.server.engine import EngineCore, GenerationRequest, SamplingParams

    core = _core(model, fmt)
    assert isinstance(core, EngineCore)
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    out = core.run(GenerationRequest(f"{fmt}-{i}", p, params) for i, p in enumerate(prompts))
    return [[e.token_id for e in out[f"{fmt}-{i}"] if e.token_id is not None] for i in range(len(prompts))]


def _prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@pytest.fixture(scope="module")
def reference(
    smollm2: LoadedModel, chat_ids: Callable[..., list[int]]
) -> tuple[list[list[int]], list[list[int]]]:
    prompts = [chat_ids(q) for q in PROMPTS]
    ref = _greedy(smollm2, prompts, "fp32", 16)
    assert all(len(r) == 16 for r in ref)
    return prompts, ref


def test_fp16_and_the_old_name_of_fp32_equal_fp32(
    smollm2: LoadedModel, reference: tuple[list[list[int]], list[list[int]]]
) -> None:
    prompts, ref = reference
    assert _greedy(smollm2, prompts, "fp16", 16) == ref
    assert _greedy(smollm2, prompts[:1], "none", 16) == ref[:1]


def test_auto_picks_an_exact_format_and_says_why(
    smollm2: LoadedModel, reference: tuple[list[list[int]], list[list[int]]], caplog: pytest.LogCaptureFixture
) -> None:
    from berth.server.engine import EngineCore

    prompts, ref = reference
    with caplog.at_level("INFO", logger="berth.server.engine.runner.model_runner"):
        core = _core(smollm2, "auto")
    assert isinstance(core, EngineCore)
    runner = core.runner
    assert runner.weight_format in ("fp32", "fp16")
    assert "batch 1: fp32 " in runner.weight_format_reason and "fp16 " in runner.weight_format_reason
    assert f"weight format {runner.weight_format}: auto: " in caplog.text
    assert _greedy(smollm2, prompts, "auto", 16) == ref


def test_auto_keeps_fp32_where_torch_cannot_pack_fp16(
    smollm2: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Debian's torch (the server-cpu image) has no fbgemm: fp16 packing raises there, and auto must
    serve fp32 rather than fail to start."""
    import torch

    from berth.server.engine import EngineCore

    def no_fp16(w: torch.Tensor, b: torch.Tensor | None) -> None:
        raise RuntimeError("quantized::linear_prepack_fp16 is currently not supported by ONEDNN")

    monkeypatch.setattr(torch.ops.quantized, "linear_prepack_fp16", no_fp16)
    core = _core(smollm2, "auto")
    assert isinstance(core, EngineCore)
    assert core.runner.weight_format == "fp32"
    assert (
        "cannot pack fp16 weights (quantized::linear_prepack_fp16 is currently not supported by ONEDNN)"
        in (core.runner.weight_format_reason)
    )


def test_lossy_formats_within_tolerance(
    smollm2: LoadedModel, reference: tuple[list[list[int]], list[list[int]]]
) -> None:
    prompts, ref = reference
    int8 = _greedy(smollm2, prompts, "int8", 16)
    assert int8[0][:8] == ref[0][:8]
    assert "Paris" in smollm2.tokenizer.decode(int8[0])
    assert int8 != ref  # the tolerance is real: int8 is not exact on this set
    bf16 = _greedy(smollm2, prompts, "bf16", 16)
    assert sum(_prefix(a, b) >= 8 for a, b in zip(bf16, ref, strict=True)) >= 3


def test_choose_keeps_full_precision_unless_fp16_is_clearly_faster() -> None:
    from berth.server.engine.runner.packed import choose

    assert choose({"fp32": {1: 0.05, 8: 0.08}, "fp16": {1: 0.02, 8: 0.04}})[0] == "fp16"
    fmt, why = choose({"fp32": {1: 0.05, 8: 0.08}, "fp16": {1: 0.02, 8: 0.078}})
    assert fmt == "fp32" and "batch 8: fp32 80.0 ms, fp16 78.0 ms" in why
    assert choose({"fp32": {1: 0.05}, "fp16": {1: 0.046}})[0] == "fp32"


def test_unknown_weight_format_is_refused(smollm2: LoadedModel) -> None:
    from berth.server.engine.runner import ModelRunner, UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="unknown weight format 'int3'"):
        ModelRunner(smollm2.model, num_blocks=4, block_size=16, weight_format="int3")


def test_packed_formats_need_the_native_backend(smollm2: LoadedModel) -> None:
    import dataclasses

    from berth.server.engine import EngineConfig, EngineCore

    hf = dataclasses.replace(smollm2, backend="transformers")
    with pytest.raises(ValueError, match="weight format int8 needs the native backend"):
        EngineCore(hf, EngineConfig(num_blocks=8, prepare_guided=False, weight_format="int8"))
    core = EngineCore(hf, EngineConfig(num_blocks=8, prepare_guided=False, weight_format="auto"))
    assert type(core.runner).__name__ == "TransformersRunner"


def test_serve_flag() -> None:
    from berth.server.settings import ServerSettings, settings_from_args

    assert ServerSettings().weight_format == "auto"
    assert settings_from_args(["--weight-format", "int8"]).weight_format == "int8"
    with pytest.raises(SystemExit):
        settings_from_args(["--weight-format", "int4"])
