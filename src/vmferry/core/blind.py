"""Pages a guest rewrites unchanged: what QEMU counts and a content comparison cannot see.

A guest writing zeros over zero pages (a zeroing loop, a kernel clearing freed pages) changes
no page's content, so the pre-flight's dirty rate (``calc-dirty-rate`` page sampling and the
memfd scan both compare contents) reads it as idle. QEMU's dirty log counts every write: its
pre-copy finds those pages dirty at every sync, counts each as a whole page against its
switchover threshold and re-sends it as a zero-page flag (:mod:`vmferry.core.precopy_loop`).
A CPU-bound zeroing loop keeps a single-stream pre-copy from ever converging while the
prediction, blind to it, says it is idle.

Nothing outside QEMU sees those writes here (no soft-dirty bits in this kernel, and
``calc-dirty-rate``'s dirty-bitmap mode reports 0 under TCG), but every pre-copy-like move
shows them: once it re-sends only what was dirtied (from its third sync), the zero pages QEMU
sends are pages found dirty and still zero. So each move records that rate
(:func:`rewritten_unchanged_bps`, in its report as ``resent_zero_bps``) and the next plan of
the same VM takes it as ``Measurement.blind_dirty_bps`` (:func:`learnt_rewrites`).

A move also shows whether QEMU kept up with them: a pre-copy that re-sent them and never got
the guest across (cancelled, or run into its deadline, with the guest still on the source)
stalled on them (:func:`stalled_on_rewrites`). The rate alone does not tell: QEMU's threshold
is what its stream carried over the last 100 ms times the downtime limit, and a round of zero
flags carries a few bytes a page, so whether the rounds ever dip under it depends on how much
each sync costs (under TCG it waits for every vCPU to leave its translated block), which a
loaded host stretches. The next plan of that VM then takes the rewrites as keeping pace with
QEMU (``Measurement.blind_keeps_pace``), whatever their rate.

Example:
    >>> from vmferry.core.strategy import Progress
    >>> def at(ms, syncs, zeros):
    ...     return Progress(ms, 0, 0, 0, 0, syncs, None, zero_pages=zeros)
    >>> rewritten_unchanged_bps([at(9_000, 2, 0), at(10_000, 3, 250_000), at(12_000, 40, 850_000)])
    1228800000
    >>> learnt_rewrites([(60.0, 1_228_800_000, False), (30.0, 0, False)])
    Learnt(rate_bps=1228800000, keeps_pace=False)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vmferry.core.strategy import Progress

__all__ = [
    "BLIND_FLOOR_BPS",
    "BLIND_MAX_AGE_S",
    "BLIND_MOVES",
    "Learnt",
    "learnt_rewrites",
    "rewritten_unchanged_bps",
    "stalled_on_rewrites",
]

_PAGE_BYTES = 4096
# From the third sync on, a round sends only pages dirtied since the last one (the round after
# the second still sends the first pass's tail, often zero pages); this long of it is enough.
_FROM_SYNC = 3
_MIN_SPAN_MS = 100
# Below this the rate changes no prediction (and a zero page the guest really changed, then
# cleared, counts too).
BLIND_FLOOR_BPS = 32 << 20
# The VM's latest moves this recent count (workloads change; one move's rate is one sample).
BLIND_MAX_AGE_S = 24 * 3600.0
BLIND_MOVES = 5


def rewritten_unchanged_bps(progress: Sequence[Progress]) -> int | None:
    """Zero pages per second (in bytes of pages) a move's pre-copy re-sent from its third sync
    on: pages found dirty and still zero. None when it did not iterate long enough to tell
    (post-copy, hybrid, a pre-copy done in a pass or two)."""
    iterating = [p for p in progress if p.iterations >= _FROM_SYNC and not p.is_postcopy]
    if len(iterating) < 2:
        return None
    first, last = iterating[0], iterating[-1]
    span_ms = last.elapsed_ms - first.elapsed_ms
    if span_ms < _MIN_SPAN_MS or last.iterations <= first.iterations:
        return None
    pages = max(0, last.zero_pages - first.zero_pages)
    return round(pages * _PAGE_BYTES * 1000 / span_ms)


def stalled_on_rewrites(resent_zero_bps: int | None, *, got_across: bool) -> bool:
    """Whether a move stalled on pages rewritten unchanged: it re-sent them at
    :data:`BLIND_FLOOR_BPS` or more and did not get the guest across."""
    return not got_across and resent_zero_bps is not None and resent_zero_bps >= BLIND_FLOOR_BPS


@dataclass(frozen=True, slots=True)
class Learnt:
    """What a plan takes from a VM's recent moves: the rate of its pages rewritten unchanged
    (0: none seen) and whether one of those moves stalled on them."""

    rate_bps: int
    keeps_pace: bool


def learnt_rewrites(observed: Sequence[tuple[float, int, bool]]) -> Learnt:
    """What a plan takes from the VM's moves' ``(age_s, resent_zero_bps, stalled)``, oldest
    first: of the latest :data:`BLIND_MOVES` no older than :data:`BLIND_MAX_AGE_S`, the highest
    rate (a pre-copy that converged quickly iterated less and saw less), 0 under
    :data:`BLIND_FLOOR_BPS`, and whether any of them stalled on the rewrites."""
    recent = [(bps, stalled) for age_s, bps, stalled in observed if 0.0 <= age_s <= BLIND_MAX_AGE_S]
    recent = recent[-BLIND_MOVES:]
    value = max((bps for bps, _ in recent), default=0)
    if value < BLIND_FLOOR_BPS:
        return Learnt(0, False)
    return Learnt(value, any(stalled for _, stalled in recent))
