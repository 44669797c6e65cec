"""The README's quickstart, run as written: every code block marked `<!-- readme-test: ... -->`.

Markers: `background URL` runs the bash block in the background until URL answers 200 (a server a
user starts in one terminal), `python` runs the Python block (the user's second terminal), `bash`
runs the bash block to the end with `bash -e`. They run in README order, from the repository root,
with nothing but the environment a user has after `make install`.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
MARKED = re.compile(r"<!-- readme-test: (?P<how>[^>]*?) -->\s*```(?P<lang>\w+)\n(?P<code>.*?)```", re.DOTALL)

pytestmark = pytest.mark.slow


def readme_blocks() -> list[tuple[str, str]]:
    return [(m["how"].strip(), m["code"]) for m in MARKED.finditer((ROOT / "README.md").read_text())]


def test_readme_has_the_tested_blocks() -> None:
    kinds = [how.split()[0] for how, _ in readme_blocks()]
    assert kinds == ["background", "python", "bash"]


def test_readme_quickstart_runs_as_written(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BERTH_", "KUBECONFIG", "VIRTUAL_ENV"))}
    background: list[subprocess.Popen[bytes]] = []
    try:
        for i, (how, code) in enumerate(readme_blocks()):
            log = tmp_path / f"block{i}.log"
            if how.startswith("background"):
                url = how.split()[1]
                with log.open("wb") as out:
                    proc = subprocess.Popen(
                        ["bash", "-c", code],
                        cwd=ROOT,
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                background.append(proc)
                deadline = time.monotonic() + 600
                while True:
                    assert proc.poll() is None, f"block {i} exited:\n{log.read_text()[-3000:]}"
                    assert time.monotonic() < deadline, f"{url} never answered:\n{log.read_text()[-3000:]}"
                    try:
                        if httpx.get(url, timeout=2).status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    time.sleep(1)
            elif how == "python":
                r = subprocess.run(
                    [sys.executable, "-c", code],
                    cwd=ROOT,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=300,
                )
                assert r.returncode == 0, r.stderr
                assert "Paris" in r.stdout, r.stdout
            else:
                proc = subprocess.Popen(
                    ["bash", "-e", "-c", code],
                    cwd=ROOT,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    start_new_session=True,
                )
                background.append(proc)  # its own background jobs (the operator) go with its process group
                out, _ = proc.communicate(timeout=900)
                assert proc.returncode == 0, out[-5000:]
                assert re.search(r"NAME\s+MODEL\s+PHASE\s+CAPACITY\s+READY\s+ENDPOINT\s+AGE", out), out[
                    -3000:
                ]
                assert "Scaled" in out and "AllInstancesReady" in out, out[-3000:]
    finally:
        for proc in background:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run(["make", "-s", "cluster-down"], cwd=ROOT, env=env, capture_output=True, timeout=120)
