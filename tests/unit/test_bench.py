"""berth bench without a server: metric definitions on synthetic timings, prompt lengths, SSE parsing."""

from __future__ import annotations

import asyncio
import json
import math
import random
import statistics
from typing import Any, ClassVar

import httpx
import pytest

from berth.bench.client import RequestSpec, api_url, build_payload, send_request
from berth.bench.main import Progress, arrivals, build_parser, format_summary, parse_percentiles
from berth.bench.metrics import (
    RequestResult,
    calculate_metrics,
    peak_concurrency,
    peak_output_tokens_per_s,
    percentile,
    summarize,
    tpot,
)
from berth.bench.prompts import WordPrompts, build_prompts, sample_lengths


def _linear_percentile(xs: list[float], p: float) -> float:
    """numpy's default percentile ("linear"), in the standard library: the cut points of
    ``statistics.quantiles(method="inclusive")`` interpolate linearly between closest ranks."""
    if len(xs) == 1 or p == 0:
        return min(xs)
    if p == 100:
        return max(xs)
    i = round(p * 10)
    assert i == pytest.approx(p * 10), p  # per mille
    return statistics.quantiles(xs, n=1000, method="inclusive")[i - 1]


def _req(start: float, ttft: float, itl: list[float], out: int, prompt: int = 10) -> RequestResult:
    return RequestResult(
        success=True,
        prompt_len=prompt,
        output_tokens=out,
        ttft=ttft,
        itl=itl,
        latency=ttft + sum(itl),
        start_time=start,
    )


# ----------------------------------------------------------------------------------- metrics


def test_percentile_matches_numpy_linear() -> None:
    rng = random.Random(3)
    for n in (1, 2, 5, 17, 100):
        xs = [rng.uniform(0, 10) for _ in range(n)]
        for p in (0, 1, 25, 50, 90, 99, 99.9, 100):
            assert percentile(xs, p) == pytest.approx(_linear_percentile(xs, p), rel=1e-12)
    assert percentile([], 99) == 0.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([10.0, 20.0], 90) == pytest.approx(19.0)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summarize_converts_to_ms_and_uses_population_std() -> None:
    s = summarize([0.1, 0.2, 0.3, 0.4], "ttft", [50, 99])
    assert s["mean_ttft_ms"] == pytest.approx(250.0)
    assert s["median_ttft_ms"] == pytest.approx(250.0)
    assert s["std_ttft_ms"] == pytest.approx(math.sqrt(0.0125) * 1000)  # numpy's np.std (ddof=0)
    assert s["p50_ttft_ms"] == pytest.approx(250.0)
    assert s["p99_ttft_ms"] == pytest.approx(397.0)
    assert summarize([], "itl", [90]) == {
        "mean_itl_ms": 0.0,
        "median_itl_ms": 0.0,
        "std_itl_ms": 0.0,
        "p90_itl_ms": 0.0,
    }
    assert "p99_9_e2el_ms" in summarize([1.0], "e2el", [99.9])


def test_tpot_definition() -> None:
    r = _req(0.0, 0.5, [0.1, 0.1, 0.2], out=4)  # e2el 0.9
    assert tpot(r) == pytest.approx((0.9 - 0.5) / 3)
    # usage counts win over chunk counts: 9 tokens arrived in 4 chunks
    r.output_tokens = 9
    assert tpot(r) == pytest.approx(0.4 / 8)
    assert tpot(_req(0.0, 0.5, [], out=1)) is None


def test_calculate_metrics_values() -> None:
    results = [
        _req(0.0, 0.10, [0.05, 0.05, 0.10], out=4, prompt=8),  # e2el 0.30, tpot 0.2/3
        _req(0.5, 0.20, [0.10], out=2, prompt=12),  # e2el 0.30, tpot 0.1
        _req(1.0, 0.30, [], out=1, prompt=6),  # e2el 0.30, no tpot
        RequestResult(success=False, prompt_len=100, error="HTTP 429: full"),
    ]
    m = calculate_metrics(results, duration=2.0, percentiles=[50, 90, 99])
    assert m["completed"] == 3
    assert m["failed"] == 1
    assert m["total_input_tokens"] == 26  # failed requests count for nothing
    assert m["total_output_tokens"] == 7
    assert m["request_throughput"] == pytest.approx(1.5)
    assert m["output_throughput"] == pytest.approx(3.5)
    assert m["total_token_throughput"] == pytest.approx(16.5)
    assert m["mean_ttft_ms"] == pytest.approx(200.0)
    assert m["median_ttft_ms"] == pytest.approx(200.0)
    assert m["p90_ttft_ms"] == pytest.approx(280.0)
    assert m["mean_e2el_ms"] == pytest.approx(300.0)
    assert m["std_e2el_ms"] == pytest.approx(0.0, abs=1e-9)
    tpots = [0.2 / 3 * 1000, 100.0]
    assert m["mean_tpot_ms"] == pytest.approx(sum(tpots) / 2)
    assert m["p99_tpot_ms"] == pytest.approx(_linear_percentile(tpots, 99))
    itls = [50.0, 50.0, 100.0, 100.0]
    assert m["mean_itl_ms"] == pytest.approx(75.0)
    assert m["median_itl_ms"] == pytest.approx(75.0)
    assert m["std_itl_ms"] == pytest.approx(statistics.pstdev(itls))  # numpy's np.std (ddof=0)
    assert m["max_concurrent_requests"] == 1  # [0,0.3), [0.5,0.8), [1.0,1.3) never overlap
    assert m["max_output_tokens_per_s"] == 6.0  # chunks at 0.1,0.15,0.2,0.3,0.7,0.8 fall in second 0
    with pytest.raises(ValueError):
        calculate_metrics(results, duration=0.0)


def test_all_failed_reports_zeros() -> None:
    m = calculate_metrics([RequestResult(error="x"), RequestResult(error="y")], duration=1.0)
    assert (m["completed"], m["failed"], m["output_throughput"], m["p99_ttft_ms"]) == (0, 2, 0.0, 0.0)


def test_peak_concurrency_half_open() -> None:
    a = _req(0.0, 0.5, [0.5], out=2)  # [0, 1)
    b = _req(1.0, 0.5, [0.5], out=2)  # [1, 2): starts when a ends
    c = _req(0.5, 0.5, [1.0], out=2)  # [0.5, 2.0)
    assert peak_concurrency([a, b]) == 1
    assert peak_concurrency([a, b, c]) == 2
    assert peak_output_tokens_per_s([a, b, c]) == 3.0


# ----------------------------------------------------------------------------------- prompts


def test_sample_lengths_follow_vllm_range_ratio() -> None:
    rng = random.Random(0)
    assert sample_lengths(5, 128, 0.0, rng) == [128] * 5
    xs = sample_lengths(2000, 100, 0.25, rng)
    assert min(xs) == 75 and max(xs) == 125
    assert all(x >= 1 for x in sample_lengths(100, 1, 0.9, rng))
    with pytest.raises(ValueError):
        sample_lengths(1, 10, 1.0, rng)
    with pytest.raises(ValueError):
        sample_lengths(1, 0, 0.0, rng)


def test_word_prompts_lengths_prefix_and_seed() -> None:
    ps = build_prompts(WordPrompts(), 4, input_len=20, output_len=7, range_ratio=0.0, seed=1, prefix_len=5)
    assert [p.prompt_len for p in ps] == [25] * 4
    assert [p.output_len for p in ps] == [7] * 4
    assert all(len(p.text.split()) == 25 for p in ps)
    prefixes = {" ".join(p.text.split()[:5]) for p in ps}
    assert len(prefixes) == 1  # one shared prefix
    assert len({p.text for p in ps}) == 4  # distinct bodies
    again = build_prompts(WordPrompts(), 4, input_len=20, output_len=7, range_ratio=0.0, seed=1, prefix_len=5)
    assert [p.text for p in again] == [p.text for p in ps]


class _CharTokenizer:
    """A tokenizer with one token per character of a small alphabet (ids round-trip exactly)."""

    alphabet = "abcdefghij "
    all_special_ids: ClassVar[list[int]] = [11]

    def __len__(self) -> int:
        return len(self.alphabet) + 1

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [self.alphabet.index(c) for c in text]

    def decode(self, ids: list[int], **_: Any) -> str:
        return "".join(self.alphabet[i] for i in ids if i < len(self.alphabet))


def test_tokenizer_prompts_exact_lengths() -> None:
    from berth.bench.prompts import TokenizerPrompts

    src = TokenizerPrompts(_CharTokenizer())
    ps = build_prompts(src, 50, input_len=30, output_len=4, range_ratio=0.5, seed=2)
    for p in ps:
        assert len(p.text) == p.prompt_len
        assert 15 <= p.prompt_len <= 45


# ---------------------------------------------------------------------------- the HTTP client


def _sse(events: list[dict[str, Any] | str]) -> bytes:
    out = ""
    for e in events:
        out += f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n"
    return out.encode()


def _run(handler: Any, endpoint: str = "chat", output_len: int = 3) -> RequestResult:
    async def go() -> RequestResult:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            spec = RequestSpec("hello world", 2, output_len)
            payload = build_payload(endpoint, "m", spec, ignore_eos=True, temperature=None)  # type: ignore[arg-type]
            url = api_url("http://x", endpoint)  # type: ignore[arg-type]
            return await send_request(client, url, payload, endpoint, spec, {})  # type: ignore[arg-type]

    return asyncio.run(go())


def test_client_chat_stream_with_usage() -> None:
    seen: dict[str, Any] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["url"] = str(request.url)
        seen["body"] = json.loads(request.content)
        return httpx.Response(
            200,
            content=_sse(
                [
                    {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
                    {"choices": [{"index": 0, "delta": {"content": "a"}}]},
                    {"choices": [{"index": 0, "delta": {"content": "bc"}}]},
                    {"choices": [{"index": 0, "delta": {"content": "d"}, "finish_reason": "length"}]},
                    {
                        "choices": [],
                        "usage": {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11},
                    },
                    "[DONE]",
                ]
            ),
            headers={"content-type": "text/event-stream"},
        )

    r = _run(handler)
    assert seen["url"] == "http://x/v1/chat/completions"
    body = seen["body"]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["max_completion_tokens"] == 3
    assert body["messages"] == [{"role": "user", "content": "hello world"}]
    assert r.success and r.error == ""
    assert r.generated_text == "abcd"
    assert (r.output_tokens, r.output_tokens_source, r.prompt_len) == (4, "usage", 7)
    assert len(r.itl) == 2  # three content chunks; the role chunk is not a token
    assert 0 < r.ttft <= r.latency
    assert r.finish_reason == "length"


def test_client_completions_without_usage_counts_chunks() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        assert body["prompt"] == "hello world" and body["max_tokens"] == 3
        return httpx.Response(
            200,
            content=_sse([{"choices": [{"index": 0, "text": t}]} for t in ("x", "", "y", "z")] + ["[DONE]"]),
        )

    r = _run(handler, endpoint="completions")
    assert r.success
    assert (r.output_tokens, r.output_tokens_source, r.prompt_len) == (3, "chunks", 2)
    assert r.generated_text == "xyz"


def test_client_failures_are_recorded() -> None:
    r = _run(lambda req: httpx.Response(429, json={"error": {"message": "the engine is full", "type": "x"}}))
    assert not r.success and r.status_code == 429 and r.error == "HTTP 429: the engine is full"

    def boom(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    r = _run(boom)
    assert not r.success and r.error.startswith("ConnectError")
    r = _run(lambda req: httpx.Response(200, content=_sse(["[DONE]"])))
    assert not r.success and "without a single choice" in r.error
    r = _run(lambda req: httpx.Response(200, content=_sse([{"error": {"message": "step failed"}}])))
    assert not r.success and r.error == "stream error: step failed"


# ---------------------------------------------------------------------------- CLI pieces


def test_api_url_and_parser_defaults() -> None:
    assert api_url("http://h:1/", "completions") == "http://h:1/v1/completions"
    assert api_url("http://h:1/v1", "chat") == "http://h:1/v1/chat/completions"
    args = build_parser().parse_args([])
    assert math.isinf(args.request_rate) and args.max_concurrency is None and args.endpoint == "completions"
    assert parse_percentiles("50,90,99.9") == [50.0, 90.0, 99.9]
    with pytest.raises(ValueError):
        parse_percentiles("50,120")


def test_poisson_arrivals_mean_gap() -> None:
    async def gaps(rate: float, n: int) -> float:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        async for _ in arrivals(n, rate, 1.0, random.Random(5)):
            pass
        return loop.time() - t0

    assert asyncio.run(gaps(math.inf, 1000)) < 0.5
    total = asyncio.run(gaps(400.0, 201))  # 200 gaps of mean 2.5 ms
    assert 0.3 < total < 1.5


def test_progress_and_summary(capsys: pytest.CaptureFixture[str]) -> None:
    import io

    buf = io.StringIO()
    p = Progress(20, buf)
    for i in range(20):
        p.update(ok=i % 5 != 0)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 11  # deciles 0..10 on a non-terminal
    assert lines[-1].startswith("[" + "#" * 30 + "] 20/20 (4 failed)")
    m = calculate_metrics([_req(0.0, 0.1, [0.1], out=2)], 1.0, [50, 99])
    m.update(percentiles=[50, 99], max_concurrency=4, request_rate="inf", error_counts={"HTTP 429: full": 3})
    text = format_summary(m)
    assert "Successful requests:                        1" in text
    assert "P99 TTFT (ms):" in text and "P50 TTFT" not in text
    assert "3 x HTTP 429: full" in text
