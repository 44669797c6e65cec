"""Kubernetes resource quantities ("500m", "1.5", "8Gi", "1e3") as exact decimals.

The operator compares quantities the API server canonicalised ("0.5" comes back as "500m") and turns
a CPU quantity into a thread count; this is the one parser both use (no Kubernetes client needed).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_SUFFIXES: dict[str, Decimal] = {
    "": Decimal(1),
    "m": Decimal("0.001"),
    "k": Decimal(10) ** 3,
    "M": Decimal(10) ** 6,
    "G": Decimal(10) ** 9,
    "T": Decimal(10) ** 12,
    "P": Decimal(10) ** 15,
    "E": Decimal(10) ** 18,
    "Ki": Decimal(2) ** 10,
    "Mi": Decimal(2) ** 20,
    "Gi": Decimal(2) ** 30,
    "Ti": Decimal(2) ** 40,
    "Pi": Decimal(2) ** 50,
    "Ei": Decimal(2) ** 60,
}
_QUANTITY = re.compile(r"^([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))((?:[eE][+-]?[0-9]+)|[a-zA-Z]*)$")


def parse_quantity(value: str | int | float) -> Decimal:
    """The quantity's value; ValueError for something that is no quantity."""
    if isinstance(value, int | float):
        return Decimal(str(value))
    m = _QUANTITY.match(value.strip())
    if m is None:
        raise ValueError(f"{value!r} is not a Kubernetes quantity")
    number, suffix = m.groups()
    try:
        if suffix[:1] in ("e", "E") and suffix[1:].lstrip("+-").isdigit():
            return Decimal(number + suffix)
        if suffix not in _SUFFIXES:
            raise ValueError(f"{value!r}: unknown quantity suffix {suffix!r}")
        return Decimal(number) * _SUFFIXES[suffix]
    except InvalidOperation as e:
        raise ValueError(f"{value!r} is not a Kubernetes quantity") from e
