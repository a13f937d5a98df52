"""How long a migration still has to go, from the progress samples it sends (pure: no I/O, no
clock; the samples' own ``total_ms`` is the time axis).

The naive figure (remaining bytes over throughput minus dirty rate) lies in both directions:
QEMU counts zero pages in ``remaining`` though it sends them as a flag at CPU speed (an idle
1 GiB guest showed 5-9x too long), and the dirty rate is only known after the first pass and
eats the link pass after pass, not once. :class:`EtaEstimator` models the passes instead:

* **first pass** (QEMU's bulk round, ``dirty-sync-count`` 1): the pages left split into data
  pages, which travel at the link's data rate, and zero pages, which cost a few microseconds
  each. How many of the pages left are zero comes from the guest's measured zero share
  (:class:`EtaHints`, a pre-flight or rolling profile) minus the zero pages already sent;
  without it, from the share seen so far (which may be far off: zero pages bunch together).
* **later passes**: each pass re-sends what the guest dirtied during the one before; the
  migration ends once what is left fits in ``link rate x downtime limit`` (QEMU's switchover
  test). A dirty rate at or above the link's rate never converges: no ETA.
* **post-copy**: the pages left are pulled at the link's rate; nothing is dirtied twice.
* **disk stage**: what is left of the disk at the rate the mirror's progress shows (what the
  guest writes meanwhile grows what is left), then the whole RAM as a first pass at the rate
  the mirror copies.

Rates are smoothed exponentially over about a second of QEMU's time. Usage::

    estimator = EtaEstimator(EtaHints(zero_fraction=0.8, dirty_rate_bps=10 << 20))
    for stats in samples:
        estimator.add(stats)
    estimator.eta_ms()  # None: no estimate (not started, or not converging)
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from vmferry.core.calibration import Calibration
from vmferry.core.felt import PAGE_BYTES
from vmferry.core.measurement import Measurement
from vmferry.core.model import Mechanism, MigrationStats
from vmferry.core.predict_touch import destination_share, first_touch_s
from vmferry.core.status import MigrationStatus, Stage

__all__ = ["EtaEstimator", "EtaHints", "zero_page_s"]

# Rates are fitted over the intervals of this much of QEMU's time (its own ``mbps`` covers 100
# ms: too jumpy to divide by, and the first interval is a burst into the socket's buffers).
_WINDOW_MS = 1500.0
_MIN_SPAN_S = 0.2
# Time constant of the smoothing of the disk mirror's rate.
_SMOOTHING_MS = 1000.0
# What a zero page costs before any is measured (QEMU under TCG here), in a pre-copy's pass on
# the source: 0.2-0.5 us where the page is allocated, 3.6-10 us where reading it allocates it,
# ~0.5 us on average over a whole idle lab guest (the ETA bench's recordings); in post-copy,
# where the destination places every zero page it receives: 2-3 us in the bursts of them.
_ZERO_PAGE_PRIOR_S = 1e-6
_POSTCOPY_ZERO_PAGE_PRIOR_S = 2e-6
# Checking an allocated page for zeros, before any first touch (the recordings above).
_ZERO_PAGE_CHECK_S = 0.3e-6
# The disk mirror's rate comes from its progress over this much of QEMU's time (QEMU's own
# throughput figure reads each 16 MiB chunk's burst, ~1.6x the rate the copy keeps).
_DISK_WINDOW_MS = 2000.0
_DISK_MIN_SPAN_MS = 800.0
# After the last pass: device state, the destination's start, the hand-off (measured 0.2-0.5 s
# in the lab, loopback).
_TAIL_PRIOR_MS = 300
# More passes than this, or a dirty rate this close to the link's rate: not converging.
_MAX_PASSES = 60
_CONVERGING_RATIO = 0.95
_RUNNING = frozenset({MigrationStatus.ACTIVE, MigrationStatus.SETUP})


@dataclass(frozen=True, slots=True)
class EtaHints:
    """What is known of the guest before its samples tell (all optional).

    Attributes:
        zero_fraction: share of the guest's pages that are zero (0..1), e.g. a pre-flight's.
        dirty_rate_bps: bytes per second the guest dirties (the first pass cannot see it).
        dirty_set_bytes: bound on the distinct bytes the guest re-dirties, if known.
        zero_page_s: what a zero page costs this move on average (:func:`zero_page_s`), if
            known: where the pages are holes, reading or placing them allocates them, and
            that costs more the larger the guest (an idle 2 GiB guest: ~3 us a page, where the
            prior says 1).
    """

    zero_fraction: float | None = None
    dirty_rate_bps: int | None = None
    dirty_set_bytes: int | None = None
    zero_page_s: float | None = None

    @classmethod
    def planned(cls, m: Measurement, strategy: Mechanism, cal: Calibration) -> EtaHints:
        """What a plan's measurement tells a move by ``strategy``: also what its zero pages
        cost on average, first touches included (:mod:`vmferry.core.predict_touch`)."""
        return cls(
            m.zero_fraction, m.dirty_rate_bps, m.dirty_set_bytes, zero_page_s(m, strategy, cal)
        )


def zero_page_s(m: Measurement, strategy: Mechanism, cal: Calibration) -> float | None:
    """What one of ``m``'s zero pages costs a move by ``strategy`` on average: QEMU's check,
    and the first touches of the holes it reads and of the pages its destination places
    (what the predictor counts, spread over the zero pages); None without zero pages."""
    pages = m.zero_bytes / PAGE_BYTES
    if pages < 1.0:
        return None
    touch_s = first_touch_s(m, cal, destination_share(strategy, cal))
    return max(_ZERO_PAGE_PRIOR_S, _ZERO_PAGE_CHECK_S + touch_s / pages)


@dataclass(frozen=True, slots=True)
class _Interval:
    """What QEMU did between two samples."""

    end_ms: float
    seconds: float
    data_bytes: int
    zeros: int


def _smooth(old: float | None, new: float, dt_ms: float) -> float:
    if old is None:
        return new
    weight = 1.0 - math.exp(-dt_ms / _SMOOTHING_MS)
    return old + weight * (new - old)


class EtaEstimator:
    """Feeds on a migration's progress samples; :meth:`eta_ms` is the time left.

    Args:
        hints: what a measurement of the guest knows (zero share, dirty rate).
        downtime_limit_ms: QEMU's ``downtime-limit``: the last pass fits in link x limit.
        tail_ms: from the end of the last pass to the move being done.
    """

    def __init__(
        self,
        hints: EtaHints | None = None,
        *,
        downtime_limit_ms: int = 300,
        tail_ms: int = _TAIL_PRIOR_MS,
    ) -> None:
        self.hints = hints or EtaHints()
        self.downtime_limit_ms = downtime_limit_ms
        self.tail_ms = tail_ms
        self._last: MigrationStats | None = None
        self._offset_ms = 0.0  # QEMU's clock restarts when RAM follows the disk copy
        self._window: deque[_Interval] = deque()
        self._data_bps: float | None = None  # link rate while data pages travel
        self._zero_page_s: float | None = None  # fitted from what QEMU did
        self._dirty_bps: float | None = None
        self._disk_bps: float | None = None
        self._disk_net_bps: float | None = None
        self._disk_seen: deque[tuple[float, int, int]] = deque()  # (ms, copied, remaining)
        self._pass_started_ms = 0.0
        self._ram_started_ms: float | None = None

    def add(self, stats: MigrationStats) -> None:
        """Take the next sample (in the order they came)."""
        last = self._last
        if last is not None and stats.total_ms < last.total_ms:
            self._offset_ms += last.total_ms
        now_ms = self._offset_ms + stats.total_ms
        if stats.stage is Stage.DISK_COPY:
            self._learn_disk(stats, now_ms)
        elif stats.status is not MigrationStatus.NONE:
            if self._ram_started_ms is None:
                self._ram_started_ms = now_ms
                self._pass_started_ms = now_ms
            if last is not None and last.stage is Stage.MIGRATION:
                self._learn(last, stats, now_ms)
            if stats.dirty_pages_rate > 0:
                self._dirty_bps = float(stats.dirty_rate_bps)
        self._last = stats

    def _learn_disk(self, stats: MigrationStats, now_ms: float) -> None:
        """The mirror's rate: its progress over the last ``_DISK_WINDOW_MS`` once that spans
        ``_DISK_MIN_SPAN_MS``, QEMU's throughput figure (smoothed) before."""
        seen = self._disk_seen
        seen.append((now_ms, stats.disk_copied_bytes, stats.disk_remaining_bytes))
        while len(seen) > 2 and seen[1][0] <= now_ms - _DISK_WINDOW_MS:
            seen.popleft()
        span_ms = now_ms - seen[0][0]
        copied = stats.disk_copied_bytes - seen[0][1]
        if span_ms >= _DISK_MIN_SPAN_MS and copied > 0:
            self._disk_bps = copied * 1000.0 / span_ms
            # What the guest writes meanwhile grows what is left: the copy gains only the rest.
            gained = seen[0][2] - stats.disk_remaining_bytes
            self._disk_net_bps = gained * 1000.0 / span_ms if gained > 0 else None
        elif stats.throughput_bps > 0:
            self._disk_bps = _smooth(self._disk_bps, stats.throughput_bps, 500.0)

    def _zero_cost_s(self, *, postcopy: bool = False) -> float:
        """What one zero page costs: as fitted, else the prior for the kind of pass."""
        if self._zero_page_s is not None:
            return self._zero_page_s
        prior = _POSTCOPY_ZERO_PAGE_PRIOR_S if postcopy else _ZERO_PAGE_PRIOR_S
        planned = self.hints.zero_page_s
        return prior if planned is None else max(prior, planned)

    def _learn(self, last: MigrationStats, stats: MigrationStats, now_ms: float) -> None:
        """Rates from the intervals of the last ``_WINDOW_MS`` of QEMU's migration: each
        interval's time is its data pages at the link's rate plus its zero pages' cost."""
        if stats.iterations != last.iterations:
            self._pass_started_ms = now_ms
        dt_ms = float(stats.total_ms - last.total_ms)
        if dt_ms <= 0:
            return
        data = max(0, stats.normal_pages - last.normal_pages) * stats.page_size
        zeros = max(0, stats.zero_pages - last.zero_pages)
        self._window.append(_Interval(now_ms, dt_ms / 1000.0, data, zeros))
        while self._window and self._window[0].end_ms < now_ms - _WINDOW_MS:
            self._window.popleft()
        for _ in range(2):  # each estimate sharpens the other
            self._fit_data_rate()
            self._fit_zero_cost()

    def _fit_data_rate(self) -> None:
        seconds = data = 0.0
        for interval in self._window:
            spent = interval.seconds - interval.zeros * self._zero_cost_s()
            if interval.data_bytes > 0 and spent > 0.3 * interval.seconds:
                seconds, data = seconds + spent, data + interval.data_bytes
        if seconds >= _MIN_SPAN_S:
            self._data_bps = data / seconds

    def _fit_zero_cost(self) -> None:
        seconds = zeros = 0.0
        for interval in self._window:
            data_s = interval.data_bytes / self._data_bps if self._data_bps else 0.0
            if interval.data_bytes and not self._data_bps:
                continue
            spent = interval.seconds - data_s
            if interval.zeros > 0 and spent > 0.5 * interval.seconds:
                seconds, zeros = seconds + spent, zeros + interval.zeros
        if seconds >= _MIN_SPAN_S and zeros > 0:
            self._zero_page_s = seconds / zeros

    def eta_ms(self) -> int | None:
        """Time left until the move is done, None without an estimate."""
        stats = self._last
        if stats is None:
            return None
        if stats.stage is Stage.DISK_COPY:
            return self._disk_eta_ms(stats)
        if stats.stage is Stage.DISK_SYNCED or stats.status in (
            MigrationStatus.DEVICE,
            MigrationStatus.PRE_SWITCHOVER,
        ):
            return self.tail_ms
        if stats.status.is_postcopy:
            left_s = self._first_pass_s(stats, postcopy=True)
            return None if left_s is None else round(left_s * 1000) + self.tail_ms
        if stats.status not in _RUNNING or stats.iterations == 0:
            return None
        left_s = self._precopy_s(stats)
        return None if left_s is None else round(left_s * 1000) + self.tail_ms

    def _first_pass_s(self, stats: MigrationStats, *, postcopy: bool = False) -> float | None:
        """Seconds to send the pages left of a bulk round (first pass or post-copy)."""
        if not self._data_bps:
            return None
        page = stats.page_size
        left_pages = stats.remaining_bytes / page
        zero_left = self._zero_pages_left(stats, left_pages)
        data_left = left_pages - zero_left
        return data_left * page / self._data_bps + zero_left * self._zero_cost_s(postcopy=postcopy)

    def _zero_pages_left(self, stats: MigrationStats, left_pages: float) -> float:
        """Zero pages among the ``left_pages`` of a bulk round: the measured share of the
        guest less those already sent, else the share seen so far (blind to where zero pages
        bunch: an idle guest's come last)."""
        zero_fraction = self.hints.zero_fraction
        if zero_fraction is not None and stats.total_bytes > 0:
            expected = zero_fraction * stats.total_bytes / stats.page_size
            return min(left_pages, max(0.0, expected - stats.zero_pages))
        seen = stats.normal_pages + stats.zero_pages
        return left_pages * stats.zero_pages / seen if seen > 0 else 0.0

    def _precopy_s(self, stats: MigrationStats) -> float | None:
        """Seconds until the last pass is sent: this pass, then each re-send of what the
        guest dirtied meanwhile, until what is left fits in the downtime limit."""
        link_bps = self._data_bps
        if not link_bps:
            return None
        now_ms = self._offset_ms + stats.total_ms
        if stats.iterations <= 1:
            this_pass = self._first_pass_s(stats)
            if this_pass is None:
                return None
            dirty_bps = float(self.hints.dirty_rate_bps or 0)
        else:
            this_pass = stats.remaining_bytes / link_bps
            dirty_bps = self._dirty_bps or float(self.hints.dirty_rate_bps or 0)
        if dirty_bps >= _CONVERGING_RATIO * link_bps:
            return None
        elapsed_s = (now_ms - self._pass_started_ms) / 1000.0
        later = self._later_passes_s(dirty_bps * (elapsed_s + this_pass), dirty_bps)
        return None if later is None else this_pass + later

    def _later_passes_s(self, pending_bytes: float, dirty_bps: float) -> float | None:
        """Seconds of the passes that re-send ``pending_bytes``, then what that dirtied, ..."""
        link_bps = self._data_bps
        assert link_bps
        threshold = link_bps * self.downtime_limit_ms / 1000.0
        cap = self.hints.dirty_set_bytes
        total_s = 0.0
        for _ in range(_MAX_PASSES):
            if cap is not None:
                pending_bytes = min(pending_bytes, float(cap))
            seconds = pending_bytes / link_bps
            total_s += seconds
            if pending_bytes <= threshold:
                return total_s
            pending_bytes = dirty_bps * seconds
        return None

    def _disk_eta_ms(self, stats: MigrationStats) -> int | None:
        """The disk left at the mirror's rate, then RAM as a first pass at that rate."""
        rate = self._disk_bps
        if not rate:
            return None
        net = self._disk_net_bps or rate
        pages = stats.total_bytes / stats.page_size
        zero_fraction = self.hints.zero_fraction or 0.0
        ram_s = (
            pages * (1 - zero_fraction) * stats.page_size / rate
            + pages * zero_fraction * self._zero_cost_s()
        )
        left_s = stats.disk_remaining_bytes / net + ram_s
        return round(left_s * 1000) + self.tail_ms
