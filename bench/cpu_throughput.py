"""CPU throughput: Berth's engine vs transformers ``generate``, same model, same run.

For 1, 8 and 32 concurrent requests (chat prompts of different lengths, a fixed number of output
tokens each, EOS ignored) it measures output tokens/s of
  (a) Berth's engine: all requests submitted at once through ``Engine.generate`` (the stepping
      thread + asyncio front the server uses), continuous batching over the paged KV cache;
  (b) transformers ``model.generate``, one request at a time;
  (c) transformers ``model.generate``, all requests in one left-padded batch;
and checks that the engine's greedy tokens equal (b)'s for every request. With ``--backends native
transformers`` (a) runs once per model-runner backend, on the same prompts, in the same run. Results go
to bench/results/cpu-<tag>.json and .md with the machine (CPU, cores, load, torch/transformers).

    python bench/cpu_throughput.py                      (make bench-cpu)
    python bench/cpu_throughput.py --max-tokens 16 --concurrency 1 8
    python bench/cpu_throughput.py --backends native transformers --tag backends   (make bench-backends)
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "operator")]

from bench.common import RESULTS_DIR, cpu_name, greedy_requests, memory_gib, ml_versions, write_results  # noqa: E402

QUESTIONS = [
    "Hi",
    "What is the capital of France?",
    "Name three colors of the rainbow.",
    "Explain in simple words why the sky is blue.",
    "Write a short poem about a cat sleeping in the sun on a warm afternoon.",
    "What are the main differences between a list and a tuple in Python? Answer briefly.",
    "Summarize the plot of a story where a young girl finds a map to a hidden island full of treasure.",
    "Give me a recipe idea with tomatoes.",
]


def machine(threads: int) -> dict[str, Any]:
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": threads,
        "memory_gib": memory_gib(),
        "load_average_at_start": list(os.getloadavg()),
        "python": platform.python_version(),
        **ml_versions(),
        "platform": platform.platform(),
    }


def prompts(tokenizer: Any, n: int) -> list[list[int]]:
    out = []
    for i in range(n):
        q = QUESTIONS[i % len(QUESTIONS)]
        if i >= len(QUESTIONS):
            q = f"{q} (variant {i})"
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True
        )
        ids = ids["input_ids"] if not isinstance(ids, list) else ids
        out.append([int(t) for t in ids])
    return out


def cut(tokens: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[:i]
    return tokens


def run_engine(loaded: Any, reqs: list[list[int]], max_tokens: int, block_size: int) -> dict[str, Any]:
    from berth.server.engine import Engine, EngineConfig

    engine = Engine(
        loaded,
        EngineConfig(
            max_num_seqs=max(32, len(reqs)),
            max_num_batched_tokens=2048,
            block_size=block_size,
            prepare_guided=False,
        ),
    )
    engine.start()

    async def one(req: Any) -> tuple[list[int], float]:
        t0 = time.perf_counter()
        first = 0.0
        toks: list[int] = []
        async for ev in engine.generate(req):
            if not toks:
                first = time.perf_counter() - t0
            if ev.token_id is not None:
                toks.append(ev.token_id)
        return toks, first

    async def all_() -> list[tuple[list[int], float]]:
        return await asyncio.gather(*(one(req) for req in greedy_requests(reqs, max_tokens, "b")))

    try:
        t0 = time.perf_counter()
        res = asyncio.run(all_())
        wall = time.perf_counter() - t0
        st = engine.stats()
    finally:
        engine.stop()
    n_out = sum(len(t) for t, _ in res)
    ttfts = sorted(f for _, f in res)
    return {
        "wall_s": wall,
        "output_tokens": n_out,
        "output_tokens_per_s": n_out / wall,
        "steps": st.steps,
        "ttft_p50_s": ttfts[len(ttfts) // 2],
        "ttft_max_s": ttfts[-1],
        "tokens": [t for t, _ in res],
    }


def run_generate_sequential(model: Any, reqs: list[list[int]], max_tokens: int) -> dict[str, Any]:
    import torch

    outs = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for ids in reqs:
            g = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=2,
            )
            outs.append([int(t) for t in g[0, len(ids) :].tolist()])
    wall = time.perf_counter() - t0
    n = sum(len(o) for o in outs)
    return {"wall_s": wall, "output_tokens": n, "output_tokens_per_s": n / wall, "tokens": outs}


def run_generate_batched(
    model: Any, tokenizer: Any, reqs: list[list[int]], max_tokens: int
) -> dict[str, Any]:
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(len(r) for r in reqs)
    ids = torch.full((len(reqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(reqs), width), dtype=torch.long)
    for i, r in enumerate(reqs):  # left padding
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    t0 = time.perf_counter()
    with torch.inference_mode():
        g = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
    wall = time.perf_counter() - t0
    n = int(g[:, width:].numel())
    return {"wall_s": wall, "output_tokens": n, "output_tokens_per_s": n / wall}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin://smollm2-135m-instruct")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)"
    )
    ap.add_argument(
        "--sequential-max", type=int, default=8, help="at most this many requests for one-at-a-time generate"
    )
    ap.add_argument(
        "--backends",
        nargs="+",
        default=["native"],
        choices=["native", "transformers"],
        help="engine backends",
    )
    ap.add_argument("--out", default=str(RESULTS_DIR))
    ap.add_argument("--tag", default="smollm2")
    return ap.parse_args()


def measure(
    engines: dict[str, Any], reference: Any, concurrency: int, args: argparse.Namespace
) -> dict[str, Any]:
    """One row: ``concurrency`` requests through each engine backend and through generate (one at a time,
    batched). ``engines``: backend -> loaded model; ``reference``: a model with transformers' own attention."""
    tok = reference.tokenizer
    eos = set(reference.eos_token_ids)
    reqs = prompts(tok, concurrency)
    runs = {b: run_engine(loaded, reqs, args.max_tokens, args.block_size) for b, loaded in engines.items()}
    seq_reqs = reqs[: args.sequential_max]
    seq = run_generate_sequential(reference.model, seq_reqs, args.max_tokens)
    bat = run_generate_batched(reference.model, tok, reqs, args.max_tokens)
    # generate's min_new_tokens masks EOS while the engine's ignore_eos samples it and goes on:
    # compare up to the engine's first EOS.
    same = {
        b: sum(cut(a, eos) == g[: len(cut(a, eos))] for a, g in zip(e["tokens"], seq["tokens"], strict=False))
        for b, e in runs.items()
    }
    engines_s = "  ".join(
        f"{b} {e['output_tokens_per_s']:7.1f} tok/s ({e['steps']} steps)" for b, e in runs.items()
    )
    print(
        f"c={concurrency:>3}  {engines_s}  generate 1-at-a-time {seq['output_tokens_per_s']:7.1f}  "
        f"batched {bat['output_tokens_per_s']:7.1f}  greedy equal {same}/{len(seq_reqs)}",
        flush=True,
    )
    first = next(iter(runs))
    return {
        "concurrency": concurrency,
        "engine": {k: v for k, v in runs[first].items() if k != "tokens"} | {"backend": first},
        "engines": {b: {k: v for k, v in e.items() if k != "tokens"} for b, e in runs.items()},
        "generate_sequential": {k: v for k, v in seq.items() if k != "tokens"} | {"requests": len(seq_reqs)},
        "generate_batched": bat,
        "greedy_equal": f"{same[first]}/{len(seq_reqs)}",
        "greedy_equal_by_backend": {b: f"{n}/{len(seq_reqs)}" for b, n in same.items()},
        "prompt_tokens": [len(r) for r in reqs],
    }


def markdown(result: dict[str, Any], sequential_max: int) -> str:
    info, rows = result["machine"], result["results"]
    lines = [
        f"# CPU throughput: Berth engine vs transformers generate ({result['model']})",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads), "
        f"{info['memory_gib']} GiB; load average at start {info['load_average_at_start'][0]:.2f}; "
        f"Python {info['python']}, torch {info['torch']}, transformers {info['transformers']}; {result['date']}.",
        "",
        f"fp32, {result['max_tokens']} output tokens per request (EOS ignored), chat prompts of "
        f"{min(min(r['prompt_tokens']) for r in rows)}-{max(max(r['prompt_tokens']) for r in rows)} tokens, "
        "greedy. Output tokens/s over the wall time of all requests of a row.",
        "",
        "| concurrent requests | Berth engine | engine steps | engine TTFT p50 | generate, one at a time | "
        "generate, batched (left-padded) | engine / batched | engine greedy == generate |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        e, s, b = r["engine"], r["generate_sequential"], r["generate_batched"]
        lines.append(
            f"| {r['concurrency']} | {e['output_tokens_per_s']:.1f} tok/s | {e['steps']} | {e['ttft_p50_s']:.2f} s | "
            f"{s['output_tokens_per_s']:.1f} tok/s | {b['output_tokens_per_s']:.1f} tok/s | "
            f"{e['output_tokens_per_s'] / b['output_tokens_per_s']:.2f}x | {r['greedy_equal']} |"
        )
    backends = list(rows[0].get("engines", {}))
    if len(backends) > 1:
        lines += [
            "",
            "## Backends, same prompts, same run",
            "",
            "| concurrent requests | "
            + " | ".join(backends)
            + " | "
            + " / ".join(backends[::-1])
            + " | generate, batched | greedy == generate |",
            "|---|" + "---|" * (len(backends) + 3),
        ]
        for r in rows:
            tps = [r["engines"][b]["output_tokens_per_s"] for b in backends]
            lines.append(
                f"| {r['concurrency']} | "
                + " | ".join(f"{t:.1f} tok/s" for t in tps)
                + f" | {tps[-1] / tps[0]:.2f}x | {r['generate_batched']['output_tokens_per_s']:.1f} tok/s | "
                + ", ".join(f"{b} {n}" for b, n in r["greedy_equal_by_backend"].items())
                + " |"
            )
    lines += [
        "",
        f"One-at-a-time generate runs at most {sequential_max} requests of a row (its rate does not depend "
        "on the row). The engine numbers include its asyncio front and stepping thread, as the server uses it.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    args = parse_args()

    import logging

    import torch

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    from berth.server.loader import load_model

    info = machine(args.threads)
    t0 = time.perf_counter()
    # one model per backend (the transformers backend plugs its attention into its model); the reference
    # for generate keeps transformers' own attention
    engines = {b: load_model(args.model, dtype="float32", device="cpu", backend=b) for b in args.backends}
    reference = engines.get("native") or load_model(
        args.model, dtype="float32", device="cpu", backend="native"
    )
    print(f"loaded {args.model} in {time.perf_counter() - t0:.1f}s; machine: {info}", flush=True)
    # warm-up (first-call allocations) for every path
    warm = prompts(reference.tokenizer, 1)
    for loaded in engines.values():
        run_engine(loaded, warm, 2, args.block_size)
    run_generate_sequential(reference.model, warm, 2)

    rows = [measure(engines, reference, c, args) for c in args.concurrency]
    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "model": args.model,
        "dtype": "float32",
        "max_tokens": args.max_tokens,
        "block_size": args.block_size,
        "backends": args.backends,
        "machine": info,
        "results": rows,
    }
    md = markdown(result, args.sequential_max)
    write_results(Path(args.out), f"cpu-{args.tag}", result, md, indent=2)
    print(md)


if __name__ == "__main__":
    main()
