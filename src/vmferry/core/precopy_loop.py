"""QEMU's pre-copy loop, simulated one dirty-bitmap sync at a time (pure; the predictor's core).

QEMU switches over when a sync finds the dirty pages under its threshold (the rate it sends at
x the downtime limit). It syncs once its running estimate of the pending pages dips under that
threshold, and it checks the estimate after each burst of up to 50 ms of sending, so about one
burst below the threshold stays unsent at each sync (:func:`sync_point`).

Two kinds of dirty page go round the loop:

* **written pages** (``Measurement.dirty_rate_bps``: pages whose content changed): each costs a
  page on the wire, and counts a page in QEMU's pending estimate;
* **pages rewritten unchanged** (``Measurement.blind_dirty_bps``: a guest writing zeros over
  zero pages): QEMU's dirty log counts them as dirty, a whole page each against its threshold,
  but they leave as zero-page flags, a few bytes each. What each round costs is QEMU's upkeep
  of them (``Calibration.zero_rescan_bps``: the dirty log's per-page work and the zero check,
  under TCG), not the link. A guest that rewrites them faster than QEMU takes them keeps a
  whole round's worth above the threshold at every sync: its pre-copy never converges, while
  the content-based dirty rate says it is idle. A slower one converges in short rounds, and
  its pause is short for the same reason.

  The rate a move sees is capped by QEMU's own: a page it re-protects costs the writer's next
  write to it a slow path under TCG, so a zeroing loop and QEMU settle at about the same pace
  (the lab: 1.18 GB/s of the 1.2 QEMU takes), and the pending pages then neither shrink nor
  grow. A writer seen at :data:`KEEPS_PACE` of QEMU's rate or more is taken as keeping pace,
  and so is one that stalled a pre-copy of this VM before (``Measurement.blind_keeps_pace``:
  on a loaded host each sync costs more and QEMU keeps pace with less): each sync then finds
  one round of them, where the two balance (:func:`round_rewrites`). QEMU's own threshold
  never lets that pass, but vmferry tells QEMU what they cost once the rounds show them
  (:class:`vmferry.core.blind.ZeroPricing`): from then on they hold no switch back, and it
  happens with one round of them pending.

Example:
    >>> from vmferry.core.calibration import Calibration
    >>> from vmferry.core.measurement import Measurement
    >>> from vmferry.core.transfer import Rates
    >>> m = Measurement(ram_bytes=1 << 30, zero_fraction=0.9, compress_ratio=1.0,
    ...                 dirty_rate_bps=0, bandwidth_bps=25_000_000, blind_dirty_bps=1_500_000_000)
    >>> run = simulate(m, 300, Rates.plain(m, Calibration.default()))
    >>> run.converges, run.syncs >= PRICED_AFTER_SYNCS  # only once the rewrites are priced
    (True, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from vmferry.core.blind import PRICED_AFTER_S, PRICED_AFTER_SYNCS
from vmferry.core.measurement import Measurement
from vmferry.core.transfer import Rates

__all__ = [
    "HEADROOM_CAP",
    "KEEPS_PACE",
    "FirstPass",
    "Run",
    "dirty_set",
    "first_pass_dirtied",
    "headroom",
    "pending_after",
    "round_rewrites",
    "simulate",
    "sync_point",
    "zero_set",
]

# QEMU never gives up on a pre-copy; a prediction has to. Past this many rounds the remainder
# shrinks so slowly that calling it convergent would mislead.
_MAX_ROUNDS = 100
# auto-converge (QEMU defaults): cpu-throttle-initial, cpu-throttle-increment, max-cpu-throttle,
# throttle-trigger-threshold (dirtied / sent in a round), and the consecutive triggers needed.
_THROTTLE_INITIAL_PCT = 20
_THROTTLE_INCREMENT_PCT = 10
_THROTTLE_MAX_PCT = 99
_THROTTLE_TRIGGER_RATIO = 0.5
_THROTTLE_TRIGGER_COUNT = 2
# QEMU's pre-copy loop sends for up to 50 ms (MAX_WAIT) between looks at its pending estimate.
_BURST_S = 0.050
# A rate of pages rewritten unchanged this close to QEMU's rescan rate keeps pace with it.
KEEPS_PACE = 0.8
# Each sync under TCG waits for every vCPU and walks the dirty bitmap: this long per GiB of
# guest (the lab, 1 GiB zeroing 64 MiB at 200 Mbit/s: rounds of ~27 ms, ~11 ms of it beyond
# re-sending ~19 MB of zero pages at QEMU's rate).
_SYNC_S_PER_GIB = 0.010
# The slack QEMU keeps per round against a writer at its pace (caps the balance's level; the
# lab guest above, priced: 21-26 ms paused with ~1.1 GB/s of rewrites).
_MIN_SLACK = 0.5
# Dirty-rate headroom beyond this is "plenty"; bisection steps to find it (~0.001 precision).
HEADROOM_CAP = 4.0
_HEADROOM_STEPS = 12


@dataclass(frozen=True, slots=True)
class Run:
    """A simulated pre-copy (times in seconds, setup and switchover excluded)."""

    converges: bool
    copy_s: float  # guest running
    final_s: float  # copying the remainder, guest paused
    sent_bytes: float
    syncs: int  # QEMU's dirty-sync-count, switchover included
    remainder_bytes: float  # written pages at switchover, or where it stalled
    throttle_pct: int = 0
    unchanged_bytes: float = 0.0  # pages rewritten unchanged, pending at the same moment


def pending_after(
    kept_bytes: float, rate_bps: float, seconds: float, dirty_set_bytes: float
) -> float:
    """Dirty bytes after a sync: the ``kept`` pages not yet sent, plus the distinct other pages
    of the dirty set written at random during ``seconds``."""
    if dirty_set_bytes <= 0.0 or rate_bps <= 0.0:
        return kept_bytes
    fresh = max(0.0, dirty_set_bytes - kept_bytes)
    return kept_bytes + fresh * -math.expm1(-rate_bps * seconds / dirty_set_bytes)


def dirty_set(m: Measurement) -> float:
    """The bytes the guest's writes land in (all its RAM unless measured)."""
    return float(m.ram_bytes if m.dirty_set_bytes is None else min(m.dirty_set_bytes, m.ram_bytes))


def zero_set(m: Measurement) -> float:
    """The bytes pages rewritten unchanged land in: zero pages (that is what they are)."""
    return m.ram_bytes * m.zero_fraction


def sync_point(rates: Rates, downtime_limit_ms: int) -> tuple[float, float]:
    """QEMU's switchover threshold (rate x limit), and the bytes still unsent at a sync: it
    syncs once its estimate dips under the threshold, checked after each burst of sending, so
    about one burst under it."""
    threshold = rates.resend_bps * downtime_limit_ms / 1000.0
    return threshold, max(0.0, threshold - rates.resend_bps * _BURST_S)


@dataclass(frozen=True, slots=True)
class FirstPass:
    """What round 0 leaves dirty: bytes written (data to send again), bytes rewritten
    unchanged (zero pages), and the shares of the dirty set dirty after it: of written pages
    (what hybrid's switch leaves on the source to pull behind its queue) and of both kinds
    (the pages a writer faults on after a switch: zero ones come back fast, but one by one)."""

    dirtied_bytes: float
    unchanged_bytes: float
    missing_share: float
    touched_share: float


def first_pass_dirtied(m: Measurement, rates: Rates) -> FirstPass:
    """What round 0 leaves dirty (see :class:`FirstPass`)."""
    dirty, zeros = dirty_set(m), zero_set(m)
    first_s = rates.first_pass_s(m)
    dirtied = pending_after(0.0, float(m.dirty_rate_bps), first_s, dirty)
    unchanged = pending_after(0.0, float(m.blind_dirty_bps), first_s, zeros)
    missing = dirtied / dirty if dirty > 0.0 else 0.0
    touched = min(1.0, missing + (unchanged / zeros if zeros > 0.0 else 0.0))
    return FirstPass(dirtied, unchanged, missing, touched)


def _throttled(pct: int, high: int, dirtied: float, sent: float) -> tuple[int, int]:
    """auto-converge at one sync: QEMU compares what the guest dirtied with what was sent."""
    high = high + 1 if dirtied > _THROTTLE_TRIGGER_RATIO * sent else 0
    if high >= _THROTTLE_TRIGGER_COUNT:
        step = _THROTTLE_INCREMENT_PCT if pct else _THROTTLE_INITIAL_PCT
        pct = min(_THROTTLE_MAX_PCT, pct + step)
    return pct, high


def _keeps_pace(m: Measurement, rate_bps: float, slowed: float, rates: Rates) -> bool:
    """Whether the rewrites keep pace with QEMU: seen stalling a pre-copy of this VM (unless
    auto-converge now slows its vCPUs), or written at :data:`KEEPS_PACE` of QEMU's rate."""
    stalled = m.blind_keeps_pace and m.blind_dirty_bps > 0 and slowed >= 1.0
    return stalled or rate_bps >= KEEPS_PACE * rates.zero_rescan_bps


def round_rewrites(m: Measurement, rate_bps: float, rates: Rates) -> float:
    """Bytes of pages rewritten unchanged that one round finds once QEMU re-sends only them:
    the guest rewrites them while QEMU syncs and re-sends the last round's, and the two settle
    where they balance (a writer at QEMU's pace at :data:`_MIN_SLACK` of slack; at most the
    whole zero part)."""
    if rate_bps <= 0.0:
        return 0.0
    sync_s = _SYNC_S_PER_GIB * max(1.0, m.ram_bytes / 2**30)
    share = min(rate_bps / rates.zero_rescan_bps, 1.0 - _MIN_SLACK)
    return min(zero_set(m), rate_bps * sync_s / (1.0 - share))


def simulate(
    m: Measurement,
    downtime_limit_ms: int,
    rates: Rates,
    *,
    throttle: bool = False,
    rate_scale: float = 1.0,
) -> Run:
    """Simulate QEMU's pre-copy loop (see the module); ``throttle``: auto-converge slows the
    writer, ``rate_scale``: the guest writes that many times faster than measured."""
    dirty, zeros = dirty_set(m), zero_set(m)
    rate = m.dirty_rate_bps * rate_scale
    unchanged_rate = m.blind_dirty_bps * rate_scale
    hot = float(m.hot_bytes)  # written again within any round, however short
    threshold, kept = sync_point(rates, downtime_limit_ms)
    copy_s = first_s = rates.first_pass_s(m)
    sent = m.nonzero_bytes
    pending = pending_after(0.0, rate, copy_s, dirty) + hot
    unchanged = pending_after(0.0, unchanged_rate, copy_s, zeros)
    syncs = 2  # at setup, after round 0
    burst_sent, throttle_pct, high, priced = m.nonzero_bytes, 0, 0, False
    while pending + (0.0 if priced else unchanged) > threshold:
        if throttle:
            left = min(pending, kept) if syncs > 2 else 0.0
            dirtied = pending - left + unchanged
            throttle_pct, high = _throttled(throttle_pct, high, dirtied, burst_sent)
        if syncs - 1 >= _MAX_ROUNDS:
            return Run(False, copy_s, 0.0, sent, syncs, pending, throttle_pct, unchanged)
        left = min(pending, kept)
        burst_sent = pending - left
        seconds = burst_sent / rates.resend_bps + unchanged / rates.zero_rescan_bps
        copy_s += seconds
        sent += burst_sent
        slowed = 1.0 - throttle_pct / 100.0
        # Hot pages come back dirty where they were sent since the last sync: the share of
        # the pending bytes that was sent.
        resent_hot = hot * burst_sent / pending if pending > 0.0 else 0.0
        pending = pending_after(left, rate * slowed, seconds, dirty) + resent_hot
        unchanged = _rewrites_after(m, unchanged_rate * slowed, slowed, seconds, rates)
        syncs += 1
        # vmferry then tells QEMU what they cost (core.blind.ZeroPricing): they no longer
        # hold the switch back, and it happens with one round of them pending.
        priced = (
            unchanged_rate > 0.0
            and syncs >= PRICED_AFTER_SYNCS
            and copy_s - first_s >= PRICED_AFTER_S
        )
    final_s = pending / rates.paused_bps + unchanged / rates.zero_rescan_bps
    return Run(True, copy_s, final_s, sent + pending, syncs + 1, pending, throttle_pct, unchanged)


def _rewrites_after(
    m: Measurement, rate_bps: float, slowed: float, seconds: float, rates: Rates
) -> float:
    """Pages rewritten unchanged that a sync finds after a round of ``seconds``: one round's
    level where they keep pace with QEMU, else what the guest rewrote meanwhile."""
    if _keeps_pace(m, rate_bps, slowed, rates):
        return round_rewrites(m, max(rate_bps, KEEPS_PACE * rates.zero_rescan_bps), rates)
    return pending_after(0.0, rate_bps, seconds, zero_set(m))


def headroom(
    m: Measurement, downtime_limit_ms: int, rates: Rates, *, throttle: bool = False
) -> float:
    """How many times the measured dirty rate a pre-copy tolerates and still converges.

    Convergence only gets harder as the rate grows, so bisect between 1 and the cap.
    """

    def converges(scale: float) -> bool:
        return simulate(m, downtime_limit_ms, rates, throttle=throttle, rate_scale=scale).converges

    if not converges(1.0):
        return 0.0
    if converges(HEADROOM_CAP):
        return HEADROOM_CAP
    low, high = 1.0, HEADROOM_CAP
    for _ in range(_HEADROOM_STEPS):
        middle = (low + high) / 2.0
        low, high = (middle, high) if converges(middle) else (low, middle)
    return low
