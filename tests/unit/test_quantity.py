"""Kubernetes quantities parse exactly, as the API server reads them."""

from __future__ import annotations

from decimal import Decimal

import pytest

from berth.api.quantity import parse_quantity


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("500m", Decimal("0.5")),
        ("0.5", Decimal("0.5")),
        ("2", Decimal(2)),
        ("1500m", Decimal("1.5")),
        ("8Gi", Decimal(8 * 2**30)),
        ("1k", Decimal(1000)),
        ("1e3", Decimal(1000)),
        (".5", Decimal("0.5")),
        (3, Decimal(3)),
    ],
)
def test_quantities(text: str | int, value: Decimal) -> None:
    assert parse_quantity(text) == value


@pytest.mark.parametrize("text", ["", "abc", "1.5x", "Gi", "1..2"])
def test_not_quantities(text: str) -> None:
    with pytest.raises(ValueError):
        parse_quantity(text)
