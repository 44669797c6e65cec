"""What the benchmark scripts share: where results go, the machine they ran on, writing results.

Nothing here imports torch or Berth at import time (``operator_scale.py`` needs neither).
"""

from __future__ import annotations

import contextlib
import json
import platform
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def memory_gib() -> int:
    """Total memory in whole GiB (``/proc/meminfo``), 0 when unknown."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(Path("/proc/meminfo").read_text().split()[1]) // 1024 // 1024
    return 0


def ml_versions() -> dict[str, str]:
    """torch's and transformers' versions (imports both)."""
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


def write_results(out_dir: Path, stem: str, result: dict[str, Any], markdown: str, indent: int = 1) -> Path:
    """``<out_dir>/<stem>.json`` (raw figures) and ``<stem>.md`` (the table); returns the .md path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=indent, default=str) + "\n")
    md = out_dir / f"{stem}.md"
    md.write_text(markdown)
    return md


def greedy_requests(prompts: list[list[int]], max_tokens: int, prefix: str) -> list[Any]:
    """One engine request per prompt: greedy, EOS ignored, ``max_tokens`` each, ids ``<prefix>-<i>``."""
    from berth.server.engine import GenerationRequest, SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return [GenerationRequest(f"{prefix}-{i}", ids, params) for i, ids in enumerate(prompts)]
