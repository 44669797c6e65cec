"""The gateway against fake instances on loopback: routing, isolation, retry, streaming, quotas, usage."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from typing import Any

import httpx
import pytest

from berth.gateway.registry import Key, Limits, hash_key, instance_credential
from tests.gateway.conftest import KEY_A, KEY_B, Env, free_port


def settled_usage(env: Env, requests: int) -> Any:
    """The usage delta once `requests` requests finished (a stream's bookkeeping runs just after its
    last byte left, so a client can be faster than it)."""
    deadline = time.monotonic() + 5
    got: dict[Any, Any] = {}
    while time.monotonic() < deadline:
        for k, d in env.gw.usage.take().items():
            if k in got:
                got[k].add(d)
            else:
                got[k] = d
        if ("team-a", "ci") in got and got[("team-a", "ci")].requests >= requests:
            return got[("team-a", "ci")]
        time.sleep(0.01)
    raise AssertionError(f"usage did not settle: {got}")


def post(
    env: Env, body: dict[str, Any], key: str = KEY_A, path: str = "/v1/chat/completions"
) -> httpx.Response:
    return httpx.post(
        env.server.url + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=10
    )


def stream(
    env: Env, body: dict[str, Any], path: str = "/v1/chat/completions", headers: dict[str, str] | None = None
) -> contextlib.AbstractContextManager[httpx.Response]:
    """A streamed POST with team-a's key (and ``headers``): ``with stream(...) as r``."""
    auth = {"Authorization": f"Bearer {KEY_A}", **(headers or {})}
    return httpx.stream("POST", env.server.url + path, json=body, headers=auth, timeout=10)


def test_routes_full_and_bare_names_and_adapters(env: Env) -> None:
    a = env.add_upstream("team-a", "chat", "team-a/chat/0")
    c = env.add_upstream("team-a", "coder", "team-a/coder/0")
    b = env.add_upstream("team-b", "chat", "team-b/chat/0")
    assert post(env, {"model": "team-a/chat"}).json()["served_by"] == "team-a/chat/0"
    assert post(env, {"model": "chat"}).json()["served_by"] == "team-a/chat/0"
    assert post(env, {"model": "chat:sql"}).json()["model"] == "chat:sql"
    assert post(env, {"model": "coder-7b"}).json()["served_by"] == "team-a/coder/0"
    assert post(env, {"model": "chat"}, key=KEY_B).json()["served_by"] == "team-b/chat/0"
    assert [r[1]["model"] for r in a.requests] == ["chat", "chat", "chat:sql"]
    assert len(c.requests) == 1 and len(b.requests) == 1
    # the upstream sees the per-instance credential and the tenant's key id, never the tenant's key
    headers = a.requests[0][0]
    assert headers["authorization"] == "Bearer " + instance_credential(b"master-secret", "team-a", "chat")
    assert headers["x-berth-key-id"] == "ak-a"
    assert KEY_A not in json.dumps(headers)


def test_isolation_is_a_404_like_a_missing_model(env: Env) -> None:
    env.add_upstream("team-b", "chat", "team-b/chat/0")
    env.add_upstream("team-a", "coder", "team-a/coder/0")
    cross = post(env, {"model": "team-b/chat"})
    missing = post(env, {"model": "team-a/nothing"})
    assert cross.status_code == missing.status_code == 404
    assert cross.json()["error"]["code"] == missing.json()["error"]["code"] == "model_not_found"
    assert set(cross.json()["error"]) == {"message", "type", "param", "code"}
    # team-b's key may call only `chat`
    assert post(env, {"model": "team-b/coder"}, key=KEY_B).status_code == 404
    assert post(env, {"model": "team-a/coder-7b"}, key=KEY_B).status_code == 404


def test_models_lists_only_what_the_key_may_call(env: Env) -> None:
    def ids(key: str) -> list[str]:
        r = httpx.get(env.server.url + "/v1/models", headers={"Authorization": f"Bearer {key}"})
        return [m["id"] for m in r.json()["data"]]

    assert ids(KEY_A) == ["team-a/chat", "team-a/chat:sql", "team-a/coder-7b"]
    assert ids(KEY_B) == ["team-b/chat"]
    assert httpx.get(env.server.url + "/v1/models").status_code == 401


def test_revocation_delete_disable_expiry(env: Env) -> None:
    env.add_upstream("team-a", "chat", "team-a/chat/0")
    assert post(env, {"model": "chat"}).status_code == 200
    assert post(env, {"model": "chat"}, key="wrong").status_code == 401
    reg = env.gw.registry
    reg.put_key(Key("team-a", "ci", "ak-a", hash_key(KEY_A), disabled=True))
    assert post(env, {"model": "chat"}).json()["error"]["code"] == "invalid_api_key"
    from datetime import UTC, datetime, timedelta

    reg.put_key(
        Key("team-a", "ci", "ak-a", hash_key(KEY_A), expires_at=datetime.now(UTC) - timedelta(seconds=1))
    )
    assert post(env, {"model": "chat"}).status_code == 401
    reg.put_key(Key("team-a", "ci", "ak-a", hash_key(KEY_A)))
    assert post(env, {"model": "chat"}).status_code == 200
    reg.delete_key("team-a", "ci")
    assert post(env, {"model": "chat"}).status_code == 401


def test_no_ready_endpoint_is_503_with_retry_after(env: Env) -> None:
    r = post(env, {"model": "chat"})
    assert r.status_code == 503 and r.headers["retry-after"] == "5"
    assert r.json()["error"]["code"] == "no_ready_instance"


def test_retries_another_endpoint_on_connect_failure_and_503(env: Env) -> None:
    from berth.gateway.registry import Endpoint

    busy = env.add_upstream("team-a", "chat", "team-a/chat/0", status=503)
    ok = env.add_upstream("team-a", "chat", "team-a/chat/1")
    dead = Endpoint("127.0.0.1", free_port())  # nothing listens: connect refused
    slice_eps = env.gw.registry.endpoints(
        env.gw.registry.resolve(env.gw.registry.authenticate(KEY_A), "chat").instance
    )  # type: ignore[union-attr]
    env.gw.registry.put_slice("team-a", "chat", "chat-slice", (dead, *slice_eps))
    for _ in range(6):
        r = post(env, {"model": "chat"})
        assert r.status_code == 200 and r.json()["served_by"] == "team-a/chat/1"
    assert len(ok.requests) == 6 and len(busy.requests) >= 1
    metrics = httpx.get(env.server.url + "/metrics").text
    assert 'berth_gateway_upstream_retries_total{model="chat",namespace="team-a",reason="connect"}' in metrics
    assert 'reason="503"' in metrics


def test_all_endpoints_busy_passes_the_last_answer_on(env: Env) -> None:
    env.add_upstream("team-a", "chat", "team-a/chat/0", status=429)
    r = post(env, {"model": "chat"})
    assert r.status_code == 429 and r.headers["retry-after"] == "1"


def test_least_outstanding_balancing_spreads_concurrent_streams(env: Env) -> None:
    gate = threading.Event()
    ups = [env.add_upstream("team-a", "chat", f"team-a/chat/{i}", gate=gate) for i in range(2)]
    results: list[int] = []

    def one_stream() -> None:
        with stream(env, {"model": "chat", "stream": True}) as r:
            results.append(len(b"".join(r.iter_raw())))

    threads = [threading.Thread(target=one_stream) for _ in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5
    while sum(len(u.requests) for u in ups) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    gate.set()
    for t in threads:
        t.join(10)
    assert [len(u.requests) for u in ups] == [2, 2]
    assert len(results) == 4


def test_stream_is_not_buffered_and_usage_is_stripped_when_not_asked(env: Env) -> None:
    gate = threading.Event()
    up = env.add_upstream("team-a", "chat", "team-a/chat/0", gate=gate, chunks=3)
    with stream(env, {"model": "chat", "stream": True}) as r:
        it = r.iter_raw()
        first = next(it)
        assert b"t0" in first
        assert not up.sent_last.is_set()  # the client holds the first chunk before the last was sent
        gate.set()
        rest = first + b"".join(it)
    # the gateway asked upstream for usage ...
    assert up.requests[0][1]["stream_options"] == {"include_usage": True}
    # ... and the client, who did not, gets none of it
    assert b"usage" not in rest
    assert rest.count(b"data: ") == 4 and rest.endswith(b"data: [DONE]\n\n")
    delta = settled_usage(env, 1)
    assert delta.prompt_tokens == 5 and delta.completion_tokens == 3


def test_stream_keeps_usage_when_the_client_asked(env: Env) -> None:
    env.add_upstream("team-a", "chat", "team-a/chat/0", prompt_tokens=7, completion_tokens=11)
    body = {"model": "chat", "stream": True, "stream_options": {"include_usage": True}}
    with stream(env, body) as r:
        text = b"".join(r.iter_raw()).decode()
    events = [json.loads(line[6:]) for line in text.split("\n\n") if line.startswith("data: {")]
    assert events[-1]["usage"]["completion_tokens"] == 11
    assert settled_usage(env, 1).completion_tokens == 11


def test_usage_and_metrics_count_real_tokens(env: Env) -> None:
    env.add_upstream("team-a", "chat", "team-a/chat/0", prompt_tokens=4, completion_tokens=6)
    for _ in range(3):
        assert post(env, {"model": "chat"}).status_code == 200
    delta = env.gw.usage.take()[("team-a", "ci")]
    assert (delta.requests, delta.prompt_tokens, delta.completion_tokens) == (3, 12, 18)
    metrics = httpx.get(env.server.url + "/metrics").text
    assert (
        'berth_gateway_tokens_total{key_id="ak-a",kind="completion",model="chat",namespace="team-a"} 18.0'
        in metrics
    )
    assert (
        'berth_gateway_requests_total{key_id="ak-a",model="chat",namespace="team-a",status="200"} 3.0'
        in metrics
    )


def test_rpm_quota_is_429_with_retry_after_in_openai_shape(env: Env) -> None:
    env.add_upstream("team-a", "chat", "team-a/chat/0")
    env.gw.registry.put_key(
        Key("team-a", "ci", "ak-a", hash_key(KEY_A), limits=Limits(requests_per_minute=2))
    )
    assert [post(env, {"model": "chat"}).status_code for _ in range(2)] == [200, 200]
    r = post(env, {"model": "chat"})
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["type"] == "rate_limit_exceeded"
    assert r.json()["error"]["code"] == "requests_per_minute"


def test_tpm_quota_counts_upstream_usage(env: Env) -> None:
    env.add_upstream("team-a", "chat", "team-a/chat/0", prompt_tokens=10, completion_tokens=10)
    env.gw.registry.put_key(Key("team-a", "ci", "ak-a", hash_key(KEY_A), limits=Limits(tokens_per_minute=30)))
    codes = [post(env, {"model": "chat"}).status_code for _ in range(3)]
    assert codes == [200, 200, 429]


def test_concurrency_quota(env: Env) -> None:
    gate = threading.Event()
    env.add_upstream("team-a", "chat", "team-a/chat/0", gate=gate)
    env.gw.registry.put_key(
        Key("team-a", "ci", "ak-a", hash_key(KEY_A), limits=Limits(max_concurrent_requests=1))
    )
    with stream(env, {"model": "chat", "stream": True}) as r:
        it = r.iter_raw()  # keep the iterator: dropping it closes the response
        next(it)
        second = post(env, {"model": "chat"})
        assert second.status_code == 429 and second.json()["error"]["code"] == "max_concurrent_requests"
        gate.set()
        b"".join(it)
    assert post(env, {"model": "chat"}).status_code == 200


def test_tgi_route_takes_the_model_from_a_header(env: Env) -> None:
    up = env.add_upstream("team-a", "chat", "team-a/chat/0")
    r = httpx.post(
        env.server.url + "/generate",
        json={"inputs": "hi"},
        headers={"Authorization": f"Bearer {KEY_A}", "X-Berth-Model": "chat"},
    )
    assert r.status_code == 200
    assert up.requests[0][1] == {"inputs": "hi"}


@pytest.mark.parametrize("body", [b"not json", b"[1]"])
def test_bad_bodies_are_400(env: Env, body: bytes) -> None:
    r = httpx.post(
        env.server.url + "/v1/chat/completions", content=body, headers={"Authorization": f"Bearer {KEY_A}"}
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


def test_client_disconnect_releases_the_request(env: Env) -> None:
    gate = threading.Event()
    env.add_upstream("team-a", "chat", "team-a/chat/0", gate=gate)
    with stream(env, {"model": "chat", "stream": True}) as r:
        assert b"t0" in next(r.iter_raw())  # the dropped iterator closes the connection
    deadline = time.monotonic() + 5
    while env.gw.q.in_flight("ak-a") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert env.gw.q.in_flight("ak-a") == 0
    assert (
        env.gw.balancer.outstanding(
            env.gw.registry.endpoints(
                env.gw.registry.resolve(env.gw.registry.authenticate(KEY_A), "chat").instance
            )[0]
        )
        == 0
    )  # type: ignore[union-attr]
    # cut short before upstream's usage chunk: the request counts, its tokens are unknown
    delta = settled_usage(env, 1)
    assert (delta.requests, delta.prompt_tokens, delta.completion_tokens) == (1, 0, 0)


def _scaled_to_zero(env: Env, timeout: float = 5.0) -> list[str]:
    from berth.gateway.registry import Instance

    woken: list[str] = []
    env.gw.registry.put_instance(
        Instance("team-a", "chat", "chat", capacity=0, autoscaling=True, wake_timeout_seconds=timeout)
    )

    async def waker(inst: Instance) -> None:
        woken.append(f"{inst.namespace}/{inst.name}")

    env.gw.waker = waker
    return woken


def test_scale_from_zero_wakes_and_holds_the_request(env: Env) -> None:
    woken = _scaled_to_zero(env)
    threading.Timer(0.5, lambda: env.add_upstream("team-a", "chat", "team-a/chat/0")).start()
    t0 = time.monotonic()
    r = post(env, {"model": "chat"})
    assert r.status_code == 200 and r.json()["served_by"] == "team-a/chat/0"
    assert time.monotonic() - t0 >= 0.45
    assert woken == ["team-a/chat"]


def test_held_stream_gets_keepalives_then_the_answer(env: Env) -> None:
    _scaled_to_zero(env)
    env.gw.settings = env.gw.settings.model_copy(update={"keepalive_seconds": 0.1})
    threading.Timer(0.6, lambda: env.add_upstream("team-a", "chat", "team-a/chat/0")).start()
    with stream(env, {"model": "chat", "stream": True}) as r:
        text = b"".join(r.iter_raw())
    assert text.startswith(b": keep-alive\n\n") and text.count(b": keep-alive") >= 3
    assert text.endswith(b"data: [DONE]\n\n") and b"t2" in text
    assert settled_usage(env, 1).completion_tokens == 3


def test_wake_timeout_is_503_with_retry_after(env: Env) -> None:
    _scaled_to_zero(env, timeout=0.3)
    r = post(env, {"model": "chat"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "wake_timeout" and r.headers["retry-after"]
    assert env.gw.q.in_flight("ak-a") == 0


def test_dashscope_native_route_is_routed_and_metered(env: Env) -> None:
    up = env.add_upstream("team-a", "chat", "team-a/chat/0", prompt_tokens=9, completion_tokens=4, chunks=3)
    path = "/api/v1/services/aigc/text-generation/generation"
    body = {"model": "chat", "input": {"prompt": "hi"}, "parameters": {}}
    r = post(env, body, path=path)
    assert r.status_code == 200 and r.json()["output"]["text"] == "hi"
    with stream(env, body, path=path, headers={"X-DashScope-SSE": "enable"}) as s:
        text = b"".join(s.iter_raw())
        assert s.headers["x-dashscope-sse"] == "enable"
    assert text.count(b"event:result") == 3 and b'"output_tokens": 3' in text
    assert up.requests[1][0]["x-dashscope-sse"] == "enable" and "stream_options" not in up.requests[1][1]
    delta = settled_usage(env, 2)
    assert (delta.requests, delta.prompt_tokens, delta.completion_tokens) == (2, 18, 4 + 3)
    assert post(env, {**body, "model": "team-b/chat"}, path=path).status_code == 404


DASHSCOPE = "/api/v1/services/aigc/text-generation/generation"


def test_dashscope_stream_by_accept_header(env: Env) -> None:
    up = env.add_upstream("team-a", "chat", "team-a/chat/0", chunks=2)
    body = {"model": "chat", "input": {"prompt": "hi"}}
    with stream(env, body, path=DASHSCOPE, headers={"Accept": "text/event-stream"}) as s:
        text = b"".join(s.iter_raw())
    assert text.count(b"event:result") == 2
    assert up.requests[0][0]["x-dashscope-sse"] == "enable"


def test_dashscope_route_errors_are_dashscope_shaped(env: Env) -> None:
    env.add_upstream("team-a", "chat", "team-a/chat/0")
    body = {"model": "chat", "input": {"prompt": "hi"}}
    bad = post(env, body, key="nope", path=DASHSCOPE)
    assert bad.status_code == 401 and bad.json()["code"] == "InvalidApiKey"
    assert set(bad.json()) == {"code", "message", "request_id"} and bad.headers["www-authenticate"]
    other = post(env, {**body, "model": "team-b/chat"}, path=DASHSCOPE)
    assert other.status_code == 404 and other.json()["code"] == "ModelNotFound"
    assert "does not exist" in other.json()["message"]
    no_model = post(env, {"input": {}}, path=DASHSCOPE)
    assert no_model.status_code == 400 and no_model.json()["code"] == "InvalidParameter"
    env.gw.registry.put_key(
        Key("team-a", "ci", "ak-a", hash_key(KEY_A), limits=Limits(requests_per_minute=1))
    )
    assert post(env, body, path=DASHSCOPE).status_code == 200
    limited = post(env, body, path=DASHSCOPE)
    assert limited.status_code == 429 and limited.json()["code"] == "Throttling.RateQuota"
    assert int(limited.headers["retry-after"]) >= 1
    # the OpenAI routes keep OpenAI's shape
    assert post(env, {"model": "chat"}, key="nope").json()["error"]["code"] == "invalid_api_key"


def test_dashscope_held_stream_wake_timeout_is_an_error_event(env: Env) -> None:
    _scaled_to_zero(env, timeout=0.3)
    with stream(
        env,
        {"model": "chat", "input": {"prompt": "hi"}},
        path=DASHSCOPE,
        headers={"X-DashScope-SSE": "enable"},
    ) as s:
        text = b"".join(s.iter_raw()).decode()
    assert "event:error\n:HTTP_STATUS/503\ndata:" in text
    data = json.loads(text.split("data:", 1)[1])
    assert data["code"] == "ServiceUnavailable" and "zero" in data["message"]


def test_held_requests_are_exported_per_modeldeployment(env: Env) -> None:
    """berth_gateway_waiting_requests{namespace, modeldeployment}: what the operator's autoscaler reads."""
    _scaled_to_zero(env)
    threads = [threading.Thread(target=post, args=(env, {"model": "chat"})) for _ in range(2)]
    for t in threads:
        t.start()
    line = 'berth_gateway_waiting_requests{model="chat",modeldeployment="chat",namespace="team-a"}'

    def held() -> float:
        from berth.server.testing import parse_metrics

        return parse_metrics(httpx.get(env.server.url + "/metrics").text).get(line, 0.0)

    deadline = time.monotonic() + 5
    while held() < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert held() == 2
    env.add_upstream("team-a", "chat", "team-a/chat/0")
    for t in threads:
        t.join(5)
    assert held() == 0
