"""bench/gpu_engine.py --smoke: the GPU benchmark script runs end to end on CPU (tiny Qwen2-shaped model)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_engine.py"


def test_gpu_engine_smoke(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--models", "tiny-qwen2", "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads((tmp_path / "gpu-engine-cpu-smoke.json").read_text())
    md = (tmp_path / "gpu-engine-cpu-smoke.md").read_text()
    assert md.startswith("# CPU SMOKE RUN — not a benchmark")
    assert report["smoke"] is True and report["label"].startswith("CPU SMOKE")
    env = report["environment"]
    assert env["device"] == "cpu" and env["torch"] and env["transformers"]
    m = report["models"]["tiny-qwen2"]
    wl = report["workload"]
    eng = m["engine"]
    assert eng["output_tokens"] == eng["output_tokens_expected"] == wl["num_requests"] * wl["output_len"]
    assert eng["output_tokens_per_s"] > 0 and eng["b1_decode_tokens_per_s"] > 0
    assert eng["b1_output_tokens"] == wl["b1_output_len"]
    # float32 on CPU: the engine's greedy tokens equal transformers generate token for token
    checks = {k: v for k, v in m["greedy_check"].items() if isinstance(v, dict)}
    assert checks and all(c["exact"] for c in checks.values()), checks
    assert m["generate"]["output_tokens"] == wl["num_requests"] * wl["output_len"]
    assert m["static_b1"]["output_tokens"] == wl["b1_output_len"]
    if "skipped" not in m["generate_batch"]:
        assert m["generate_batch"]["output_tokens"] == wl["num_requests"] * wl["output_len"]
    srv = m["server"]
    for run in ("throughput", f"concurrency_{wl['concurrency']}"):
        assert srv[run]["completed"] == wl["num_requests"] and srv[run]["failed"] == 0, srv[run]
        assert srv[run]["total_output_tokens"] == wl["num_requests"] * wl["output_len"]
    assert srv[f"concurrency_{wl['concurrency']}"]["p99_ttft_ms"] > 0
    assert m["ratios"]["engine_vs_generate"] is not None
    # the static-shape decode path (what CUDA graphs capture), eager on CPU: same tokens, and it did run
    graphs = m["engine_graphs"]
    assert graphs["engine_config"]["cuda_graphs"] is True and eng["engine_config"]["cuda_graphs"] is False
    assert graphs["static_decode_steps"] > 0 and eng["static_decode_steps"] == 0
    assert graphs["cuda_graph_captures"] == 0  # nothing is captured on CPU
    assert graphs["output_tokens"] == eng["output_tokens"]
    gchecks = {k: v for k, v in m["greedy_check_graphs"].items() if isinstance(v, dict)}
    assert gchecks and all(c["exact"] for c in gchecks.values()), gchecks
    assert m["ratios"]["graphs_vs_eager"] is not None
    assert "| tiny-qwen2 |" in md
