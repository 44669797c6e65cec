"""A generation that fails or is cut off after it started: OpenAI/TGI error shapes, not a bare 500.

The engine is scripted (the real tokenizer, the real app and serving layers): it yields one token,
then either raises (what a failed engine step delivers) or finishes with "abort" (a drain timeout).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import pytest
from fastapi.testclient import TestClient

from berth.server.app import Phase, ServerState, create_app
from berth.server.auth import KeyStore
from berth.server.engine.types import EngineStats, GenerationRequest, ModelInfo, TokenEvent
from berth.server.serving import Serving
from berth.server.settings import ServerSettings

if TYPE_CHECKING:
    from berth.server.loader import LoadedModel

pytestmark = pytest.mark.slow


class ScriptedEngine:
    def __init__(self, tokenizer: Any, info: ModelInfo, ending: str) -> None:
        self._tokenizer = tokenizer
        self._info = info
        self.ending = ending

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def model_info(self) -> ModelInfo:
        return self._info

    def generate(self, req: GenerationRequest) -> AsyncIterator[TokenEvent]:
        n = len(req.prompt_token_ids)

        async def events() -> AsyncIterator[TokenEvent]:
            yield TokenEvent(token_id=504, text="Hi", num_prompt_tokens=n, num_generated_tokens=1)
            if self.ending == "fail":
                raise RuntimeError("engine step failed: CUDA out of memory")
            yield TokenEvent(token_id=None, text="", finish_reason="abort", num_prompt_tokens=n, num_generated_tokens=1)

        return events()

    def abort(self, request_id: str) -> None:
        pass

    def stats(self) -> EngineStats:
        return EngineStats(running=0, waiting=0, kv_cache_usage=0.0, steps=0, num_prefill_tokens=0, num_decode_tokens=0)


@pytest.fixture(params=["fail", "abort"])
def client(request: pytest.FixtureRequest, smollm2: LoadedModel) -> Iterator[tuple[TestClient, str]]:
    info = ModelInfo(served_name="m", source="test", architecture="LlamaForCausalLM", max_model_len=2048,
                     dtype="float32", device="cpu", has_chat_template=True, vocab_size=49152, eos_token_ids=(2,))
    settings = ServerSettings()
    state = ServerState(settings=settings, keys=KeyStore(None, None))
    state.serving = Serving(ScriptedEngine(smollm2.tokenizer, info, request.param), settings, state.metrics)
    state.set_phase(Phase.READY)
    with TestClient(create_app(state), raise_server_exceptions=False) as c:
        yield c, request.param


EXPECTED = {"fail": (500, "internal_error", "engine step failed: CUDA out of memory"),
            "abort": (503, "aborted", "stopped before it finished")}


def test_non_streaming_errors_keep_the_openai_shape(client: tuple[TestClient, str]) -> None:
    c, ending = client
    status, code, text = EXPECTED[ending]
    for path, body in (("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
                       ("/v1/completions", {"model": "m", "prompt": "hi"})):
        r = c.post(path, json=body)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert err["code"] == code and text in err["message"] and err["type"] == "server_error"


def test_tgi_errors_keep_the_tgi_shape(client: tuple[TestClient, str]) -> None:
    c, ending = client
    status, _, text = EXPECTED[ending]
    r = c.post("/generate", json={"inputs": "hi"})
    assert r.status_code == status and text in r.json()["error"] and "error_type" in r.json()


def test_streams_end_with_an_error_event(client: tuple[TestClient, str]) -> None:
    c, ending = client
    _, _, text = EXPECTED[ending]
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with c.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert json.loads(data[0])["choices"][0]["delta"].get("role") == "assistant"
    last = json.loads(data[-1])
    assert text in last["error"]["message"]
    assert not any('"finish_reason":"stop"' in d for d in data)  # a cut-off answer never looks complete
