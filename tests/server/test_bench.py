"""`berth bench` as a subprocess against a real `berth serve` on SmolLM2 (CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from berth.server.testing import ServerProcess

pytestmark = pytest.mark.slow

KEY = "sk-bench-test"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(
        ["--device", "cpu", "--max-num-seqs", "4"],
        log_dir=tmp_path_factory.mktemp("berth-bench"),
        env={"BERTH_API_KEYS": f"bench:{KEY}"},
    )
    with proc:
        yield proc


def _bench(
    server: ServerProcess, result: Path, *args: str, key: str = KEY
) -> tuple[int, str, dict[str, Any]]:
    cmd = [
        sys.executable,
        "-m",
        "berth.cli",
        "bench",
        "--base-url",
        server.base_url,
        "--api-key",
        key,
        "--result-file",
        str(result),
        *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    data = json.loads(result.read_text()) if result.exists() else {}
    return proc.returncode, proc.stdout + proc.stderr, data


def _generated(server: ServerProcess) -> float:
    return sum(v for k, v in server.metrics().items() if k.startswith("berth_generation_tokens_total{"))


def test_fixed_lengths_ignore_eos(server: ServerProcess, tmp_path: Path) -> None:
    before = _generated(server)
    rc, out, r = _bench(
        server,
        tmp_path / "r.json",
        *("--num-prompts", "8", "--input-len", "24", "--output-len", "16", "--max-concurrency", "4"),
        "--ignore-eos",
        "--temperature",
        "0",
    )
    assert rc == 0, out
    assert "Serving Benchmark Result" in out and "8/8 (0 failed)" in out
    assert r["completed"] == 8 and r["failed"] == 0, r["error_counts"]
    assert r["total_output_tokens"] == 8 * 16
    assert r["output_lens"] == [16] * 8
    assert r["output_tokens_source"] == {"usage": 8}
    assert r["model_id"] == "smollm2-135m-instruct"
    assert r["max_concurrency"] == 4
    assert 1 <= r["max_concurrent_requests"] <= 4
    assert all(n > 0 for n in r["input_lens"])
    for ttft, e2el, itl in zip(r["ttfts"], r["latencies"], r["itls"], strict=True):
        assert 0 < ttft <= e2el
        assert len(itl) <= 15 and sum(itl) <= e2el - ttft + 1e-6
    assert 0 < r["mean_ttft_ms"] <= r["mean_e2el_ms"]
    assert r["p99_ttft_ms"] >= r["p90_ttft_ms"] >= r["p50_ttft_ms"] > 0
    assert r["mean_tpot_ms"] > 0 and r["mean_itl_ms"] > 0
    assert r["output_throughput"] == pytest.approx(128 / r["duration"])
    assert r["request_throughput"] == pytest.approx(8 / r["duration"])
    # The server counted the same generated tokens.
    assert _generated(server) - before == 8 * 16
    assert r["config"]["ignore_eos"] is True and "api_key" not in r["config"]


def test_chat_with_tokenizer_and_request_rate(server: ServerProcess, tmp_path: Path) -> None:
    rc, out, r = _bench(
        server,
        tmp_path / "chat.json",
        *("--endpoint", "chat", "--tokenizer", "builtin", "--num-prompts", "4"),
        *("--input-len", "20", "--output-len", "6", "--random-range-ratio", "0.5"),
        *("--request-rate", "20", "--ignore-eos", "--seed", "7", "--no-progress"),
    )
    assert rc == 0, out
    assert r["completed"] == 4 and r["failed"] == 0
    assert r["prompt_source"] == "tokenizer:builtin://smollm2-135m-instruct"
    assert r["output_lens"] == r["requested_output_lens"]
    assert all(3 <= n <= 9 for n in r["requested_output_lens"])
    # The chat template adds the same overhead to every prompt of exact token length.
    overhead = {got - asked for got, asked in zip(r["input_lens"], r["requested_input_lens"], strict=True)}
    assert len(overhead) == 1 and overhead.pop() > 0
    assert r["request_rate"] == 20.0


def test_completions_prompt_lengths_are_exact(server: ServerProcess, tmp_path: Path) -> None:
    rc, out, r = _bench(
        server,
        tmp_path / "cmpl.json",
        *("--tokenizer", "builtin", "--num-prompts", "3", "--input-len", "33", "--output-len", "2"),
        "--ignore-eos",
        "--quiet",
    )
    assert rc == 0, out
    assert r["input_lens"] == [33, 33, 33]  # the server's usage.prompt_tokens


def test_failed_requests_are_counted(server: ServerProcess, tmp_path: Path) -> None:
    rc, out, r = _bench(
        server,
        tmp_path / "fail.json",
        *("--num-prompts", "3", "--input-len", "4", "--output-len", "2", "--model", "smollm2-135m-instruct"),
        key="sk-wrong",
    )
    assert rc == 1
    assert "every request failed" in out
    assert r["completed"] == 0 and r["failed"] == 3
    assert list(r["error_counts"].values()) == [3]
    assert next(iter(r["error_counts"])).startswith("HTTP 401")
