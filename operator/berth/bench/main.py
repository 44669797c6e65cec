"""``berth bench``: load-test an OpenAI-compatible endpoint (Berth, vLLM, TGI, OpenAI, ...).

Requests stream (SSE) over httpx; arrivals are all at once (``--request-rate inf``) or a
Poisson process (gamma with ``--burstiness`` != 1), optionally capped at ``--max-concurrency``
requests in flight. Metric names and definitions follow vLLM's ``bench serve`` (see
``berth.bench.metrics``), so a result file compares with vLLM's.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import math
import os
import random
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import httpx

from berth.bench.client import Endpoint, RequestSpec, api_url, build_payload, send_request
from berth.bench.metrics import DEFAULT_PERCENTILES, RequestResult, calculate_metrics
from berth.bench.prompts import PromptSource, TokenizerPrompts, WordPrompts, build_prompts, load_tokenizer

logger = logging.getLogger(__name__)

BUILTIN_TOKENIZER = "builtin://smollm2-135m-instruct"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="berth bench",
        description="Load-test an OpenAI-compatible endpoint and report vLLM-style serving metrics "
        "(throughput, TTFT, TPOT, ITL, E2EL).",
    )
    add = p.add_argument
    add(
        "--base-url",
        default="http://127.0.0.1:8000",
        help="server URL, with or without /v1 (default %(default)s)",
    )
    add("--api-key", default=None, help="Bearer key (default: $OPENAI_API_KEY when set)")
    add("--model", default=None, help="model name to send (default: the first of GET /v1/models)")
    add(
        "--endpoint",
        choices=["chat", "completions"],
        default="completions",
        help="API to call (default %(default)s)",
    )
    add(
        "--tokenizer",
        default=None,
        help="build prompts of exact token lengths with this tokenizer: a HF directory, a .gguf file or "
        f"'builtin' ({BUILTIN_TOKENIZER}); default: random words (about one token each)",
    )
    add("--num-prompts", type=int, default=100, help="requests to send (default %(default)s)")
    add("--input-len", type=int, default=128, help="prompt tokens per request (default %(default)s)")
    add(
        "--output-len", type=int, default=128, help="max tokens to generate per request (default %(default)s)"
    )
    add(
        "--random-range-ratio",
        type=float,
        default=0.0,
        help="lengths drawn uniformly from [L*(1-r), L*(1+r)] (vLLM's semantics; 0 = fixed)",
    )
    add(
        "--prefix-len", type=int, default=0, help="a shared random prefix of this many tokens on every prompt"
    )
    add(
        "--request-rate",
        type=float,
        default=math.inf,
        help="requests per second (Poisson arrivals); inf sends them all at once (default)",
    )
    add("--burstiness", type=float, default=1.0, help="gamma shape of the arrivals: 1 = Poisson (default)")
    add("--max-concurrency", type=int, default=None, help="at most this many requests in flight")
    add(
        "--ignore-eos",
        action="store_true",
        help="send ignore_eos: true (Berth, vLLM) so every request runs to --output-len",
    )
    add(
        "--temperature", type=float, default=None, help="sampling temperature to send (default: the server's)"
    )
    add("--extra-body", default=None, help="JSON object merged into every request body")
    add("--seed", type=int, default=0, help="seed for prompts, lengths and arrivals (default %(default)s)")
    add("--num-warmups", type=int, default=0, help="requests sent (and not measured) before the run")
    add(
        "--metric-percentiles",
        default=",".join(f"{x:g}" for x in DEFAULT_PERCENTILES),
        help="comma-separated percentiles to report (default %(default)s)",
    )
    add("--timeout", type=float, default=6 * 3600, help="seconds one request may take (default 6 h)")
    add("--result-file", default=None, help="write the JSON result here")
    add("--label", default=None, help="a label stored in the result file")
    add("--save-texts", action="store_true", help="keep the generated texts in the result file")
    add("--no-progress", action="store_true", help="no progress bar on stderr")
    add("--quiet", action="store_true", help="no summary table on stdout")
    return p


# ------------------------------------------------------------------------------------ progress


class Progress:
    """A plain progress bar on a stream: redrawn in place on a terminal, every 10% otherwise."""

    def __init__(self, total: int, stream: TextIO, enabled: bool = True, width: int = 30) -> None:
        self.total = max(total, 1)
        self.stream = stream
        self.enabled = enabled
        self.width = width
        self.done = 0
        self.failed = 0
        self.started = time.perf_counter()
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self._last_draw = 0.0
        self._last_decile = -1

    def update(self, ok: bool) -> None:
        self.done += 1
        self.failed += 0 if ok else 1
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.tty:
            if now - self._last_draw >= 0.1 or self.done == self.total:
                self._last_draw = now
                self.stream.write("\r" + self.line())
                self.stream.flush()
        else:
            decile = self.done * 10 // self.total
            if decile != self._last_decile:
                self._last_decile = decile
                self.stream.write(self.line() + "\n")
                self.stream.flush()

    def line(self) -> str:
        frac = self.done / self.total
        filled = int(frac * self.width)
        elapsed = time.perf_counter() - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        return (
            f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} "
            f"({self.failed} failed) {elapsed:.1f}s elapsed, {rate:.2f} req/s, eta {eta:.0f}s"
        )

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


# ------------------------------------------------------------------------------------ arrivals


async def arrivals(n: int, rate: float, burstiness: float, rng: random.Random) -> AsyncIterator[int]:
    """Yield 0..n-1, sleeping a gamma(burstiness, 1/(rate*burstiness)) gap after each (Poisson at 1)."""
    for i in range(n):
        yield i
        if math.isinf(rate) or i == n - 1:
            continue
        await asyncio.sleep(rng.gammavariate(burstiness, 1.0 / (rate * burstiness)))


# ------------------------------------------------------------------------------------ the run


async def first_model(client: httpx.AsyncClient, base_url: str, headers: dict[str, str]) -> str:
    base = base_url.rstrip("/")
    url = (base if base.endswith("/v1") else base + "/v1") + "/models"
    resp = await client.get(url, headers=headers)
    resp.raise_for_status()
    data = resp.json().get("data") or []
    if not data:
        raise RuntimeError(f"{url} lists no models; pass --model")
    return str(data[0]["id"])


async def run_benchmark(
    args: argparse.Namespace,
    specs: Sequence[RequestSpec],
    progress: Progress | None = None,
) -> tuple[list[RequestResult], float, str]:
    """Send every request; return (results in request order, duration in s, model name)."""
    headers = {"Content-Type": "application/json"}
    key = args.api_key or os.environ.get("OPENAI_API_KEY")
    if key:
        headers["Authorization"] = f"Bearer {key}"
    endpoint: Endpoint = args.endpoint
    url = api_url(args.base_url, endpoint)
    extra = json.loads(args.extra_body) if args.extra_body else None
    if extra is not None and not isinstance(extra, dict):
        raise ValueError("--extra-body must be a JSON object")
    conns = args.max_concurrency or len(specs)
    limits = httpx.Limits(max_connections=max(conns, 1) + 4, max_keepalive_connections=max(conns, 1) + 4)
    timeout = httpx.Timeout(args.timeout, connect=60.0)
    rng = random.Random(args.seed)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        model = args.model or await first_model(client, args.base_url, headers)

        def payload(spec: RequestSpec) -> dict[str, Any]:
            return build_payload(
                endpoint,
                model,
                spec,
                ignore_eos=args.ignore_eos,
                temperature=args.temperature,
                extra_body=extra,
            )

        if args.num_warmups > 0 and specs:
            sem_w = asyncio.Semaphore(args.max_concurrency or args.num_warmups)

            async def warm() -> RequestResult:
                async with sem_w:
                    return await send_request(client, url, payload(specs[0]), endpoint, specs[0], headers)

            warm_results = await asyncio.gather(*(warm() for _ in range(args.num_warmups)))
            bad = [w for w in warm_results if not w.success]
            if bad:
                logger.warning(
                    "%d of %d warm-up requests failed: %s", len(bad), len(warm_results), bad[0].error
                )

        sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None

        async def one(spec: RequestSpec) -> RequestResult:
            arrived = time.perf_counter()
            if sem is None:
                res = await send_request(client, url, payload(spec), endpoint, spec, headers)
            else:
                async with sem:
                    res = await send_request(client, url, payload(spec), endpoint, spec, headers)
            res.client_queue_time = res.start_time - arrived
            if progress is not None:
                progress.update(res.success)
            return res

        start = time.perf_counter()
        if progress is not None:
            progress.started = start
        tasks: list[asyncio.Task[RequestResult]] = []
        async for i in arrivals(len(specs), args.request_rate, args.burstiness, rng):
            tasks.append(asyncio.create_task(one(specs[i])))
        results = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - start
    return results, duration, model


# ------------------------------------------------------------------------------------ output


def build_result(
    args: argparse.Namespace,
    model: str,
    specs: Sequence[RequestSpec],
    results: Sequence[RequestResult],
    duration: float,
    percentiles: Sequence[float],
    prompt_source: str,
) -> dict[str, Any]:
    metrics = calculate_metrics(results, duration, percentiles)
    errors = Counter(r.error for r in results if not r.success)
    config = {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in vars(args).items()}
    config.pop("api_key", None)
    out: dict[str, Any] = {
        "date": dt.datetime.now().strftime("%Y%m%d-%H%M%S"),
        "backend": "openai-chat" if args.endpoint == "chat" else "openai",
        "endpoint_type": args.endpoint,
        "label": args.label,
        "base_url": args.base_url,
        "model_id": model,
        "tokenizer_id": args.tokenizer,
        "prompt_source": prompt_source,
        "num_prompts": len(results),
        "request_rate": "inf" if math.isinf(args.request_rate) else args.request_rate,
        "burstiness": args.burstiness,
        "max_concurrency": args.max_concurrency,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "random_range_ratio": args.random_range_ratio,
        "ignore_eos": args.ignore_eos,
        "seed": args.seed,
        "percentiles": list(percentiles),
        **metrics,
        "output_tokens_source": dict(Counter(r.output_tokens_source for r in results if r.success)),
        "error_counts": dict(errors),
        "requested_input_lens": [s.prompt_len for s in specs],
        "requested_output_lens": [s.output_len for s in specs],
        "input_lens": [r.prompt_len for r in results],
        "output_lens": [r.output_tokens if r.success else 0 for r in results],
        "ttfts": [r.ttft for r in results],
        "itls": [r.itl for r in results],
        "latencies": [r.latency for r in results],
        "start_times": [r.start_time for r in results],
        "queue_times": [r.client_queue_time for r in results],
        "errors": [r.error for r in results],
        "config": config,
    }
    if args.save_texts:
        out["generated_texts"] = [r.generated_text for r in results]
    return out


def format_summary(result: dict[str, Any]) -> str:
    pcts: list[float] = result["percentiles"]
    lines = [
        "{:=^60}".format(" Serving Benchmark Result "),
        f"{'Successful requests:':<44}{result['completed']}",
        f"{'Failed requests:':<44}{result['failed']}",
    ]
    if result["max_concurrency"] is not None:
        lines.append(f"{'Maximum request concurrency:':<44}{result['max_concurrency']}")
    if result["request_rate"] != "inf":
        lines.append(f"{'Request rate configured (RPS):':<44}{result['request_rate']:.2f}")
    lines += [
        f"{'Benchmark duration (s):':<44}{result['duration']:.2f}",
        f"{'Total input tokens:':<44}{result['total_input_tokens']}",
        f"{'Total generated tokens:':<44}{result['total_output_tokens']}",
        f"{'Request throughput (req/s):':<44}{result['request_throughput']:.2f}",
        f"{'Output token throughput (tok/s):':<44}{result['output_throughput']:.2f}",
        f"{'Peak output token throughput (tok/s):':<44}{result['max_output_tokens_per_s']:.2f}",
        f"{'Peak concurrent requests:':<44}{result['max_concurrent_requests']}",
        f"{'Total token throughput (tok/s):':<44}{result['total_token_throughput']:.2f}",
    ]
    titles = {
        "ttft": ("Time to First Token", "TTFT"),
        "tpot": ("Time per Output Token (excl. 1st token)", "TPOT"),
        "itl": ("Inter-token Latency", "ITL"),
        "e2el": ("End-to-end Latency", "E2EL"),
    }
    for name, (title, short) in titles.items():
        lines.append(f"{title:-^60}")
        lines.append(f"{f'Mean {short} (ms):':<44}{result[f'mean_{name}_ms']:.2f}")
        lines.append(f"{f'Median {short} (ms):':<44}{result[f'median_{name}_ms']:.2f}")
        for p in pcts:
            if p == 50:
                continue  # the median, printed above
            key = f"p{int(p) if float(p).is_integer() else str(p).replace('.', '_')}_{name}_ms"
            lines.append(f"{f'P{p:g} {short} (ms):':<44}{result[key]:.2f}")
    if result["error_counts"]:
        lines.append("{:-^60}".format("Errors"))
        for msg, n in sorted(result["error_counts"].items(), key=lambda kv: -kv[1])[:10]:
            lines.append(f"{n:>6} x {msg[:200]}")
    lines.append("=" * 60)
    return "\n".join(lines)


def parse_percentiles(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise ValueError(f"--metric-percentiles: {e}") from e
    if not values or any(not 0 <= v <= 100 for v in values):
        raise ValueError(f"--metric-percentiles must be numbers in [0, 100], got {text!r}")
    return values


def make_source(tokenizer: str | None) -> PromptSource:
    if tokenizer is None:
        return WordPrompts()
    ref = BUILTIN_TOKENIZER if tokenizer == "builtin" else tokenizer
    return TokenizerPrompts(load_tokenizer(ref), name=f"tokenizer:{ref}")


def check_args(args: argparse.Namespace) -> None:
    """Raise ValueError naming the flag whose value cannot work."""
    if args.num_prompts < 1:
        raise ValueError("--num-prompts must be >= 1")
    if args.input_len < 1 or args.output_len < 1:
        raise ValueError("--input-len and --output-len must be >= 1")
    if not args.request_rate > 0:
        raise ValueError("--request-rate must be > 0 (inf: all at once)")
    if not args.burstiness > 0:
        raise ValueError("--burstiness must be > 0")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError("--max-concurrency must be >= 1")
    if args.prefix_len < 0:
        raise ValueError("--prefix-len must be >= 0")


def write_result(path: Path, result: dict[str, Any], quiet: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    if not quiet:
        print(f"result written to {path}")


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        percentiles = parse_percentiles(args.metric_percentiles)
        check_args(args)
        source = make_source(args.tokenizer)
        prompts = build_prompts(
            source,
            args.num_prompts,
            args.input_len,
            args.output_len,
            args.random_range_ratio,
            args.seed,
            args.prefix_len,
        )
    except (ValueError, OSError) as e:
        parser.error(str(e))
    specs = [RequestSpec(p.text, p.prompt_len, p.output_len) for p in prompts]
    progress = Progress(len(specs), sys.stderr, enabled=not args.no_progress)
    try:
        results, duration, model = asyncio.run(run_benchmark(args, specs, progress))
    except (httpx.HTTPError, RuntimeError, ValueError) as e:
        print(f"berth bench: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    finally:
        progress.close()
    result = build_result(args, model, specs, results, duration, percentiles, source.name)
    if not args.quiet:
        print(format_summary(result))
    if args.result_file:
        write_result(Path(args.result_file), result, args.quiet)
    if result["completed"] == 0:
        print("berth bench: every request failed", file=sys.stderr)
        return 1
    return 0
