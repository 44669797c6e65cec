"""HTTP layer without a model: auth, error shapes, parameter validation, health while loading."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from berth.server.app import Phase, ServerState, create_app
from berth.server.auth import KeyStore
from berth.server.settings import ServerSettings

KEY = "sk-test-123"


@pytest.fixture()
def client() -> Iterator[TestClient]:
    state = ServerState(settings=ServerSettings(), keys=KeyStore(None, f"tester:{KEY}"))
    with TestClient(create_app(state)) as c:
        c.headers["Authorization"] = f"Bearer {KEY}"
        yield c


def _error(resp) -> dict:  # type: ignore[no-untyped-def]
    body = resp.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]  # type: ignore[no-any-return]


def test_health_open_and_not_ready_while_loading(client: TestClient) -> None:
    del client.headers["Authorization"]
    assert client.get("/health/live").status_code == 200
    r = client.get("/health/ready")
    assert r.status_code == 503 and r.json() == {"ready": False, "status": Phase.LOADING.value}
    r = client.get("/metrics")
    assert r.status_code == 200 and "berth_ready 0.0" in r.text


@pytest.mark.parametrize("path", ["/v1/models", "/info"])
@pytest.mark.parametrize("header", [None, "Bearer wrong", f"Basic {KEY}"])
def test_401_in_openai_shape(client: TestClient, path: str, header: str | None) -> None:
    del client.headers["Authorization"]
    headers = {"Authorization": header} if header else {}
    r = client.get(path, headers=headers)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    err = _error(r)
    assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error"
    assert KEY not in r.text


def test_401_for_generate(client: TestClient) -> None:
    r = client.post("/generate", json={"inputs": "hi"}, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and _error(r)["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 0}, "n"),
        ({"presence_penalty": -3}, "presence_penalty"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_logprobs": 50, "logprobs": True}, "top_logprobs"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"stream": "sometimes"}, "stream"),
        ({"stream_options": {"include_usage": "maybe"}}, "stream_options.include_usage"),
    ],
)
def test_400_names_the_bad_parameter(client: TestClient, body: dict, param: str) -> None:  # type: ignore[type-arg]
    payload = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **body}
    r = client.post("/v1/chat/completions", json=payload)
    assert r.status_code == 400, r.text
    err = _error(r)
    assert err["param"] == param
    assert err["type"] == "invalid_request_error"


def test_unknown_route_and_method_in_openai_shape(client: TestClient) -> None:
    r = client.post("/v1/embeddings", json={"input": "x"})
    assert (
        r.status_code == 404 and _error(r)["code"] == "not_found" and "/v1/embeddings" in _error(r)["message"]
    )
    r = client.delete("/v1/chat/completions")
    assert r.status_code == 405 and _error(r)["code"] == "method_not_allowed" and "POST" in r.headers["allow"]


def test_invalid_json_body(client: TestClient) -> None:
    r = client.post("/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    assert _error(r)["param"] == "body"


def test_tgi_validation_error_shape(client: TestClient) -> None:
    r = client.post("/generate", json={"inputs": "hi", "parameters": {"temperature": 0}})
    assert r.status_code == 422
    assert r.json()["error_type"] == "validation"


def test_generation_503_until_ready(client: TestClient) -> None:
    r = client.post("/v1/completions", json={"model": "m", "prompt": "hi"})
    assert r.status_code == 503
    assert _error(r)["code"] == "not_ready"
    assert "retry-after" in r.headers


def test_access_log_line_for_a_refused_request(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    import json

    caplog.set_level("INFO", logger="berth.access")
    client.post("/v1/chat/completions", json={"messages": []}, headers={"Authorization": "Bearer sk-nope"})
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "berth.access"]
    assert len(lines) == 1
    line = lines[0]
    assert line["status"] == 401 and line["key_id"] == "-" and line["route"] == "/v1/chat/completions"
    assert "sk-nope" not in caplog.text and KEY not in caplog.text


def test_log_content_only_when_asked() -> None:
    from berth.server.serving import RequestContext

    ctx = RequestContext(
        route="/v1/completions", key_id="k", prompt_text="secret prompt", completion_text="answer"
    )
    assert "prompt" not in ctx.log_fields(log_content=False)
    assert "completion" not in ctx.log_fields(log_content=False)
    fields = ctx.log_fields(log_content=True)
    assert fields["prompt"] == "secret prompt" and fields["completion"] == "answer"
