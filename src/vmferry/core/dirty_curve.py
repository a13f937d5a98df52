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

Over longer windows a writer confined to a working set levels off: every page of the set has
been written, and the count stops growing. A 1 s window cannot tell a writer filling a large
set at its rate from one that has filled a small set already (its intercept looks "hot"), and
a plan bounding the set by the non-zero part of RAM then priced a CPU-bound writer of 47 MiB
in a 2 GiB Debian guest as re-dirtying 216 MiB during a hybrid's 40 s pass (it re-sent 49).
:func:`settled_bytes` reads a third, ~2.5 s window: when the count levels off between the
windows it fits ``changed(w) = settled - a x exp(-w / tau)`` through the three and answers
the level; when it still grows near linearly it answers None (the set is larger than a
few seconds of writes show).

Example:
    >>> curve = fit(short_s=0.15, short_bytes=593_920, long_s=2.2, long_bytes=3_952_640)
    >>> round(curve.hot_bytes / 1024), round(curve.rate_bps / 1e6, 2)
    (340, 1.64)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["DirtyCurve", "fit", "settled_bytes"]

# The third window's slope against the second's: at least this much is still growing (None).
_STILL_GROWING = 0.6
# Unless the count grew by at most this share of its level over all three windows: then it has
# levelled off, whatever the noise in its slopes (a writer adding less than that to its set per
# ~2.5 s is not seen: 1 MB per 40 s to a 32 MiB set).
_LEVEL = 0.02


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


def settled_bytes(windows: tuple[tuple[float, float], ...]) -> int | None:
    """The bytes the guest's writes settle into (its dirty set), from three windows
    ``(seconds, changed_bytes)`` in increasing order; None when the count still grows.

    Examples:
        A CPU-bound writer fills its 47 MiB at once; one at 450 MB/s fills 512 MiB
        (536.9 MB) over seconds; one at 6.25 MB/s in 47 MiB is still far from full:

        >>> round(settled_bytes(((0.16, 38.6e6), (1.07, 49.1e6), (2.5, 49.2e6))) / 1e6, 1)
        49.2
        >>> round(settled_bytes(((0.16, 67.4e6), (1.07, 317.9e6), (2.5, 470.8e6))) / 1e6, 1)
        536.8
        >>> settled_bytes(((0.16, 1.0e6), (1.07, 6.3e6), (2.5, 13.4e6))) is None
        True

    Raises:
        ValueError: not three windows, or not increasing.
    """
    if len(windows) != 3 or not 0.0 < windows[0][0] < windows[1][0] < windows[2][0]:
        raise ValueError(f"three increasing windows wanted, got {windows}")
    (w1, c1), (w2, c2), (w3, c3) = windows
    early, late = (c2 - c1) / (w2 - w1), (c3 - c2) / (w3 - w2)
    if c3 <= 0.0 or (late >= _STILL_GROWING * early > 0.0 and c3 - c1 > _LEVEL * c3):
        return None
    if late <= 0.0 or early <= 0.0 or c3 - c1 <= _LEVEL * c3:
        return round(max(c2, c3))  # levelled off already: the set is what changed
    # changed(w) = settled - a exp(-k w): the late rise over the early one fixes k (it falls
    # from the linear ratio towards 0 as k grows), then a and the level.
    wanted = (c3 - c2) / (c2 - c1)

    def rise_ratio(k: float) -> float:
        return (math.exp(-k * w2) - math.exp(-k * w3)) / (math.exp(-k * w1) - math.exp(-k * w2))

    low, high = 1e-6, 1e3
    for _ in range(100):
        mid = math.sqrt(low * high)
        low, high = (mid, high) if rise_ratio(mid) > wanted else (low, mid)
    k = math.sqrt(low * high)
    a = (c2 - c1) / (math.exp(-k * w1) - math.exp(-k * w2))
    return round(max(c3, c2 + a * math.exp(-k * w2)))
