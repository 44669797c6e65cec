"""CPU cost of structured outputs: tokens/s with a json_schema grammar on vs off, same run.

8 (``--concurrency``) sampled requests (temperature 0.8, fixed seeds) on the same chat prompts run
through Berth's engine twice, interleaved ``--rounds`` times: without a grammar (EOS ignored) and
with a JSON schema whose shortest answer is longer than ``--max-tokens`` (an array of at least 200
integers), so both runs generate exactly ``max_tokens`` tokens per request and the same number of
engine steps; only the grammar's mask (fill per constrained row, one batched apply, the matcher's
advance) differs. Output tokens/s over the wall time of each run; the best round of each is
compared. Results: bench/results/structured-cpu.{json,md}.

    python bench/structured.py                     (make bench-structured)
    python bench/structured.py --smoke --out DIR   (a few tokens, to check the script runs)
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "operator")]

from bench.common import RESULTS_DIR, cpu_name, memory_gib, ml_versions, write_results  # noqa: E402

QUESTIONS = [
    "List some numbers.",
    "Give me lottery numbers.",
    "Count for me.",
    "What are your favourite numbers?",
    "Write the years of some events.",
    "Numbers of the houses in my street?",
    "Some prime numbers, please.",
    "Temperatures of this week?",
]
SCHEMA = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 200}


def _run(core: Any, prompts: list[list[int]], max_tokens: int, guided: Any, tag: str) -> tuple[float, int]:
    from berth.server.engine import GenerationRequest, SamplingParams

    reqs = [
        GenerationRequest(
            f"{tag}-{i}",
            ids,
            SamplingParams(
                max_tokens=max_tokens, temperature=0.8, seed=i, ignore_eos=guided is None, guided=guided
            ),
        )
        for i, ids in enumerate(prompts)
    ]
    t0 = time.perf_counter()
    out = core.run(reqs)
    wall = time.perf_counter() - t0
    tokens = sum(sum(1 for e in ev if e.token_id is not None) for ev in out.values())
    return wall, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="builtin://smollm2-135m-instruct")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="2 requests, 4 tokens, 1 round; results as structured-cpu-smoke.*",
    )
    ap.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = ap.parse_args()
    if args.smoke:
        args.concurrency, args.max_tokens, args.rounds = 2, 4, 1

    import torch

    from berth.server.engine import EngineConfig, EngineCore
    from berth.server.engine.guided import schema_spec
    from berth.server.loader import load_model

    threads = torch.get_num_threads()
    model = load_model(args.model, device="cpu")
    core = EngineCore(
        model, EngineConfig(num_blocks=256, block_size=16, max_num_seqs=max(8, args.concurrency))
    )
    prompts = [
        list(
            model.tokenizer.apply_chat_template(
                [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
        )
        for q in (QUESTIONS * (args.concurrency // len(QUESTIONS) + 1))[: args.concurrency]
    ]
    spec = schema_spec(SCHEMA, "response_format")
    core.guides.compile(spec)  # compiled once, as the server's cache would have it
    _run(core, prompts, 4, None, "warm")
    rows: dict[str, list[dict[str, float]]] = {"off": [], "json_schema": []}
    for r in range(args.rounds):
        for name, guided in (("off", None), ("json_schema", spec)):
            wall, tokens = _run(core, prompts, args.max_tokens, guided, f"{name}{r}")
            rows[name].append({"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall})
            print(
                f"round {r} {name:12s} {tokens} tokens in {wall:.2f}s = {tokens / wall:.1f} tok/s", flush=True
            )
    best = {k: max(x["tokens_per_s"] for x in v) for k, v in rows.items()}
    ratio = best["json_schema"] / best["off"]
    machine = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": threads,
        "memory_gib": memory_gib(),
        "load_average_at_start": os.getloadavg(),
        **ml_versions(),
    }
    result = {
        "model": args.model,
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "rounds": rows,
        "best": best,
        "ratio": ratio,
        "machine": machine,
    }
    print(f"json_schema / off = {ratio:.3f}")
    when = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    md = f"""# Structured outputs on CPU: json_schema on vs off ({args.model})

Machine: {machine["cpu"]}, {machine["cores"]} cores ({threads} torch threads), {machine["memory_gib"]} GiB; load average at start {machine["load_average_at_start"][0]:.2f}; torch {machine["torch"]}, transformers {machine["transformers"]}; {when}.

{args.concurrency} concurrent sampled requests (temperature 0.8), {args.max_tokens} output tokens each, Berth's engine; with the grammar the schema's shortest answer is longer than the budget, so both runs make the same number of tokens and steps. Best of {args.rounds} interleaved rounds.

| | output tokens/s (best) | rounds |
|---|---|---|
| no grammar | {best["off"]:.1f} | {", ".join(f"{x['tokens_per_s']:.1f}" for x in rows["off"])} |
| json_schema | {best["json_schema"]:.1f} | {", ".join(f"{x['tokens_per_s']:.1f}" for x in rows["json_schema"])} |

json_schema / no grammar: **{ratio:.3f}** (cost {100 * (1 - ratio):.1f}%; the issue's bound: at most 15%).
"""
    print(write_results(args.out, "structured-cpu-smoke" if args.smoke else "structured-cpu", result, md))


if __name__ == "__main__":
    main()
