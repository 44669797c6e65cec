#!/usr/bin/env python3
"""Berth's engine against transformers on one GPU, same weights, same workload, one run.

The entry point of the GPU benchmark; the code is in ``bench/gpu/`` (its docstring says what
each section measures and where the results go).

    make bench-gpu                      # python bench/gpu_engine.py
    python bench/gpu_engine.py --models qwen2.5-0.5b --num-requests 64
    python bench/gpu_engine.py --smoke  # CPU, tiny models: proves the script runs
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "operator")]

from bench.gpu.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
