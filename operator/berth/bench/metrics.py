"""Serving metrics with the names and definitions of vLLM's ``bench serve``.

Pure functions over per-request records (no I/O, no clock), so they are unit-tested on
synthetic timings. All times in the records are seconds; the summary reports milliseconds.

Definitions (as in vLLM's ``calculate_metrics``):
- TTFT: time from sending the request to the first chunk that carries generated content;
- ITL: the gaps between consecutive content chunks of a request (all requests pooled);
- TPOT: per request, ``(e2el - ttft) / (output_tokens - 1)``, only for requests with more than
  one output token;
- E2EL: time from sending the request to its last chunk;
- mean / median / population std / percentiles (linear interpolation, numpy's default) over the
  successful requests; 0 when there is nothing to summarise;
- request_throughput = completed / duration; output_throughput = output tokens / duration;
  total_token_throughput = (input + output tokens) / duration.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

METRICS = ("ttft", "tpot", "itl", "e2el")
DEFAULT_PERCENTILES = (50.0, 90.0, 99.0)


@dataclass
class RequestResult:
    """What one request produced, measured on the client."""

    success: bool = False
    prompt_len: int = 0  # input tokens (the server's usage when it reports one)
    output_tokens: int = 0  # output tokens (usage, else the number of content chunks)
    output_tokens_source: str = ""  # "usage" | "chunks"
    ttft: float = 0.0  # s
    itl: list[float] = field(default_factory=list)  # s, one per content chunk after the first
    latency: float = 0.0  # e2el, s
    start_time: float = 0.0  # perf_counter when the request was sent
    client_queue_time: float = 0.0  # s waited for a concurrency slot before sending
    generated_text: str = ""
    error: str = ""
    status_code: int | None = None
    finish_reason: str | None = None


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0..100) with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return 0.0
    if not 0.0 <= p <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {p}")
    xs = sorted(values)
    pos = (len(xs) - 1) * p / 100.0
    lo = math.floor(pos)
    hi = math.ceil(pos)
    if lo == hi:
        return float(xs[lo])
    return float(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))


def _pct_name(p: float) -> str:
    return f"{p:g}".replace(".", "_") if not float(p).is_integer() else str(int(p))


def summarize(values: Sequence[float], name: str, percentiles: Sequence[float]) -> dict[str, float]:
    """mean/median/std/p<N> of ``values`` (seconds) as ``<stat>_<name>_ms`` (milliseconds)."""
    ms = [v * 1000.0 for v in values]
    out = {
        f"mean_{name}_ms": statistics.fmean(ms) if ms else 0.0,
        f"median_{name}_ms": statistics.median(ms) if ms else 0.0,
        f"std_{name}_ms": statistics.pstdev(ms) if ms else 0.0,
    }
    for p in percentiles:
        out[f"p{_pct_name(p)}_{name}_ms"] = percentile(ms, p)
    return out


def tpot(r: RequestResult) -> float | None:
    """Time per output token after the first, or None with fewer than two output tokens."""
    if r.output_tokens <= 1:
        return None
    return (r.latency - r.ttft) / (r.output_tokens - 1)


def peak_concurrency(results: Sequence[RequestResult]) -> int:
    """Most successful requests in flight at once (half-open intervals [start, start + e2el))."""
    events: list[tuple[float, int]] = []
    for r in results:
        if r.success:
            events.append((r.start_time, 1))
            events.append((r.start_time + r.latency, -1))
    events.sort()  # at equal times -1 sorts before +1: a request ending frees its slot first
    cur = peak = 0
    for _, d in events:
        cur += d
        peak = max(peak, cur)
    return peak


def peak_output_tokens_per_s(results: Sequence[RequestResult]) -> float:
    """Most content chunks received in any one-second bucket since the first request started."""
    ok = [r for r in results if r.success]
    if not ok:
        return 0.0
    t0 = min(r.start_time for r in ok)
    buckets: dict[int, int] = {}
    for r in ok:
        t = r.start_time + r.ttft
        buckets[int(t - t0)] = buckets.get(int(t - t0), 0) + 1
        for gap in r.itl:
            t += gap
            buckets[int(t - t0)] = buckets.get(int(t - t0), 0) + 1
    return float(max(buckets.values()))


def calculate_metrics(
    results: Sequence[RequestResult],
    duration: float,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
) -> dict[str, Any]:
    """The summary of a run: counts, throughputs and latency statistics (vLLM's names)."""
    if duration <= 0:
        raise ValueError(f"duration must be > 0, got {duration}")
    ok = [r for r in results if r.success]
    total_input = sum(r.prompt_len for r in ok)
    total_output = sum(r.output_tokens for r in ok)
    ttfts = [r.ttft for r in ok]
    e2els = [r.latency for r in ok]
    itls = [gap for r in ok for gap in r.itl]
    tpots = [t for t in (tpot(r) for r in ok) if t is not None]
    out: dict[str, Any] = {
        "duration": duration,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(ok) / duration,
        "output_throughput": total_output / duration,
        "total_token_throughput": (total_input + total_output) / duration,
        "max_output_tokens_per_s": peak_output_tokens_per_s(results),
        "max_concurrent_requests": peak_concurrency(results),
    }
    for name, values in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", e2els)):
        out.update(summarize(values, name, percentiles))
    return out
