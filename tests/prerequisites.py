"""Missing prerequisites (cluster binaries, helm): a skip on a developer's machine, a failure where the
run promised them: under CI=true, and in `make test` / `make test-cluster` (which build them first and
set BERTH_REQUIRE_CLUSTER_BIN=1), so a suite can never pass by skipping."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def required() -> bool:
    return os.environ.get("CI", "").lower() == "true" or os.environ.get("BERTH_REQUIRE_CLUSTER_BIN") == "1"


def unavailable(reason: str) -> NoReturn:
    """Skip with `reason`, or fail with it when the run requires the prerequisite."""
    if required():
        pytest.fail(f"prerequisite missing (CI=true or BERTH_REQUIRE_CLUSTER_BIN=1 require it): {reason}")
    pytest.skip(reason)
