"""`berth serve --threads auto|N` (runner/threads.py): explicit counts set torch's threads, ``auto`` picks one
of the measured candidates and says why (asserted on the log and the engine's info, never on speed)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from berth.server.engine.types import LoadedModel
from berth.server.settings import ServerSettings, settings_from_args


@pytest.fixture
def restore_threads(torch_threads: int) -> Iterator[None]:
    import torch

    yield
    torch.set_num_threads(torch_threads)


def test_the_flag_and_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert settings_from_args([]).threads == "auto"
    assert settings_from_args(["--threads", "3"]).threads == "3"
    assert settings_from_args(["--threads", "AUTO"]).threads == "auto"
    monkeypatch.setenv("BERTH_THREADS", "2")
    assert ServerSettings().threads == "2"
    for bad in ("0", "-1", "two"):
        with pytest.raises(SystemExit):
            settings_from_args(["--threads", bad])


def test_parse_and_choose() -> None:
    from berth.server.engine.runner import threads

    assert threads.parse("auto") is None and threads.parse(None) is None and threads.parse("4") == 4
    with pytest.raises(ValueError, match="positive integer"):
        threads.parse("0")
    n, why = threads.choose({1: {1: 0.010, 8: 0.030}, 4: {1: 0.006, 8: 0.015}})
    assert n == 4 and "batch 1: 1 thread 10.0 ms, 4 threads 6.0 ms" in why
    # 10% faster is inside the margin: one thread stays.
    n, why = threads.choose({1: {1: 0.010, 8: 0.030}, 4: {1: 0.009, 8: 0.027}})
    assert n == 1 and "not clearly faster" in why


def test_usable_cores_follow_the_cgroup_quota(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from berth.server.engine.runner import threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert threads.usable_cores(tmp_path) == (2, "cgroup CPU quota 1.5")
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads.usable_cores(tmp_path) == (8, "CPU affinity")
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert threads.usable_cores(tmp_path) == (3, "cgroup CPU quota 3")


def test_an_explicit_count_sets_torchs_threads(smollm2: LoadedModel, restore_threads: None) -> None:
    import torch

    from berth.server.engine import Engine, EngineConfig, EngineCore

    core = EngineCore(smollm2, EngineConfig(num_blocks=8, prepare_guided=False, threads="3"))
    assert torch.get_num_threads() == 3
    assert (core.threads, core.threads_reason) == (3, "asked for")
    engine = Engine(smollm2, EngineConfig(num_blocks=8, prepare_guided=False, threads="1"))
    assert torch.get_num_threads() == 1
    assert engine.model_info.extra["threads"] == "1"


def test_auto_measures_one_thread_and_every_core_and_logs_why(
    smollm2: LoadedModel,
    restore_threads: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import torch

    from berth.server.engine import EngineConfig, EngineCore, GenerationRequest, SamplingParams
    from berth.server.engine.runner import threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: (2, "test"))
    calls: list[tuple[int, int]] = []
    real = threads.time_threads

    def spy(step, candidates, batches, rounds=5, budget_s=3.0):  # type: ignore[no-untyped-def]
        calls.append((candidates, batches))
        return real(step, candidates, batches, rounds=2, budget_s=1.0)

    monkeypatch.setattr(threads, "time_threads", spy)
    with caplog.at_level(logging.INFO, logger="berth.server.engine.core"):
        core = EngineCore(smollm2, EngineConfig(max_num_seqs=4, prepare_guided=False, threads="auto"))
    assert calls == [((1, 2), (1, 4))]
    assert core.threads in (1, 2) and torch.get_num_threads() == core.threads
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("threads "))
    assert line.startswith(f"threads {core.threads}: auto: ")
    assert "batch 1: 1 thread " in line and "batch 4: 1 thread " in line and "2 threads " in line
    # The probe steps touched only the scratch block: generation still works from a clean cache.
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    out = core.run([GenerationRequest("a", [1, 2, 3], params)])
    assert len([e for e in out["a"] if e.token_id is not None]) == 4


def test_auto_takes_one_core_and_omp_num_threads_as_a_cap(
    smollm2: LoadedModel, restore_threads: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from berth.server.engine import EngineConfig, EngineCore
    from berth.server.engine.runner import threads

    monkeypatch.setattr(threads, "usable_cores", lambda: (4, "test"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    core = EngineCore(smollm2, EngineConfig(num_blocks=8, prepare_guided=False, threads="auto"))
    assert (core.threads, core.threads_reason) == (1, "auto: 1 usable core (OMP_NUM_THREADS=1)")
