"""Byte counts for people: one vocabulary (decimal B / kB / MB / GB) for every command and report."""
from __future__ import annotations


def human_bytes(n: float) -> str:
    """``1.23 GB`` / ``45.6 MB`` / ``7.8 kB`` / ``12 B`` (decimal units, as disk and memory sizes are quoted)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"
