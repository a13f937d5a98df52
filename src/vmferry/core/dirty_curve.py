"""How many distinct bytes a guest dirties in a window, as the window shrinks.

A pre-copy's last rounds on a slow link last ~50 ms, and what counts at each of their syncs is
every page written since the one before. Over such short windows a guest is not its average
rate: a few *hot* pages — its kernel's, a writer's bookkeeping, stacks — are written again
within every window, however short. Measured on the lab guest writing 1.56 MB/s of fresh pages:
~580 KiB changed within 150 ms, ~3.9 MiB within 2.2 s — a line with a ~340 KiB intercept and
the writer's slope. QEMU's ``calc-dirty-rate`` sees only the slope (and in whole MiB/s), so a
pre-copy predicted to converge kept ~300 KiB pending at every sync of its last rounds and never
got under a 280 KiB threshold.

:func:`fit` reads the line from two windows of the same page sample (``qemu.ram_scan``):
``changed(w) = hot + rate x w``.

Example:
    >>> curve = fit(short_s=0.15, short_bytes=593_920, long_s=2.2, long_bytes=3_952_640)
    >>> round(curve.hot_bytes / 1024), round(curve.rate_bps / 1e6, 2)
    (340, 1.64)
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DirtyCurve", "fit"]


@dataclass(frozen=True, slots=True)
class DirtyCurve:
    """``changed(w) = hot_bytes + rate_bps x w`` for windows from ~0.1 s to ~1 s.

    Attributes:
        hot_bytes: distinct bytes written again within any short window (the intercept).
        rate_bps: fresh bytes dirtied per second beyond them (the slope).
    """

    hot_bytes: int
    rate_bps: int


def fit(*, short_s: float, short_bytes: float, long_s: float, long_bytes: float) -> DirtyCurve:
    """The line through two windows' changed bytes (both clamped at 0).

    A guest whose writes saturate its dirty set within the long window bends the line down:
    the slope is then low and the intercept high, both bounded by what the short window saw.

    Raises:
        ValueError: the windows are not positive and increasing.
    """
    if not 0.0 < short_s < long_s:
        raise ValueError(f"windows must satisfy 0 < short < long, got {short_s}, {long_s}")
    rate = max(0.0, (long_bytes - short_bytes) / (long_s - short_s))
    hot = max(0.0, short_bytes - rate * short_s)
    return DirtyCurve(hot_bytes=round(hot), rate_bps=round(rate))
