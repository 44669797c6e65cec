"""The ``gguf`` weight format (runner/gguf_q4.py, `berth serve --weight-format gguf`): the built-in SmolLM2 GGUF's
Q4_1 linear weights (and its Q8_0 LM head) served without dequantizing: in Berth's AVX2 kernels
(runner/cpu_kernels.py) where they build, else as int4pack (the head then fp16).

Tolerances, stated and measured (AMD EPYC, torch 2.15):
- one int4pack linear against ``x @ W^T`` with W the dequantized GGUF weight the model holds: float32
  activations max abs error <= 1e-5 of the output's largest value (measured 1.7e-5 of 27, 6e-7 relative); bfloat16
  activations (what int4pack serves) relative error (Frobenius) <= 1% (measured 0.3%), and not exact. A kernel
  linear (activations as two int8 digits per block of 32): relative error <= 1e-3 (tests/server/test_cpu_kernels.py).
- the whole model, greedy, on the fixed prompt set of test_packed_weights.py (16 tokens, EOS ignored): at
  least 3 of the 4 prompts equal fp32's tokens, every prompt keeps its first 8 (int4pack, measured on 8 prompts x
  32 tokens on the AVX-512 EPYC: matching prefixes 32, 32, 32, 32, 32, 32, 24, 32; the bf16 format on the same set:
  0, 29, 32, 32, 32, 6, 32, 32; the kernels on the AVX2 EPYC: see docs/server.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from berth.server.engine.types import LoadedModel
from tests.server.test_packed_weights import PROMPTS, _greedy, _prefix


def _kernels() -> bool:
    """Whether the gguf format runs in Berth's CPU kernels here (CI builds them: a failure there, not a fallback)."""
    import os

    from berth.server.engine.runner import cpu_kernels

    if os.environ.get("CI") == "true":
        assert cpu_kernels.library() is not None, cpu_kernels.why_not()
    return cpu_kernels.library() is not None


def _q4_class() -> type:
    from berth.server.engine.runner.packed import Int4Linear, KernelQ4Linear

    return KernelQ4Linear if _kernels() else Int4Linear


@pytest.fixture
def attached(smollm2: LoadedModel) -> Iterator[str]:
    """The GGUF weights attached to the shared model's modules for one test (detached after: it is shared)."""
    from berth.server.engine.runner import gguf_q4

    try:
        yield gguf_q4.attach(smollm2.model)
    finally:
        gguf_q4.detach(smollm2.model)


def _q4(mod: Any) -> Any:
    """The module's GGUF 4-bit weight, read from the file (attach leaves where to read it, not the codes)."""
    from berth.server.engine.runner.packed import Q4_ATTR, Q4Source

    source = getattr(mod, Q4_ATTR)
    assert isinstance(source, Q4Source)
    return source.load()


def test_the_gguf_blocks_are_the_loaded_weights_after_undoing_the_row_permutation(
    smollm2: LoadedModel, attached: str
) -> None:
    import torch

    from berth.server.engine.runner import gguf_q4

    if _kernels():
        assert attached == (
            "210 linear weights served from the GGUF file's 4-bit blocks and 1 from its Q8_0 blocks "
            "(Berth's AVX2 kernels, group 32, int8 activations)"
        )
        head = smollm2.model.lm_head
        assert (
            _q4(head).dequantize() - head.weight
        ).abs().max().item() <= 1e-6 * head.weight.abs().max().item()
    else:
        assert attached.startswith("210 linear weights served from the GGUF file's 4-bit blocks (int4pack")
        assert "as fp16: lm_head (Q8_0, no kernel" in attached
    attn = smollm2.model.model.layers[5].self_attn
    for mod in (attn.q_proj, attn.k_proj, attn.v_proj, smollm2.model.model.layers[5].mlp.down_proj):
        w = mod.weight.detach()
        assert (_q4(mod).dequantize() - w).abs().max().item() <= 1e-6 * w.abs().max().item()
    # In the file, q and k rows are in llama.cpp's rotary order: permuting them back is what makes them match.
    q = _q4(attn.q_proj)
    scrambled = gguf_q4.unpermute_rows(q, 9)
    assert (scrambled.dequantize() - attn.q_proj.weight).abs().max().item() > 0.01
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) == 15 and q.m is not None  # Q4_1: d q + m


def test_a_served_linear_equals_the_dequantized_linear_within_tolerance(
    smollm2: LoadedModel, attached: str
) -> None:
    import torch

    from berth.server.engine.runner.packed import Int4Linear, KernelQ4Linear, KernelQ8Linear, pack_modules

    layer = smollm2.model.model.layers[3]
    torch.manual_seed(0)
    for mods in (
        [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj],
        [layer.mlp.gate_proj, layer.mlp.up_proj],
        [layer.mlp.down_proj],
    ):
        x = torch.randn(7, mods[0].weight.shape[1])
        ref = torch.cat([m(x) for m in mods], dim=-1)
        exact = Int4Linear([_q4(m) for m in mods], None, torch.float32)(x)
        assert (exact - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
        served = pack_modules(mods, "gguf")
        assert isinstance(served, _q4_class())
        for lin in (served, Int4Linear([_q4(m) for m in mods], None)):
            y = lin(x)
            assert y.dtype == torch.float32 and y.shape == ref.shape
            rel = ((y - ref).norm() / ref.norm()).item()
            assert rel <= 1e-3 if isinstance(lin, KernelQ4Linear) else 1e-5 < rel <= 0.01, rel
    if _kernels():  # the tied LM head, from its Q8_0 blocks, on the model's own hidden states
        head = smollm2.model.lm_head
        served = pack_modules([head], "gguf")
        assert isinstance(served, KernelQ8Linear)
        x = smollm2.model.model.norm(smollm2.model.model.embed_tokens(torch.arange(7)))
        ref = head(x)
        assert ((served(x) - ref).norm() / ref.norm()).item() <= 1e-3


def test_greedy_output_within_tolerance_of_fp32(
    smollm2: LoadedModel,
    chat_ids: Callable[..., list[int]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    from berth.server.engine import EngineConfig, EngineCore
    from berth.server.engine.runner.packed import Q4_ATTR, KernelQ8Linear

    prompts = [chat_ids(q) for q in PROMPTS]
    ref = _greedy(smollm2, prompts, "fp32", 16)
    with caplog.at_level("INFO", logger="berth.server.engine.runner.model_runner"):
        out = _greedy(smollm2, prompts, "gguf", 16)
    assert "weight format gguf: 210 linear weights served from the GGUF file's 4-bit blocks" in caplog.text
    prefixes = [_prefix(a, b) for a, b in zip(out, ref, strict=True)]
    assert sum(p == 16 for p in prefixes) >= 3 and min(prefixes) >= 8, prefixes
    assert "Paris" in smollm2.tokenizer.decode(out[0])
    core = EngineCore(smollm2, EngineConfig(num_blocks=8, prepare_guided=False, weight_format="gguf"))
    runner: Any = core.runner
    assert runner.weight_format == "gguf"
    q4 = _q4_class()
    assert runner.fused is not None and all(
        isinstance(f.qkv, q4) and isinstance(f.gate_up, q4) for f in runner.fused
    )
    assert isinstance(runner.fused[0].o, q4) and isinstance(runner.fused[0].down, q4)
    if _kernels():
        assert isinstance(runner.packed_head, KernelQ8Linear) and runner.uses_cpu_kernels
    else:
        assert runner.packed_head.fmt == "fp16" and not runner.uses_cpu_kernels
    # The shared model is left as it was: no GGUF weights stay attached to its modules.
    assert not any(hasattr(m, Q4_ATTR) for m in smollm2.model.modules())


def test_a_model_not_loaded_from_gguf_is_refused_naming_the_flag(
    tmp_path: Path, smollm2: LoadedModel
) -> None:
    from berth.server.engine import EngineConfig, EngineCore
    from berth.server.loader import load_model
    from tests.server import tiny_models

    directory = tiny_models.build("llama", tmp_path / "tiny", smollm2.tokenizer)
    tiny = load_model(str(directory), dtype="float32", device="cpu")
    with pytest.raises(ValueError, match=r"weight format gguf \(--weight-format gguf\) serves the 4-bit"):
        EngineCore(tiny, EngineConfig(num_blocks=8, prepare_guided=False, weight_format="gguf"))


def test_a_weight_that_is_not_the_files_is_not_served_from_it(smollm2: LoadedModel) -> None:
    from berth.server.engine.runner import gguf_q4

    mod = smollm2.model.model.layers[0].mlp.up_proj
    q4 = gguf_q4.read_q4("Q4_1", _tensor(smollm2, "blk.0.ffn_up.weight").data)  # not row-permuted
    assert gguf_q4._matches(q4, mod.weight)
    assert not gguf_q4._matches(q4, mod.weight * 1.01)


def _tensor(model: LoadedModel, name: str) -> Any:
    from gguf import GGUFReader

    from berth.server.engine.runner.gguf_q4 import GGUF_SOURCE

    reader = GGUFReader(getattr(model.model, GGUF_SOURCE))
    return next(t for t in reader.tensors if t.name == name)


def test_serve_flag() -> None:
    from berth.server.settings import settings_from_args

    assert settings_from_args(["--weight-format", "gguf"]).weight_format == "gguf"


@pytest.mark.slow
def test_berth_serve_with_the_gguf_format_answers_a_chat_request(tmp_path: Path) -> None:
    from berth.server.testing import ServerProcess

    key = "sk-gguf-test"
    proc = ServerProcess(
        [
            "--weight-format",
            "gguf",
            "--device",
            "cpu",
            "--max-num-seqs",
            "2",
            "--served-model-name",
            "smollm2",
        ],
        log_dir=tmp_path,
        env={"BERTH_API_KEYS": f"t:{key}", "OMP_NUM_THREADS": "1"},
    )
    with proc:
        body = {
            "model": "smollm2",
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 8,
            "temperature": 0,
        }
        r = httpx.post(
            f"{proc.base_url}/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {key}"},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        assert "Paris" in r.json()["choices"][0]["message"]["content"]
        assert (
            "weight format gguf: 210 linear weights served from the GGUF file's 4-bit blocks" in proc.stderr()
        )


def test_side_by_side_adapters_run_on_the_gguf_weights(
    smollm2: LoadedModel, chat_ids: Callable[..., list[int]]
) -> None:
    """Steps with adapter rows take the unfused path: its per-module 4-bit linears give the fused path's
    tokens under a zero adapter, and a random adapter changes them."""
    import dataclasses

    import torch

    from berth.server.engine import EngineConfig, EngineCore, GenerationRequest, SamplingParams
    from berth.server.engine.types import LoraWeights

    torch.manual_seed(0)
    layers = range(int(smollm2.model.config.num_hidden_layers))
    zero = {(li, "v_proj"): (torch.randn(4, 576), torch.zeros(192, 4)) for li in layers}
    rand = {(li, "v_proj"): (torch.randn(4, 576), torch.randn(192, 4)) for li in layers}
    model = dataclasses.replace(
        smollm2, adapters=[LoraWeights("zero", 1.0, zero), LoraWeights("rand", 1.0, rand)]
    )
    core = EngineCore(model, EngineConfig(max_num_seqs=4, prepare_guided=False, weight_format="gguf"))
    runner: Any = core.runner
    assert all(isinstance(runner.packed[(li, "v_proj")], _q4_class()) for li in layers)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    prompt = chat_ids(PROMPTS[0])

    def tokens(*reqs: GenerationRequest) -> dict[str, list[int]]:
        out = core.run(reqs)
        return {k: [e.token_id for e in v if e.token_id is not None] for k, v in out.items()}

    base = tokens(GenerationRequest("base", prompt, params))["base"]
    both = tokens(
        GenerationRequest("zero", prompt, params, adapter="zero"),
        GenerationRequest("rand", prompt, params, adapter="rand"),
    )
    assert len(base) == 8 and both["zero"] == base
    assert both["rand"] != base


@pytest.mark.slow
def test_a_merged_adapter_is_not_served_from_the_file(tmp_path: Path) -> None:
    """One adapter is merged into the weights at load: those are no longer the file's, so gguf refuses."""
    from berth.server.engine import EngineConfig, EngineCore
    from berth.server.engine.runner.gguf_q4 import GGUF_SOURCE
    from berth.server.loader import load_model
    from tests.server.test_api_real import _make_lora_adapters

    (directory,) = _make_lora_adapters(tmp_path, ["only"]).values()
    merged = load_model(
        "builtin://smollm2-135m-instruct", dtype="float32", device="cpu", adapters={"only": str(directory)}
    )
    assert merged.merged_adapters == ["only"] and not hasattr(merged.model, GGUF_SOURCE)
    with pytest.raises(ValueError, match="or an adapter was merged into its weights"):
        EngineCore(merged, EngineConfig(num_blocks=8, prepare_guided=False, weight_format="gguf"))


def _tensor_bytes(model: Any) -> int:
    """Bytes of the model's parameters and buffers that hold storage (not ``meta``), each storage once."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if t.device.type != "meta":
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def test_bits_per_weight_of_the_4_bit_linears(smollm2: LoadedModel, attached: str) -> None:
    from berth.server.engine.runner.packed import Int4Linear, pack_modules

    mlp = smollm2.model.model.layers[2].mlp
    n, k = 2 * mlp.gate_proj.weight.shape[0], mlp.gate_proj.weight.shape[1]
    int4 = Int4Linear([_q4(mlp.gate_proj), _q4(mlp.up_proj)], None)
    held = int4.packed.untyped_storage().nbytes() + int4.scale_zeros.untyped_storage().nbytes()
    # 4 bits of code + a bf16 scale and zero per group of 32 (the file's Q4_1 is 5 bits as well)
    assert held * 8 / (n * k) == 5.0
    served = pack_modules([mlp.gate_proj, mlp.up_proj], "gguf")
    if _kernels():  # 4 bits of code + a float32 scale and minimum per group of 32
        assert served.packed.untyped_storage().nbytes() * 8 / (n * k) == 6.0


def test_packing_reads_the_gguf_codes_one_packed_linear_at_a_time(
    smollm2: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """attach leaves where to read each weight, not its codes: at most one fused linear's codes (q|k|v: three)
    are alive at once while the engine packs, not the 210 linears' (as when attach held them all)."""
    import weakref

    from berth.server.engine import EngineConfig, EngineCore
    from berth.server.engine.runner import gguf_q4

    alive: list[weakref.ref[Any]] = []
    peak = 0
    read = gguf_q4.read_q4

    def tracked(kind: str, data: Any) -> Any:
        nonlocal peak
        q4 = read(kind, data)
        alive.append(weakref.ref(q4.codes))
        peak = max(peak, sum(r() is not None for r in alive))
        return q4

    monkeypatch.setattr(gguf_q4, "read_q4", tracked)
    EngineCore(smollm2, EngineConfig(num_blocks=8, prepare_guided=False, weight_format="gguf"))
    assert len(alive) == 2 * 210  # each served weight read twice: checked at attach, then packed
    assert peak <= 3, peak


def test_released_float_weights_leave_the_packs_only(
    smollm2: LoadedModel, chat_ids: Callable[..., list[int]]
) -> None:
    """With release_packed_weights (berth serve) the float weights of the packed linears are freed: the model
    keeps its embedding (the tied LM head's weight), norms and rotary buffers, and generates the same tokens."""
    from berth.server.engine import EngineConfig, EngineCore, GenerationRequest, SamplingParams
    from berth.server.loader import load_model

    own = load_model("builtin://smollm2-135m-instruct", dtype="float32", device="cpu", served_name="smollm2")
    before = _tensor_bytes(own.model)
    config = EngineConfig(
        max_num_seqs=8, prepare_guided=False, weight_format="gguf", release_packed_weights=True
    )
    core = EngineCore(own, config)
    after = _tensor_bytes(own.model)
    inner = own.model.model
    linears = [m for layer in inner.layers for m in layer.modules() if m.__class__.__name__ == "Linear"]
    assert len(linears) == 210 and all(m.weight.device.type == "meta" for m in linears)
    assert tuple(linears[0].weight.shape) == (576, 576)  # the shapes stay readable
    assert own.model.lm_head.weight is inner.embed_tokens.weight  # tied: the embedding is kept
    assert inner.embed_tokens.weight.device.type == "cpu"
    embedding = inner.embed_tokens.weight.numel() * 4
    assert before > 4 * embedding and embedding <= after < embedding * 1.01, (before, after, embedding)

    prompts = [chat_ids(q) for q in PROMPTS]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    out = core.run(GenerationRequest(f"r{i}", p, params) for i, p in enumerate(prompts))
    released = [[e.token_id for e in out[f"r{i}"] if e.token_id is not None] for i in range(len(prompts))]
    assert released == _greedy(smollm2, prompts, "gguf", 16)  # the shared model's weights are its own


def test_berth_serve_releases_the_packed_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server loads its model for its engine alone, so it asks for the release; EngineConfig's default keeps
    the weights (engines built on one shared model, as the tests and bench/cpu_weight_formats.py do)."""
    from berth.server import engine, loader
    from berth.server.engine import EngineConfig
    from berth.server.main import Runtime
    from berth.server.settings import settings_from_args

    assert EngineConfig().release_packed_weights is False
    configs: list[EngineConfig] = []

    class FakeEngine:
        def __init__(self, model: Any, config: EngineConfig) -> None:
            configs.append(config)

        def start(self) -> None:
            pass

    monkeypatch.setattr(loader, "load_model", lambda *a, **kw: object())
    monkeypatch.setattr(engine, "Engine", FakeEngine)
    Runtime(settings_from_args(["--weight-format", "gguf", "--threads", "auto"]))._build_engine()
    assert [(c.weight_format, c.release_packed_weights) for c in configs] == [("gguf", True)]


def test_without_the_kernels_the_4_bit_blocks_go_to_int4pack_and_the_log_says_why(
    smollm2: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    from berth.server.engine.runner import cpu_kernels, gguf_q4
    from berth.server.engine.runner.packed import Q4_ATTR, Int4Linear, PackedLinear, pack_modules

    monkeypatch.setenv("BERTH_CPU_KERNELS", "0")
    cpu_kernels._loaded.cache_clear()
    try:
        summary = gguf_q4.attach(smollm2.model)
        try:
            assert summary == (
                "210 linear weights served from the GGUF file's 4-bit blocks (int4pack, group 32, bf16 "
                "activations; Berth's CPU kernels: BERTH_CPU_KERNELS=0); as fp16: lm_head (Q8_0, no kernel)"
            )
            mlp = smollm2.model.model.layers[0].mlp
            assert isinstance(pack_modules([mlp.gate_proj, mlp.up_proj], "gguf"), Int4Linear)
            assert not hasattr(smollm2.model.lm_head, Q4_ATTR)
            head = pack_modules([smollm2.model.lm_head], "gguf")
            assert type(head) is PackedLinear and head.fmt == "fp16"
        finally:
            gguf_q4.detach(smollm2.model)
    finally:
        monkeypatch.delenv("BERTH_CPU_KERNELS")
        cpu_kernels._loaded.cache_clear()
