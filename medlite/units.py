"""Byte counts for people: one vocabulary (decimal B / kB / MB / GB) for every command and report."""
from __future__ import annotations

from typing import Iterable, Optional

UNITS = (("GB", 1e9), ("MB", 1e6), ("kB", 1e3), ("B", 1.0))


def byte_unit(n: float) -> str:
    """The unit :func:`human_bytes` picks for ``n``."""
    return next((u for u, size in UNITS if abs(n) >= size), "B")


def common_unit(values: Iterable[float]) -> str:
    """One unit for a column of byte counts (the largest value's), so the numbers align and compare."""
    values = list(values)
    return byte_unit(max((abs(v) for v in values), default=0.0))


def human_bytes(n: float, unit: Optional[str] = None, digits: int = 2) -> str:
    """``1.23 GB`` / ``45.60 MB`` / ``7.80 kB`` / ``12 B`` (decimal units, as disk and memory sizes are quoted).

    ``unit`` forces one unit (a table column: see :func:`common_unit`); ``digits`` decimals.
    """
    unit = unit or byte_unit(n)
    size = dict(UNITS)[unit]
    if unit == "B":
        return f"{int(round(n))} B"
    return f"{n / size:.{digits}f} {unit}"
