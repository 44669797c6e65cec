"""The loader: references, errors, HF directories of several architectures, LoRA adapters (merged, side by side).

Models here are tiny random ones written to a temporary directory (no hub); they reuse the
SmolLM2 tokenizer so prompts are real text.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from berth.server.engine import (  # noqa: E402
    EngineConfig,
    EngineCore,
    GenerationRequest,
    SamplingParams,
)
from berth.server.loader import ModelLoadError, load_model, parse_adapter_specs, resolve_reference  # noqa: E402

if TYPE_CHECKING:
    from berth.server.engine.types import LoadedModel

VOCAB = 49152
PROMPT = "The quick brown fox jumps over the lazy dog"


def _config(kind: str) -> Any:
    common: dict[str, Any] = {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "initializer_range": 0.2,  # large weights: clear argmax margins for greedy comparisons
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    if kind == "llama":
        return transformers.LlamaConfig(**common)
    if kind == "qwen2":
        return transformers.Qwen2Config(**common, use_sliding_window=False)
    if kind == "mistral":
        return transformers.MistralConfig(**common, sliding_window=256)
    raise ValueError(kind)


def make_model_dir(root: Path, kind: str, tokenizer: Any) -> Path:
    d = root / f"tiny-{kind}"
    if not d.exists():
        torch.manual_seed(0)
        cfg = _config(kind)
        model = transformers.AutoModelForCausalLM.from_config(cfg)
        model.save_pretrained(d)
        tokenizer.save_pretrained(d)
    return d


def make_adapter(root: Path, base_dir: Path, name: str, seed: int) -> Path:
    d = root / f"adapter-{name}"
    torch.manual_seed(seed)
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        init_lora_weights=False,  # random A and B: the adapter really changes the outputs
        task_type="CAUSAL_LM",
    )
    pm = peft.get_peft_model(base, cfg)
    pm.save_pretrained(d)
    return d


def hf_greedy(model: Any, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
    return [int(t) for t in out[0, len(ids) :].tolist()]


def engine_greedy(m: LoadedModel, prompts: list[tuple[list[int], str | None]], n: int) -> list[list[int]]:
    c = EngineCore(m, EngineConfig(num_blocks=64, block_size=8, max_num_batched_tokens=8))
    p = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    res = c.run([GenerationRequest(str(i), ids, p, adapter=a) for i, (ids, a) in enumerate(prompts)])
    return [[e.token_id for e in res[str(i)] if e.token_id is not None] for i in range(len(prompts))]


@pytest.fixture(scope="module")
def tok(smollm2: LoadedModel) -> Any:
    return smollm2.tokenizer


@pytest.fixture(scope="module")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


# ----------------------------------------------------------------- references
def test_reference_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_reference(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="unsupported model reference"):
        resolve_reference("s3://bucket/model")
    with pytest.raises(ModelLoadError, match="unknown built-in model"):
        resolve_reference("builtin://gpt-17")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match=r"not a .gguf file"):
        resolve_reference(str(tmp_path / "weights.bin"))
    with pytest.raises(ModelLoadError, match=r"no config.json and no .gguf"):
        resolve_reference(str(tmp_path))
    monkeypatch.setenv("BERTH_MODELS_DIR", str(tmp_path))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    assert resolve_reference("pvc://claim/m") == ("hf", tmp_path / "m")
    kind, path = resolve_reference("builtin://smollm2-135m-instruct")
    assert kind == "gguf" and path.suffix == ".gguf" and path.is_file()
    assert parse_adapter_specs(["a=/x", "b=/y"]) == {"a": "/x", "b": "/y"}
    with pytest.raises(ModelLoadError, match="NAME=DIRECTORY"):
        parse_adapter_specs(["oops"])


def test_load_errors(tmp_path: Path, models_root: Path, tok: Any) -> None:
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot load model"):
        load_model(str(tmp_path / "broken"))
    (tmp_path / "bad.gguf").write_bytes(b"GGUF but not really")
    with pytest.raises(ModelLoadError):
        load_model(str(tmp_path / "bad.gguf"))
    d = make_model_dir(models_root, "llama", tok)
    with pytest.raises(ModelLoadError, match="invalid dtype"):
        load_model(str(d), dtype="float8")
    with pytest.raises(ModelLoadError, match="exceeds the model's maximum context of 512"):
        load_model(str(d), max_model_len=4096)
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            load_model(str(d), device="cuda")
    with pytest.raises(ModelLoadError, match=r"adapter 'x'.*adapter_config.json"):
        load_model(str(d), adapters={"x": str(tmp_path)})
    with pytest.raises(ModelLoadError, match="invalid adapter name"):
        load_model(str(d), adapters={"a/b": str(tmp_path), "c": str(tmp_path)})


def test_unsupported_architecture_is_named(tmp_path: Path, tok: Any) -> None:
    """The native forward names what it does not cover; auto serves it on the transformers backend."""
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=64)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ModelLoadError, match=r"GPT2LMHeadModel.*not supported.*--backend transformers"):
        load_model(str(tmp_path / "gpt2"), backend="native")
    m = load_model(str(tmp_path / "gpt2"))
    assert m.backend == "transformers" and m.architecture == "gpt2"
    p = tok.encode(PROMPT)
    assert engine_greedy(m, [(p, None)], 6) == [hf_greedy(m.model, p, 6)]


# ----------------------------------------------------- architectures, adapters
@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_hf_directory_greedy_matches_transformers(models_root: Path, tok: Any, kind: str) -> None:
    d = make_model_dir(models_root, kind, tok)
    m = load_model(str(d), dtype="auto", device="auto", max_model_len=256)
    assert m.architecture == kind and m.served_name == f"tiny-{kind}" and m.max_model_len == 256
    assert m.dtype == torch.float32 and m.device.type == "cpu"
    prompts = [tok.encode(PROMPT), tok.encode("Hello there")]
    got = engine_greedy(m, [(p, None) for p in prompts], 6)
    for p, g in zip(prompts, got, strict=True):
        assert g == hf_greedy(m.model, p, 6)


def test_single_adapter_is_merged(models_root: Path, tok: Any) -> None:
    d = make_model_dir(models_root, "llama", tok)
    a = make_adapter(models_root, d, "solo", seed=1)
    ref_base = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    ref = peft.PeftModel.from_pretrained(ref_base, a)
    ids = tok.encode(PROMPT)
    expected = hf_greedy(ref, ids, 6)
    base_out = hf_greedy(transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32), ids, 6)
    assert expected != base_out  # the adapter matters

    m = load_model(str(d), adapters={"solo": str(a)})
    assert m.merged_adapters == ["solo"] and m.adapters == []
    # the merged adapter answers both as the base name and as "<served>:solo"
    assert engine_greedy(m, [(ids, None), (ids, "solo")], 6) == [expected, expected]


@pytest.mark.parametrize(
    ("kind", "backend"), [("llama", "native"), ("llama", "transformers"), ("olmo2", "transformers")]
)
def test_several_adapters_side_by_side_in_one_batch(
    models_root: Path, tok: Any, kind: str, backend: str
) -> None:
    if kind == "olmo2":  # not a native family: its adapters run as hooks in transformers' own modules
        from tests.server import tiny_models

        d = tiny_models.build(kind, models_root / f"{kind}-{backend}", tok)
    else:
        d = make_model_dir(models_root, kind, tok)
    a = make_adapter(models_root, d, f"one-{kind}-{backend}", seed=1)
    b = make_adapter(models_root, d, f"two-{kind}-{backend}", seed=2)
    ids = tok.encode(PROMPT)
    base = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    exp_base = hf_greedy(base, ids, 6)
    exp_a = hf_greedy(
        peft.PeftModel.from_pretrained(
            transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32), a
        ),
        ids,
        6,
    )
    exp_b = hf_greedy(
        peft.PeftModel.from_pretrained(
            transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32), b
        ),
        ids,
        6,
    )
    assert len({tuple(exp_base), tuple(exp_a), tuple(exp_b)}) == 3

    m = load_model(str(d), adapters={"one": str(a), "two": str(b)}, backend=backend)
    assert m.adapter_names == ["one", "two"] and m.merged_adapters == [] and m.backend == backend
    got = engine_greedy(m, [(ids, "one"), (ids, None), (ids, "two"), (ids, "one")], 6)
    assert got == [exp_a, exp_base, exp_b, exp_a]
    # what vllm:lora_requests_info reports: adapters of the waiting, then the running requests
    c = EngineCore(m, EngineConfig(num_blocks=64, block_size=8, max_num_seqs=1))
    p = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    for i, name in enumerate(["two", None, "one"]):
        c.add(c.make_sequence(GenerationRequest(f"s{i}", ids, p, adapter=name)))
    before = c.stats()
    assert (before.running_adapters, before.waiting_adapters, before.max_lora) == ((), ("one", "two"), 2)
    c.step()
    during = c.stats()  # one runs at a time: "two" first
    assert (during.running_adapters, during.waiting_adapters) == (("two",), ("one",))
