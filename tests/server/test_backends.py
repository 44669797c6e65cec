"""The transformers modeling backend, and the choice of backend.

For tiny random-weight models of many architectures (``tiny_models.py``: GQA and MQA, partial rotary,
sliding windows shorter than the prompts, soft-capping, attention sinks, latent attention, MoE), the
greedy tokens of Berth's engine equal transformers ``generate`` on the same weights: single requests, a
batch of mixed lengths with chunked prefill under a cache small enough to preempt, and prefix-cache hits.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.server import tiny_models

torch = pytest.importorskip("torch")

from berth.server.engine import EngineConfig, EngineCore, GenerationRequest, SamplingParams  # noqa: E402
from berth.server.loader import ModelLoadError, load_model  # noqa: E402

if TYPE_CHECKING:
    from berth.server.engine.types import LoadedModel

pytestmark = pytest.mark.slow
NEW = 10  # tokens generated per request
LENGTHS = (5, 13, 27, 41)  # prompt lengths: longer than the sliding window (8), and chunked (budget 16)


def prompts() -> list[list[int]]:
    return [[1000 + 37 * i + j for j in range(n)] for i, n in enumerate(LENGTHS)]


def greedy(reference: Any, ids: list[int]) -> list[int]:
    with torch.inference_mode():
        out = reference.generate(
            torch.tensor([ids]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0
        )
    return [int(t) for t in out[0, len(ids) :]]


def request(rid: str, ids: list[int]) -> GenerationRequest:
    return GenerationRequest(rid, ids, SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory, smollm2: LoadedModel) -> Callable[..., Path]:
    made: dict[tuple[str, str], Path] = {}

    def make(model_type: str, variant: str = "") -> Path:
        key = (model_type, variant)
        if key not in made:
            overrides = tiny_models.SLIDING[model_type] if variant == "sliding" else None
            where = tmp_path_factory.mktemp(f"{model_type}{variant}")
            made[key] = tiny_models.build(model_type, where, smollm2.tokenizer, overrides)
        return made[key]

    return make


def check_engine(directory: Path, backend: str, expect_backend: str) -> None:
    from transformers import AutoModelForCausalLM

    loaded = load_model(str(directory), dtype="float32", device="cpu", backend=backend)
    assert loaded.backend == expect_backend
    reference = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ps = prompts()
    expected = [greedy(reference, p) for p in ps]
    # 24 blocks of 4 tokens hold fewer than the 4 requests at once: the newest is preempted and recomputed.
    core = EngineCore(
        loaded,
        EngineConfig(num_blocks=24, block_size=4, max_num_batched_tokens=16, prepare_guided=False),
    )
    for i, p in enumerate(ps[:2]):  # alone
        got = core.run([request(f"solo{i}", p)])[f"solo{i}"]
        assert [e.token_id for e in got] == expected[i], f"single request {i}"
    batch = core.run([request(f"b{i}", p) for i, p in enumerate(ps)])
    for i in range(len(ps)):
        assert [e.token_id for e in batch[f"b{i}"]] == expected[i], f"batched request {i}"
    assert core.stats().num_preemptions > 0
    # the same long prompt again: its full blocks come from the prefix cache
    again = core.run([request("again", ps[-1])])["again"]
    assert [e.token_id for e in again] == expected[-1]
    assert again[-1].num_cached_prompt_tokens >= 32
    assert core.stats().kv_cache_usage == 0.0


@pytest.mark.parametrize("model_type", sorted(set(tiny_models.ARCHITECTURES) - set(tiny_models.NATIVE)))
def test_transformers_backend_equals_generate(model_type: str, tiny_dir: Callable[..., Path]) -> None:
    check_engine(tiny_dir(model_type), "auto", "transformers")


@pytest.mark.parametrize("backend", ["native", "transformers"])
@pytest.mark.parametrize("model_type", tiny_models.NATIVE)
def test_native_families_on_both_backends(
    model_type: str, backend: str, tiny_dir: Callable[..., Path]
) -> None:
    check_engine(tiny_dir(model_type), backend, backend)


@pytest.mark.parametrize("model_type", sorted(tiny_models.SLIDING))
def test_sliding_window_prompts_longer_than_the_window(
    model_type: str, tiny_dir: Callable[..., Path]
) -> None:
    """Mistral/Qwen2 with a window: auto takes the transformers backend, correct past the window."""
    check_engine(tiny_dir(model_type, "sliding"), "auto", "transformers")


def test_native_refuses_what_it_does_not_cover(tiny_dir: Callable[..., Path]) -> None:
    with pytest.raises(ModelLoadError, match=r"model_type 'glm4'.*--backend transformers"):
        load_model(str(tiny_dir("glm4")), device="cpu", backend="native")


def test_smollm2_answers_the_same_on_both_backends(
    smollm2: LoadedModel, chat_ids: Callable[..., list[int]]
) -> None:
    from tests.server.test_engine import PROMPTS

    hf = load_model("builtin://smollm2-135m-instruct", dtype="float32", device="cpu", backend="transformers")
    assert hf.backend == "transformers"
    config = EngineConfig(num_blocks=256, block_size=16, prepare_guided=False)
    texts = {}
    for name, model in (("native", smollm2), ("transformers", hf)):
        core = EngineCore(model, config)
        out = core.run(
            [
                GenerationRequest(f"q{i}", chat_ids(p), SamplingParams(max_tokens=24, temperature=0.0))
                for i, p in enumerate(PROMPTS)
            ]
        )
        texts[name] = ["".join(e.text for e in out[f"q{i}"]) for i in range(len(PROMPTS))]
    assert texts["transformers"] == texts["native"]
    assert any("Paris" in t for t in texts["native"])


def _serve_fails(model_dir: Path) -> str:
    import subprocess
    import sys

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "berth.cli",
            "serve",
            "--model",
            str(model_dir),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"berth serve: cannot load model {model_dir}: ModelLoadError: ")
    return last


def test_an_encoder_is_refused_in_one_line(tmp_path: Path, smollm2: LoadedModel) -> None:
    from transformers import AutoConfig, AutoModelForMaskedLM

    tok = smollm2.tokenizer
    config = AutoConfig.for_model(
        "bert",
        vocab_size=len(tok),
        **{
            k: tiny_models.BASE[k]
            for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        },
    )
    AutoModelForMaskedLM.from_config(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    line = _serve_fails(tmp_path)
    assert "model_type 'bert'" in line and "decoder-only" in line


def test_remote_code_is_refused_without_the_flag(tmp_path: Path) -> None:
    import json

    (tmp_path / "config.json").write_text(
        json.dumps(
            {"model_type": "chatglm", "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig"}}
        )
    )
    (tmp_path / "configuration_chatglm.py").write_text("raise SystemExit('remote code ran')\n")
    line = _serve_fails(tmp_path)
    assert "model_type 'chatglm'" in line and "--trust-remote-code" in line


def test_berth_serve_on_the_transformers_backend(
    tmp_path: Path, smollm2: LoadedModel, chat_ids: Callable[..., list[int]]
) -> None:
    """A real `berth serve --backend transformers` answers as the native engine does, and says which it is."""
    import httpx
    from openai import OpenAI

    from berth.server.testing import ServerProcess

    native = EngineCore(smollm2, EngineConfig(num_blocks=128, block_size=16, prepare_guided=False))
    ids = chat_ids("What is the capital of France?")
    want = "".join(
        e.text
        for e in native.run([GenerationRequest("n", ids, SamplingParams(max_tokens=20, temperature=0.0))])[
            "n"
        ]
    )
    with ServerProcess(
        ["--backend", "transformers", "--device", "cpu", "--dtype", "float32", "--served-model-name", "smol"],
        tmp_path,
    ) as server:
        sdk = OpenAI(base_url=f"{server.base_url}/v1", api_key="unused")
        reply = sdk.chat.completions.create(
            model="smol",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=20,
            temperature=0,
        )
        assert reply.choices[0].message.content == want and "Paris" in want
        assert httpx.get(f"{server.base_url}/info").json()["backend"] == "transformers"
        assert getattr(sdk.models.list().data[0], "backend", None) == "transformers"
    assert "backend transformers: asked for" in server.stderr()
