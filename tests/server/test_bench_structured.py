"""bench/structured.py --smoke: the structured-outputs benchmark runs end to end on SmolLM2 (CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "structured.py"


def test_structured_bench_smoke(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "structured-cpu-smoke.json").read_text())
    # 2 requests x 4 tokens in each mode: the grammar's answer cannot end inside the budget
    assert [r["tokens"] for r in report["rounds"]["off"]] == [8]
    assert [r["tokens"] for r in report["rounds"]["json_schema"]] == [8]
    assert (
        report["ratio"] > 0
        and "json_schema / no grammar" in (tmp_path / "structured-cpu-smoke.md").read_text()
    )
