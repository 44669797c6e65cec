"""How many threads torch runs on: ``berth serve --threads auto|N`` (``BERTH_THREADS``).

- ``N``: ``torch.set_num_threads(N)`` (and the inter-op pool, where it is not started yet).
- ``auto`` (the server's default): decided at start-up on the machine it runs on. The candidates are one
  thread and every usable core (the CPU affinity mask, capped by a cgroup CPU quota, see ``usable_cores``);
  decode steps of both are timed (wall time: what a thread count changes is how long a step takes, and
  waiting for a busy core is part of it), interleaved, and the median of each kept. Several threads replace
  one only when they are clearly faster (``AUTO_MARGIN``): on a machine shared with other work, threads that
  wait for each other at every op were far slower than one (a median decode step 0.82 s with 2 threads vs
  0.14 s with 1 at load 10 on 2 cores). ``OMP_NUM_THREADS`` in the environment caps the candidates (the operator
  sets it to the pod's CPU limit); on CUDA torch's default stays, and where there is nothing to time (the
  transformers backend) every usable core. Where the runner serves its linears through Berth's CPU kernels
  (the gguf format, runner/cpu_kernels.py), the candidate of several threads is those threads in the kernels with
  torch's own ops on one thread (measured, SmolLM2-135M Q4_1 at one row on 2 cores: all on 1 thread 23.4 ms a
  step, kernels on 2 and torch on 1 19.8 ms, both on 2 29.3 ms: torch's small ops only pay for the fork).

The choice and its figures are logged in one line and shown on ``/info`` (``threads``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from berth.server.engine.runner import cpu_kernels

logger = logging.getLogger(__name__)

# Several threads replace one only when their decode steps take at most this share of one thread's.
AUTO_MARGIN = 0.8


def parse(setting: str | int | None) -> int | None:
    """``auto``/None -> None, else the thread count (ValueError unless a positive integer)."""
    if setting is None or setting == "auto":
        return None
    try:
        n = int(setting)
    except ValueError:
        raise ValueError(f"threads must be auto or a positive integer, not {setting!r}") from None
    if n < 1:
        raise ValueError(f"threads must be auto or a positive integer, not {setting!r}")
    return n


def _cgroup_quota(root: Path) -> float | None:
    """CPUs the cgroup quota allows (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), None when unlimited."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    with contextlib.suppress(OSError, ValueError):
        q = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        p = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if q <= 0 or p <= 0 else q / p
    return None


def usable_cores(cgroup_root: Path = Path("/sys/fs/cgroup")) -> tuple[int, str]:
    """(cores this process may use, where that figure comes from): the affinity mask, capped by the
    cgroup CPU quota (a container's CPU limit), rounded up."""
    try:
        cores, source = len(os.sched_getaffinity(0)), "CPU affinity"
    except (AttributeError, OSError):
        cores, source = os.cpu_count() or 1, "CPU count"
    quota = _cgroup_quota(cgroup_root)
    if quota is not None and math.ceil(quota) < cores:
        return max(1, math.ceil(quota)), f"cgroup CPU quota {quota:g}"
    return cores, source


def set_threads(n: int) -> None:
    """``n`` intra-op threads, and ``n`` inter-op threads where that pool has not started yet."""
    torch.set_num_threads(n)
    if torch.get_num_interop_threads() != n:
        with contextlib.suppress(RuntimeError):  # only settable before any inter-op work started
            torch.set_num_interop_threads(n)


def time_threads(
    step: Callable[[int], None],
    candidates: tuple[int, ...],
    batches: tuple[int, ...],
    rounds: int = 5,
    budget_s: float = 3.0,
    apply: Callable[[int], None] = torch.set_num_threads,
) -> dict[int, dict[int, float]]:
    """{threads: {batch: median wall seconds of one ``step(batch)``}}: candidates interleaved (``apply(n)`` sets
    candidate n), one untimed step of each first, up to ``rounds`` timed rounds (at least one) within about
    ``budget_s``."""
    before = torch.get_num_threads()
    times: dict[int, dict[int, list[float]]] = {n: {b: [] for b in batches} for n in candidates}
    start = time.perf_counter()
    try:
        for i, b in enumerate(batches):
            for n in candidates:
                apply(n)
                step(b)
            for r in range(rounds):
                if r > 0 and time.perf_counter() - start > budget_s * (i + (r + 1) / rounds) / len(batches):
                    break
                for n in candidates:
                    apply(n)
                    t0 = time.perf_counter()
                    step(b)
                    times[n][b].append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
        cpu_kernels.set_threads(None)
    return {n: {b: statistics.median(ts) for b, ts in per.items()} for n, per in times.items()}


def _kernel_threads(n: int) -> None:
    torch.set_num_threads(1)
    cpu_kernels.set_threads(n)


def choose(timings: dict[int, dict[int, float]]) -> tuple[int, str]:
    """(threads, why) from ``time_threads``'s figures of 1 and N threads: N when its steps take at most
    AUTO_MARGIN of one thread's in total over the measured batch sizes, else 1."""
    many = max(timings)
    one, other = timings[1], timings[many]
    figures = ", ".join(
        f"batch {b}: 1 thread {one[b] * 1e3:.1f} ms, {many} threads {other[b] * 1e3:.1f} ms"
        for b in sorted(one)
    )
    if sum(other.values()) <= AUTO_MARGIN * sum(one.values()):
        return many, f"{many} threads decode faster here ({figures} per step, median wall time)"
    return 1, f"{many} threads are not clearly faster here ({figures} per step, median wall time)"


def configure(
    setting: str | int | None,
    *,
    device: torch.device,
    probe: Callable[[int], None] | None,
    max_num_seqs: int,
    kernels: bool = False,
) -> tuple[int, str]:
    """Set torch's threads from ``setting`` (None: leave them); (threads, why). ``kernels``: the probe's linears
    run in Berth's CPU kernels (auto then times their threads with torch's ops on one, see the module doc)."""
    n = parse(setting)
    if n is not None:
        set_threads(n)
        return n, "asked for"
    current = torch.get_num_threads()
    if setting is None:
        return current, "torch's default"
    if device.type != "cpu":
        return current, f"auto on {device.type}: torch's default (not measured off CPU)"
    cores, source = usable_cores()
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and 1 <= int(env) < cores:
        cores, source = int(env), f"OMP_NUM_THREADS={env}"
    if cores <= 1:
        set_threads(1)
        return 1, f"auto: 1 usable core ({source})"
    if probe is None:
        set_threads(cores)
        return cores, f"auto: every usable core ({cores}, {source}); this backend has no decode probe to time"
    t0 = time.perf_counter()
    batches = (1,) if max_num_seqs <= 1 else (1, min(8, max_num_seqs))
    if kernels:
        chosen, why = choose(time_threads(probe, (1, cores), batches, apply=_kernel_threads))
        set_threads(1)
        cpu_kernels.set_threads(chosen)
        why = f"{why}; threads in Berth's CPU kernels, torch's own ops on 1"
    else:
        chosen, why = choose(time_threads(probe, (1, cores), batches))
        set_threads(chosen)
    return (
        chosen,
        f"auto: {why}; {cores} usable cores ({source}); measured in {time.perf_counter() - t0:.1f} s",
    )
