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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vmferry.core.model import MigrationStats
from vmferry.core.status import MigrationStatus

if TYPE_CHECKING:  # the predictor's loop reads the pricing's constants: no import at run time
    from vmferry.core.strategy import Progress

__all__ = [
    "BLIND_FLOOR_BPS",
    "BLIND_MAX_AGE_S",
    "BLIND_MOVES",
    "PRICED_AFTER_S",
    "PRICED_AFTER_SYNCS",
    "Learnt",
    "ZeroPricing",
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


# From this sync on a pre-copy only re-sends what was dirtied; this many syncs and this long
# of it tell what each round re-sends.
_PRICE_SYNCS = 3
_PRICE_SPAN_MS = 300
# When pricing starts, as the predictor's loop counts it (core.precopy_loop).
PRICED_AFTER_SYNCS = _FROM_SYNC + _PRICE_SYNCS
PRICED_AFTER_S = _PRICE_SPAN_MS / 1000.0
# Rounds re-sending less than this of zero pages (16 pages) are left to QEMU's own rule.
_PRICE_MIN_ZERO_BYTES = 64 << 10
# The threshold covers this many rounds' worth of zero pages (a round may find more).
_PRICE_ZERO_ROUNDS = 2.0
# Raised again only when the rounds' zero pages call for this much more.
_PRICE_STEP = 1.5


@dataclass(slots=True)
class ZeroPricing:
    """What a pre-copy should tell QEMU its switchover bandwidth is (QMP's
    ``avail-switchover-bandwidth``), so that pages rewritten unchanged count for what they
    cost (pure: fed QEMU's progress samples, no clock of its own).

    QEMU switches over once the pages pending are under its threshold: the bytes its stream
    carried over the last 100 ms times the downtime limit. Each page rewritten unchanged counts
    a whole page there, but while QEMU re-sends only those (zero-page flags, a few bytes each)
    the stream carries almost nothing, so the threshold falls to a few hundred kB, under what
    one round finds again: the pre-copy never converges, though sending all of them while
    paused takes milliseconds. Measured here (a 1 GiB lab guest zeroing 64 MiB, 200 Mbit/s,
    150 ms limit): ~1,100 syncs in 30 s, 27 ms and ~19 MB of zero pages each, never switching;
    told the link's rate it switched once in two moves.

    Once the rounds from the third sync on re-send 16 zero pages or more each and the data they
    re-send fits the limit at the link's rate (what QEMU's own rule lets through), the
    switchover bandwidth is the link's rate plus :data:`_PRICE_ZERO_ROUNDS` rounds of zero
    pages per limit: QEMU then switches with the data it would have anyway plus those zero
    pages pending. Should the data re-sent grow past that, it is set back to the link's rate.
    Where the data alone does not fit, nothing is told: a paced writer of 25 MB/s of zeros over
    64 MiB of a 256 MiB lab guest (200 Mbit/s, a 50 ms goal, so a 14 ms limit) re-sent ~760 kB
    of zero pages and ~690 kB of data (its page bookkeeping) a round, and ran into its deadline
    either way: that data takes 28 ms at the link's rate.

    ``link_bps``: the stream's cap, or 0 to take the fastest rate seen in the first pass.
    """

    limit_ms: int
    link_bps: float = 0.0
    capped: bool = False
    window: list[tuple[int, int, int, int]] = field(default_factory=list)
    told_bps: int | None = None

    def feed(self, stats: MigrationStats) -> int | None:
        """One progress sample; the switchover bandwidth to set now, or None."""
        if stats.iterations <= 1 and not self.capped:
            self.link_bps = max(self.link_bps, float(stats.throughput_bps))
        if stats.status is not MigrationStatus.ACTIVE or stats.iterations < _FROM_SYNC:
            return None
        sample = (stats.total_ms, stats.iterations, stats.zero_pages, stats.normal_pages)
        self.window.append(sample)
        while len(self.window) > 2 and self._spans(self.window[1], sample):
            self.window.pop(0)
        first = self.window[0]
        if not self._spans(first, sample) or self.link_bps <= 0.0:
            return None
        syncs = sample[1] - first[1]
        zero_bytes = (sample[2] - first[2]) * _PAGE_BYTES / syncs
        data_bytes = (sample[3] - first[3]) * _PAGE_BYTES / syncs
        return self._tell(zero_bytes, data_bytes)

    def _spans(self, first: tuple[int, int, int, int], last: tuple[int, int, int, int]) -> bool:
        return last[1] - first[1] >= _PRICE_SYNCS and last[0] - first[0] >= _PRICE_SPAN_MS

    def _tell(self, zero_bytes: float, data_bytes: float) -> int | None:
        limit_s = self.limit_ms / 1000.0
        data_fits = data_bytes <= self.link_bps * limit_s  # what QEMU's own rule lets through
        if not data_fits:
            if self.told_bps is None or self.told_bps <= self.link_bps:
                return None
            self.told_bps = round(self.link_bps)
            return self.told_bps
        if zero_bytes < _PRICE_MIN_ZERO_BYTES:
            return None
        wanted = round(self.link_bps + _PRICE_ZERO_ROUNDS * zero_bytes / limit_s)
        if self.told_bps is not None and wanted <= _PRICE_STEP * self.told_bps:
            return None
        self.told_bps = wanted
        return wanted
