"""Per-step CPU cost of the native forward's weight formats (`--weight-format`), in the whole model forward.

One decode step of B rows (the runner's start-up probe: every layer, the LM head over B rows, attention over
one cached token) for each format, formats interleaved round by round, on the built-in SmolLM2-135M:
- 1 thread: the CPU time of the calling thread per step (what the weights cost, whatever the machine's load);
- 2 threads: the process CPU time and the wall time per step (wall time waits for cores on a shared machine).
Best of --rounds. The machine's load average is printed before and after.

    python bench/cpu_weight_formats.py                     (fp32 fp16 int8 bf16 gguf, batch 1 8 32)
    python bench/cpu_weight_formats.py --formats fp32 gguf --batches 1 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "operator")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--formats", nargs="+", default=["fp32", "fp16", "int8", "bf16", "gguf"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)

    import torch

    from berth.server.engine.runner import ModelRunner
    from berth.server.loader import load_model

    print("load average before:", os.getloadavg(), flush=True)
    model = load_model("builtin://smollm2-135m-instruct", dtype="float32", device="cpu").model
    runners = {f: ModelRunner(model, num_blocks=4, block_size=16, weight_format=f) for f in args.formats}
    for threads in args.threads:
        torch.set_num_threads(threads)
        for b in args.batches:
            cpu: dict[str, float] = {}
            wall: dict[str, float] = {}
            for r in runners.values():
                r.probe_step(b)
            for _ in range(args.rounds):
                for f, r in runners.items():
                    clock = time.thread_time if threads == 1 else time.process_time
                    c0, w0 = clock(), time.perf_counter()
                    r.probe_step(b)
                    c, w = clock() - c0, time.perf_counter() - w0
                    cpu[f] = min(cpu.get(f, c), c)
                    wall[f] = min(wall.get(f, w), w)
            what = "thread CPU" if threads == 1 else "process CPU / wall"
            cells = [
                f"{f} {cpu[f] * 1e3:.1f}" + ("" if threads == 1 else f"/{wall[f] * 1e3:.1f}") for f in runners
            ]
            print(f"threads {threads} batch {b:2d} ({what}, ms per step): " + ", ".join(cells), flush=True)
    print("load average after:", os.getloadavg())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
