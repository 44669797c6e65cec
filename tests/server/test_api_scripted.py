"""The real app and serving layers over a scripted engine (the real SmolLM2 tokenizer).

- A generation that fails or is cut off after it started: the engine yields one token, then raises
  (what a failed engine step delivers) or finishes with "abort" (a drain timeout): OpenAI/TGI error
  shapes, not a bare 500, and never a finish_reason that looks complete.
- Tool calls: the engine "generates" a Hermes-format call; the openai SDK gets ``tool_calls``,
  streamed and not.
"""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import pytest
from fastapi.testclient import TestClient
from openai import OpenAI

from berth.server.app import Phase, ServerState, create_app
from berth.server.auth import KeyStore
from berth.server.engine.types import EngineStats, GenerationRequest, ModelInfo, TokenEvent
from berth.server.serving import Serving
from berth.server.settings import ServerSettings

if TYPE_CHECKING:
    from berth.server.engine.types import LoadedModel

pytestmark = pytest.mark.slow


class ScriptedEngine:
    def __init__(
        self, tokenizer: Any, info: ModelInfo, ending: str, pieces: tuple[str, ...] = ("Hi",)
    ) -> None:
        self._tokenizer = tokenizer
        self._info = info
        self.ending = ending
        self.pieces = pieces
        self.prompts: list[str] = []

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def model_info(self) -> ModelInfo:
        return self._info

    def generate(self, req: GenerationRequest) -> AsyncIterator[TokenEvent]:
        n = len(req.prompt_token_ids)

        self.prompts.append(self._tokenizer.decode(req.prompt_token_ids))

        async def events() -> AsyncIterator[TokenEvent]:
            for i, piece in enumerate(self.pieces[:-1]):
                yield TokenEvent(token_id=504, text=piece, num_prompt_tokens=n, num_generated_tokens=i + 1)
            if self.ending == "fail":
                raise RuntimeError("engine step failed: CUDA out of memory")
            finish = "abort" if self.ending == "abort" else "stop"
            k = len(self.pieces)
            yield TokenEvent(
                token_id=504,
                text=self.pieces[-1],
                finish_reason=finish,
                num_prompt_tokens=n,
                num_generated_tokens=k,
            )

        return events()

    def abort(self, request_id: str) -> None:
        pass

    def stats(self) -> EngineStats:
        return EngineStats(
            running=0, waiting=0, kv_cache_usage=0.0, steps=0, num_prefill_tokens=0, num_decode_tokens=0
        )


INFO = ModelInfo(
    served_name="m",
    source="test",
    architecture="LlamaForCausalLM",
    max_model_len=2048,
    dtype="float32",
    device="cpu",
    has_chat_template=True,
    vocab_size=49152,
    eos_token_ids=(2,),
)


def _app(engine: ScriptedEngine) -> TestClient:
    settings = ServerSettings()
    state = ServerState(settings=settings, keys=KeyStore(None, None))
    state.serving = Serving(engine, settings, state.metrics)
    state.set_phase(Phase.READY)
    return TestClient(create_app(state), raise_server_exceptions=False)


@pytest.fixture(params=["fail", "abort"])
def client(request: pytest.FixtureRequest, smollm2: LoadedModel) -> Iterator[tuple[TestClient, str]]:
    # two pieces: the first arrives (headers and the first chunk go out), then the failure
    with _app(ScriptedEngine(smollm2.tokenizer, INFO, request.param, ("Hi", " there"))) as c:
        yield c, request.param


EXPECTED = {
    "fail": (500, "internal_error", "engine step failed: CUDA out of memory"),
    "abort": (503, "aborted", "stopped before it finished"),
}


def test_non_streaming_errors_keep_the_openai_shape(client: tuple[TestClient, str]) -> None:
    c, ending = client
    status, code, text = EXPECTED[ending]
    for path, body in (
        ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/completions", {"model": "m", "prompt": "hi"}),
    ):
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


# ------------------------------------------------------------------------------------ tool calls

TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{% for tc in m.tool_calls or [] %}<tool_call>{{ tc.function | tojson }}</tool_call>{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
CALL_PIECES = (
    "<tool",
    "_call>\n",
    '{"name": "get_weather", ',
    '"arguments": {"city": ',
    '"Paris"}}',
    "\n</tool_call>",
)


@pytest.fixture()
def tool_engine(smollm2: LoadedModel) -> ScriptedEngine:
    tokenizer = copy.deepcopy(smollm2.tokenizer)
    tokenizer.chat_template = TOOL_TEMPLATE
    return ScriptedEngine(tokenizer, INFO, "stop", CALL_PIECES)


def test_tool_call_reaches_the_openai_sdk(tool_engine: ScriptedEngine) -> None:
    with _app(tool_engine) as c:
        sdk = OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=c)
        history = [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": "call_0",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_0", "content": "sunny"},
            {"role": "user", "content": "And Paris?"},
        ]
        reply = sdk.chat.completions.create(model="m", messages=history, tools=[WEATHER])  # type: ignore[arg-type]
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls or []
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {
            "city": "Paris"
        }
        # the tools reached the template, and the earlier call's arguments went in as an object
        assert '"get_weather"' in tool_engine.prompts[-1].split("<|im_end|>")[0]
        assert '"arguments": {"city": "Rome"}' in tool_engine.prompts[-1]

        stream = sdk.chat.completions.create(model="m", messages=history[:1], tools=[WEATHER], stream=True)  # type: ignore[arg-type]
        chunks = list(stream)
        content = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        deltas = [tc for ch in chunks if ch.choices for tc in ch.choices[0].delta.tool_calls or []]
        finishes = [
            ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason
        ]
        assert content == "" and finishes == ["tool_calls"]
        assert [d.function.name for d in deltas if d.function] == ["get_weather"]
        assert json.loads(deltas[0].function.arguments or "") == {"city": "Paris"}  # type: ignore[union-attr]

        # tool_choice "none": the text is returned as it is
        plain = sdk.chat.completions.create(
            model="m", messages=history[:1], tools=[WEATHER], tool_choice="none"
        )  # type: ignore[arg-type]
        assert plain.choices[0].message.tool_calls is None and "<tool_call>" in (
            plain.choices[0].message.content or ""
        )


# ------------------------------------------- the other families' tool formats, and reasoning

FAMILY_TEMPLATES = {
    # what selects each format is the marker its chat template teaches the model
    "glm45": TOOL_TEMPLATE.replace(
        "<tool_call>{{ tc.function | tojson }}</tool_call>", "<arg_key>k</arg_key>"
    ),
    "llama3_json": TOOL_TEMPLATE.replace(
        "<tool_call>{{ tc.function | tojson }}</tool_call>", '{"name": function name, "parameters": dict}'
    ),
    "mistral": TOOL_TEMPLATE.replace("<tool_call>{{ tc.function | tojson }}</tool_call>", "[TOOL_CALLS]"),
}
FAMILY_PIECES = {
    "glm45": (
        "I will look.",
        "<tool_",
        "call>get_weather\n<arg_key>city</arg_",
        "key>\n<arg_value>Paris</arg_value>\n",
        "</tool_call>",
    ),
    "llama3_json": ('{"name": "get_', 'weather", "parameters": ', '{"city": "Paris"}}'),
    "mistral": (
        "I will look.",
        " [TOOL_",
        'CALLS][{"name": "get_weather", ',
        '"arguments": {"city": "Paris"}}]',
    ),
}


@pytest.mark.parametrize("family", sorted(FAMILY_TEMPLATES))
@pytest.mark.parametrize("stream", [False, True])
def test_each_family_format_reaches_the_sdk_as_tool_calls(
    smollm2: LoadedModel, family: str, stream: bool
) -> None:
    tokenizer = copy.deepcopy(smollm2.tokenizer)
    tokenizer.chat_template = FAMILY_TEMPLATES[family]
    engine = ScriptedEngine(tokenizer, INFO, "stop", FAMILY_PIECES[family])
    with _app(engine) as c:
        sdk = OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=c)
        messages: Any = [{"role": "user", "content": "Weather in Paris?"}]
        if stream:
            chunks = list(
                sdk.chat.completions.create(model="m", messages=messages, tools=[WEATHER], stream=True)
            )
            content = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
            calls = [tc for ch in chunks if ch.choices for tc in ch.choices[0].delta.tool_calls or []]
            finish = [
                ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason
            ]
            assert finish == ["tool_calls"]
        else:
            reply = sdk.chat.completions.create(model="m", messages=messages, tools=[WEATHER])
            content = reply.choices[0].message.content or ""
            calls = reply.choices[0].message.tool_calls or []
            assert reply.choices[0].finish_reason == "tool_calls"
    assert [(tc.function.name, json.loads(tc.function.arguments)) for tc in calls] == [  # type: ignore[union-attr]
        ("get_weather", {"city": "Paris"})
    ]
    assert content.strip() == ("" if family == "llama3_json" else "I will look.")


THINK_TEMPLATE = TOOL_TEMPLATE + "{# the model thinks in <think>...</think> first #}"


@pytest.mark.parametrize("stream", [False, True])
def test_reasoning_comes_back_as_reasoning_content(smollm2: LoadedModel, stream: bool) -> None:
    tokenizer = copy.deepcopy(smollm2.tokenizer)
    tokenizer.chat_template = THINK_TEMPLATE
    pieces = ("<thi", "nk>\nFrance's capital", " is Paris.\n</th", "ink>\n\nParis.")
    engine = ScriptedEngine(tokenizer, INFO, "stop", pieces)
    with _app(engine) as c:
        sdk = OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=c)
        messages: Any = [{"role": "user", "content": "Capital of France?"}]
        if stream:
            chunks = list(sdk.chat.completions.create(model="m", messages=messages, stream=True))
            deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
            thought = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
            content = "".join(d.content or "" for d in deltas)
        else:
            msg = sdk.chat.completions.create(model="m", messages=messages).choices[0].message
            thought, content = getattr(msg, "reasoning_content", None) or "", msg.content or ""
    assert thought.strip() == "France's capital is Paris."
    assert content.strip() == "Paris."
