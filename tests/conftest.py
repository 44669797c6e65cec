"""Root conftest: the cluster options parse on any pytest run (tests/cluster/conftest.py defines the fixtures)."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    from tests.cluster.harness import add_pytest_options

    add_pytest_options(parser)
