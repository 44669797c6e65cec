"""`berth serve` settings: command line over BERTH_* environment over defaults, validated at start."""

from __future__ import annotations

from pathlib import Path

import pytest

from berth.server.main import settings_from_args
from berth.server.settings import DEFAULT_MODEL


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("BERTH_PORT", "BERTH_MODEL", "BERTH_API_KEYS", "BERTH_MAX_NUM_SEQS"):
        monkeypatch.delenv(name, raising=False)
    s = settings_from_args([])
    assert s.model == DEFAULT_MODEL and s.port == 8000 and s.api_key_dir is None and not s.log_content


def test_command_line_wins_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BERTH_PORT", "9001")
    monkeypatch.setenv("BERTH_MAX_NUM_SEQS", "4")
    s = settings_from_args(["--port", "9002"])
    assert s.port == 9002 and s.max_num_seqs == 4


def test_adapters_and_key_dir(tmp_path: Path) -> None:
    s = settings_from_args(
        ["--adapter", f"a={tmp_path}", "--adapter", "b=/x", "--api-key-dir", str(tmp_path)]
    )
    assert s.adapter_map() == {"a": str(tmp_path), "b": "/x"}
    assert s.api_key_dir == tmp_path


@pytest.mark.parametrize(
    "argv",
    [
        ["--port", "70000"],
        ["--adapter", "no-equals-sign"],
        ["--api-key-dir", "/does/not/exist"],
        ["--max-num-seqs", "0"],
    ],
)
def test_invalid_values_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        settings_from_args(argv)
    assert exc.value.code == 2
    assert "berth serve: error:" in capsys.readouterr().err
