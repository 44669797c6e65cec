"""Tests that cannot pass by accident: a missing prerequisite fails under CI=true (and in `make test`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _pytest(args: list[str], env: dict[str, str], cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("CI", "BERTH_REQUIRE_CLUSTER_BIN")}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", *args],
        env={**clean, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_missing_prerequisite_skips_locally_and_fails_when_required(tmp_path: Path) -> None:
    test = tmp_path / "test_needs_it.py"
    test.write_text(
        "from tests.prerequisites import unavailable\n\ndef test_it():\n    unavailable('no frobnicator')\n"
    )
    pythonpath = {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    local = _pytest([str(test)], pythonpath, cwd=tmp_path)
    assert "1 skipped" in local.stdout, local.stdout
    for env in ({"CI": "true"}, {"BERTH_REQUIRE_CLUSTER_BIN": "1"}):
        required = _pytest([str(test)], {**pythonpath, **env}, cwd=tmp_path)
        assert required.returncode == 1 and "1 failed" in required.stdout, required.stdout
        assert "no frobnicator" in required.stdout


def test_cluster_tests_fail_under_ci_without_the_control_plane(tmp_path: Path) -> None:
    """No binaries (BERTH_CLUSTER_BIN names an empty directory, so nothing is built): under CI=true the
    cluster tests error out instead of skipping."""
    env = {"BERTH_CLUSTER_BIN": str(tmp_path), "CI": "true"}
    r = _pytest(["tests/cluster/test_tenancy.py", "-k", "take_overs"], env)
    assert r.returncode != 0, r.stdout
    assert "skipped" not in r.stdout.splitlines()[-1], r.stdout
    assert "local cluster binaries unavailable" in r.stdout
