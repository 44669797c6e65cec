"""Process-level behaviour of a real `berth serve`: overload (429), client disconnect, SIGTERM drain,
and a clear non-zero exit for a model that cannot be loaded.

The module's server runs with one running slot and one waiting slot, so it is easy to fill.
Tests run in file order; the SIGTERM test, which ends the server, is last.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from berth.server.testing import ServerProcess

pytestmark = pytest.mark.slow

KEY = "sk-process-test"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("berth-process")
    proc = ServerProcess(
        ["--max-num-seqs", "1", "--max-queue", "1", "--device", "cpu", "--drain-timeout", "60"],
        log_dir=root,
        env={"BERTH_API_KEYS": f"proc:{KEY}"},
    )
    with proc:
        yield proc


def _long_chat(max_tokens: int = 400) -> dict[str, Any]:
    return {
        "model": "ignored-by-alias",
        "messages": [{"role": "user", "content": "Count from one to one thousand."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }


def _served(server: ServerProcess) -> str:
    return str(httpx.get(f"{server.base_url}/v1/models", headers=AUTH).json()["data"][0]["id"])


def _wait_for(cond: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def _gauge(server: ServerProcess, name: str) -> float:
    return server.metrics().get(name, -1.0)


def _open_stream(
    server: ServerProcess, body: dict[str, Any]
) -> tuple[httpx.Client, httpx.Response, Iterator[str]]:
    client = httpx.Client(timeout=120)
    body = {**body, "model": _served(server)}
    req = client.build_request("POST", f"{server.base_url}/v1/chat/completions", json=body, headers=AUTH)
    resp = client.send(req, stream=True)
    assert resp.status_code == 200, resp.read()
    return client, resp, resp.iter_lines()


def _next_data(lines: Iterator[str]) -> str:
    for line in lines:
        if line.startswith("data: "):
            return line[len("data: ") :]
    raise AssertionError("stream ended")


def test_queue_full_gives_429_with_retry_after(server: ServerProcess) -> None:
    # A occupies the one running slot ...
    client_a, resp_a, lines_a = _open_stream(server, _long_chat())
    _next_data(lines_a)
    _wait_for(lambda: _gauge(server, "berth_running_requests") == 1)
    # ... B waits in the one queue slot ...
    b_status: list[int] = []

    def run_b() -> None:
        with httpx.Client(timeout=120) as c:
            body = {**_long_chat(4), "stream": False, "model": _served(server)}
            b_status.append(
                c.post(f"{server.base_url}/v1/chat/completions", json=body, headers=AUTH).status_code
            )

    thread_b = threading.Thread(target=run_b)
    thread_b.start()
    _wait_for(lambda: _gauge(server, "berth_waiting_requests") == 1)
    # ... so C is refused.
    body_c = {**_long_chat(4), "stream": False, "model": _served(server)}
    r = httpx.post(f"{server.base_url}/v1/chat/completions", json=body_c, headers=AUTH, timeout=60)
    assert r.status_code == 429, r.text
    assert int(r.headers["retry-after"]) >= 1
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    # A leaves (disconnect): B gets the slot and finishes.
    resp_a.close()
    client_a.close()
    thread_b.join(timeout=120)
    assert b_status == [200]
    assert server.metrics()['berth_requests_total{route="/v1/chat/completions",status="429"}'] >= 1


def test_disconnect_mid_stream_frees_the_slot(server: ServerProcess) -> None:
    _wait_for(lambda: _gauge(server, "berth_running_requests") == 0)
    client, resp, lines = _open_stream(server, _long_chat())
    for _ in range(3):
        _next_data(lines)
    m = server.metrics()
    assert m["berth_running_requests"] == 1
    assert m["berth_http_requests_in_flight"] == 1
    assert m["berth_kv_cache_usage_ratio"] > 0
    resp.close()
    client.close()
    t0 = time.monotonic()
    _wait_for(lambda: _gauge(server, "berth_running_requests") == 0, timeout=10)
    freed_after = time.monotonic() - t0
    m = server.metrics()
    assert m["berth_http_requests_in_flight"] == 0
    assert m["berth_kv_cache_usage_ratio"] == 0
    assert freed_after < 5, freed_after


def test_disconnect_while_queued_frees_the_queue_slot(server: ServerProcess) -> None:
    _wait_for(lambda: _gauge(server, "berth_running_requests") == 0)
    client_a, resp_a, lines_a = _open_stream(server, _long_chat())
    _next_data(lines_a)
    body = {**_long_chat(4), "stream": False, "model": _served(server)}
    # B waits in the queue behind A; its client gives up after 3 s and closes the connection.
    outcome: list[str] = []

    def run_b() -> None:
        try:
            httpx.post(f"{server.base_url}/v1/chat/completions", json=body, headers=AUTH, timeout=3.0)
            outcome.append("answered")
        except httpx.ReadTimeout:
            outcome.append("gave up")

    thread_b = threading.Thread(target=run_b)
    thread_b.start()
    _wait_for(lambda: _gauge(server, "berth_waiting_requests") == 1)
    thread_b.join(timeout=30)
    assert outcome == ["gave up"]
    _wait_for(lambda: _gauge(server, "berth_waiting_requests") == 0, timeout=5)
    assert _gauge(server, "berth_running_requests") == 1  # A is untouched
    resp_a.close()
    client_a.close()
    _wait_for(lambda: _gauge(server, "berth_running_requests") == 0, timeout=10)
    assert any(line["status"] == 499 for line in server.access_log())


def test_sigterm_finishes_the_stream_then_exits_0(server: ServerProcess) -> None:
    _wait_for(lambda: _gauge(server, "berth_running_requests") == 0)
    served = _served(server)
    client, resp, lines = _open_stream(server, _long_chat(48))
    first = json.loads(_next_data(lines))
    assert first["choices"][0]["delta"]["role"] == "assistant"
    server.terminate()
    # not ready while draining; new work refused; health and metrics still answer
    _wait_for(lambda: httpx.get(f"{server.base_url}/health/ready").status_code == 503, timeout=5)
    ready = httpx.get(f"{server.base_url}/health/ready").json()
    assert ready == {"ready": False, "status": "draining"}
    assert httpx.get(f"{server.base_url}/health/live").status_code == 200
    late = httpx.post(
        f"{server.base_url}/v1/chat/completions",
        json={**_long_chat(2), "stream": False, "model": served},
        headers=AUTH,
    )
    assert late.status_code == 503 and late.json()["error"]["code"] == "draining"
    # the in-flight stream runs to its end
    text, finish, done = "", None, False
    for line in lines:
        if not line.startswith("data: "):
            continue
        data = line[len("data: ") :]
        if data == "[DONE]":
            done = True
            break
        chunk = json.loads(data)
        if chunk["choices"]:
            text += chunk["choices"][0]["delta"].get("content") or ""
            finish = chunk["choices"][0]["finish_reason"] or finish
    resp.close()
    client.close()
    assert done and finish == "length" and text
    assert server.wait(timeout=60) == 0
    assert "drained" in server.stderr()


def test_missing_model_exits_non_zero_with_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "berth.cli",
            "serve",
            "--model",
            str(missing),
            "--port",
            "0",
            "--host",
            "127.0.0.1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1, r.stderr[-2000:]
    assert str(missing) in r.stderr
