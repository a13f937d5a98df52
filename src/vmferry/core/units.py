"""Sizes, durations and rates written for humans (decimal units)."""

from __future__ import annotations

__all__ = ["format_bytes", "format_ms", "format_rate"]


def format_bytes(n: float) -> str:
    """Decimal units for humans: ``"420 MB"``, ``"1.2 GB"``, ``"900 kB"``."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            value = n / size
            return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
    return f"{n:.0f} B"


def format_ms(ms: float) -> str:
    """A duration for humans: ``"85 ms"``, ``"1.6 s"``, ``"19 s"``, ``"4.5 min"``."""
    if ms < 1000:
        return f"{ms:.0f} ms"
    if ms < 10_000:
        return f"{ms / 1000:.1f} s"
    if ms < 120_000:
        return f"{ms / 1000:.0f} s"
    return f"{ms / 60_000:.1f} min"


def format_rate(bps: float) -> str:
    """A rate for humans: ``"12 MB/s"``."""
    return f"{format_bytes(bps)}/s"
