"""Predict what each migration strategy will cost, from a pre-flight measurement of the guest.

The model is the classic iterative pre-copy one, extended per strategy:

* **pre-copy**: round 0 sends every non-zero page (zero pages are detected and sent as a flag:
  they cost a scan, not a transfer, plus a first touch where a page was never allocated:
  :mod:`vmferry.core.predict_touch`); each later round re-sends what the guest dirtied during the
  previous one. The distinct bytes dirtied in ``t`` seconds saturate at the dirty set ``W``:
  ``W * (1 - exp(-rate * t / W))`` (random writes over ``W``; ``W`` is the whole RAM when
  unknown). The link rate is the TCP throughput, capped by what QEMU's migration thread pushes.
  QEMU switches over at the first dirty-bitmap sync that finds the remainder under its threshold
  (rate x downtime limit); it syncs whenever its estimate dips under that threshold, so after a
  re-send the remainder lands just under it, and downtime is about the limit on a slow link. The
  remainder is copied with the guest paused (faster under TCG: no vCPU competes for the cores).
  When the guest dirties at least as fast as the link drains and the dirty set does not fit the
  threshold, the remainder never shrinks: QEMU iterates forever, so ``converges=False`` (also past
  100 syncs). Pages the guest rewrites unchanged (zeros over zero pages, learnt from its earlier
  moves: :mod:`vmferry.core.blind`) count whole against the threshold but cost QEMU's rescan,
  not the link (:mod:`vmferry.core.precopy_loop`, which simulates the loop). Multifd's
  channels find the zero pages themselves: they keep no multifd from converging.
* **multifd** (+zstd): the link carries compressed pages, so guest memory moves at
  ``link x compress_ratio`` in the first pass and ``link x resend_ratio`` after it (the ratio
  of the pages the guest was seen changing, when measured), but no faster than zstd compresses
  on this host.
* **xbzrle**: re-sent pages are delta-encoded; their wire cost is ``1 / resend_ratio`` of a page
  (a proxy for how much of a page changes) plus a fixed encoding overhead, so random pages gain
  nothing and pay the overhead. Round 0 is sent plainly.
* **auto-converge**: QEMU throttles the vCPUs (20 % at first, +10 % per round up to 99 %) once
  the guest dirtied more than half of what a round sent, twice. Throttling only slows a dirtier
  that needs CPU to dirty: a time-paced dirtier under TCG keeps its rate, so the throttle only
  applies when ``Measurement.dirty_is_cpu_bound``.
* **postcopy**: switch at once; the destination pulls every non-zero page while the guest runs
  there. Downtime is the device-state switch only; always converges, but a network failure
  during the copy stops the guest until the link is back.
* **hybrid**: one pre-copy pass, then post-copy of what was dirtied during it.
* **cold**: pause the guest, copy once, resume on the destination: downtime is the whole move.

A disk on local storage moves first (on shared storage nothing of it moves: the caller passes
``disk_copy_bytes=0``, and then the write rate is ignored too). ``blockdev-mirror`` copies its
``D`` allocated bytes (unallocated areas go as write-zeroes commands, which cost nothing here) to
the destination's NBD export over the same link, at the running rate ``L`` (capped like the
migration thread, as QEMU's main loop does the copy; multifd's compression does not apply):

* while it copies in the background the guest writes at ``w`` and re-dirties blocks already
  sent. Net progress is ``L - w``, so the re-copy is ``D * w / (L - w)``, but at most ``D``: the
  mirror's dirty bitmap holds each block once, and a guest can re-dirty no more than was copied.
  The phase takes ``(D + re-copy) / L``.
* at ``w >= L`` the mirror would never get ready: it goes ``write-blocking`` at once, the
  guest's writes are throttled to the link and the copy takes ``D / L``. So a guest writing
  just under the link rate is predicted up to twice as long a disk phase as one writing above
  it: the latter pays in throttled writes instead (the note says so).
* then, until the switchover, write-blocking mirrors every guest write synchronously: the RAM
  stream keeps ``bandwidth - w`` of the link, but at least 10 % of it. The paused switchover
  copy and post-copy's pull (the mirror is cancelled at the switch) have the whole link.
* cold pauses the guest first, then mirrors at the paused rate: the disk adds to the downtime.

``transferred_bytes`` counts the disk too (copy, re-copy, writes mirrored during the RAM phase);
``disk_ms`` is the disk phase alone.

Times include ``Calibration.setup_ms`` (destination start, handshakes), so ``total_ms`` is what
a user waits for after asking, and ``iterations`` counts QEMU's dirty-bitmap syncs (its
``dirty-sync-count``): one at setup, one after each pre-copy round, one at switchover.

Example:
    >>> m = Measurement(ram_bytes=1 << 30, zero_fraction=0.85, compress_ratio=2.0,
    ...                 dirty_rate_bps=1_000_000, bandwidth_bps=25_000_000)
    >>> p = predict("precopy", m, downtime_limit_ms=300, cal=Calibration.default())
    >>> p.converges, p.iterations
    (True, 3)
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from vmferry.core import precopy_loop
from vmferry.core.calibration import Calibration, CalibrationSample
from vmferry.core.errors import ConfigError
from vmferry.core.felt import postcopy_felt_ms, precopy_felt_ms
from vmferry.core.measurement import Measurement
from vmferry.core.model import MECHANISMS, Mechanism, Prediction
from vmferry.core.precopy_loop import (
    HEADROOM_CAP,
    Run,
    first_pass_dirtied,
    simulate,
    sync_point,
)
from vmferry.core.predict_cpu import multifd_cpu
from vmferry.core.predict_touch import destination_share, first_touch_s
from vmferry.core.transfer import DiskPhase, Rates
from vmferry.core.units import format_bytes, format_ms, format_rate

__all__ = [
    "HEADROOM_CAP",
    "STRATEGY_NAMES",
    "Calibration",
    "CalibrationSample",
    "Measurement",
    "StrategyPrediction",
    "check_strategy",
    "format_bytes",
    "format_ms",
    "predict",
    "predict_all",
]

STRATEGY_NAMES: tuple[Mechanism, ...] = MECHANISMS

POSTCOPY_RISK = "a network failure during the copy stops the guest until the link is recovered"
HYBRID_RISK = (
    "a network failure after the switch stops the guest until the link is recovered "
    "(a shorter window than post-copy)"
)

# Multifd hands pages to its channels in 512 KiB packets (QEMU's MULTIFD_PACKET_SIZE), one per
# channel in flight (2 channels, MigrationOptions): those are out of the pending count at a sync,
# and queueing them is quick, so its last rounds are short. That hides this much of a guest's hot
# pages, and of the remainder at the switch (the channels sent it while the guest ran). Measured
# on the matrix bench: multifd converged on every guest whose ~0.3 MiB of hot pages kept a
# pre-copy from it, and its pause on slow links was 2-6 ms where a remainder at the threshold
# would have taken 40-60 ms.
MULTIFD_HIDDEN_BYTES = 2 * (512 << 10)


@dataclass(frozen=True, slots=True)
class StrategyPrediction:
    """What one strategy is predicted to cost.

    Attributes:
        strategy: the strategy.
        converges: whether it finishes by itself (a pre-copy that cannot does not).
        total_ms: from asking to done, None when it does not converge.
        downtime_ms: the guest's pause, None when it does not converge.
        transferred_bytes: bytes of guest memory (before compression) and disk sent, None when
            it does not converge.
        iterations: QEMU's dirty-bitmap sync count, None when it does not converge.
        risk: what can go wrong that a pre-copy does not risk, if anything.
        note: one line for a human (``vmferry plan``).
        dirty_headroom: for pre-copy-like strategies (whose downtime QEMU holds to its limit),
            how many times the measured dirty rate they tolerate and still converge, capped at
            ``HEADROOM_CAP`` (0 when they do not converge); None where the dirty rate cannot
            stop the migration (post-copy, hybrid, cold).
        disk_ms: the disk mirror's phase before RAM moves (guest paused for cold), included in
            ``total_ms``; 0 without a disk to move. Predicted even when RAM does not converge.
        guest_downtime_ms: the longest stall the guest feels (:mod:`vmferry.core.felt`): the
            pause and the resume, and post-copy's page faults; None when it does not converge.
        switch_felt_ms: for a pre-copy-like strategy, the stall the guest would feel if it
            were switched to post-copy after its first pass (re-planning weighs it); else None.
    """

    strategy: Mechanism
    converges: bool
    total_ms: int | None
    downtime_ms: int | None
    transferred_bytes: int | None
    iterations: int | None
    risk: str | None
    note: str
    dirty_headroom: float | None = None
    disk_ms: int = 0
    guest_downtime_ms: int | None = None
    switch_felt_ms: int | None = None

    @property
    def felt_ms(self) -> int | None:
        """The downtime that counts against a goal: the guest's, else QEMU's."""
        return self.downtime_ms if self.guest_downtime_ms is None else self.guest_downtime_ms

    def to_prediction(self) -> Prediction | None:
        """The figures a migration report keeps, None when it does not converge."""
        if self.total_ms is None or self.downtime_ms is None or self.transferred_bytes is None:
            return None
        return Prediction(
            self.total_ms, self.downtime_ms, self.transferred_bytes, self.guest_downtime_ms
        )


def check_strategy(name: str) -> Mechanism:
    """Validate a strategy name.

    Raises:
        ConfigError: not one of ``STRATEGY_NAMES``.
    """
    for known in STRATEGY_NAMES:
        if name == known:
            return known
    raise ConfigError(f"unknown strategy {name!r}: use {', '.join(STRATEGY_NAMES)}")


def predict(
    strategy: str, m: Measurement, *, downtime_limit_ms: int, cal: Calibration
) -> StrategyPrediction:
    """Predict one strategy.

    Args:
        strategy: one of ``STRATEGY_NAMES``.
        m: the pre-flight measurement.
        downtime_limit_ms: QEMU's ``downtime-limit`` (pre-copy switches over once the
            remainder fits it).
        cal: the machine constants.

    Returns:
        The prediction.

    Raises:
        ConfigError: unknown strategy or a non-positive downtime limit.
    """
    name = check_strategy(strategy)
    if downtime_limit_ms <= 0:
        raise ConfigError(f"downtime limit must be positive, got {downtime_limit_ms} ms")
    idle = Rates.plain(m, cal)  # the whole link: guest paused, or after the switch
    touch_s = first_touch_s(m, cal, destination_share(name, cal))
    if name == "cold":
        return _cold(m, cal, idle, touch_s)
    disk = DiskPhase.live(m, idle)
    # Guest running, RAM phase; its first pass allocates the pages nobody touched yet.
    plain = replace(Rates.plain(m, cal, mirror_bps=disk.mirror_bps), touch_s=touch_s)
    if name == "postcopy":
        return _postcopy(m, cal, idle, disk, touch_s)
    if name == "hybrid":
        return _hybrid(m, downtime_limit_ms, cal, plain, idle, disk)
    # Re-planning may switch any of these to post-copy after its first pass.
    first = first_pass_dirtied(m, plain)
    switch_felt = postcopy_felt_ms(
        m, cal, missing_share=first.missing_share, writer_share=first.touched_share
    )
    return replace(
        _live_precopy(name, m, downtime_limit_ms, cal, (plain, idle), disk),
        switch_felt_ms=switch_felt,
    )


def _live_precopy(
    name: Mechanism,
    m: Measurement,
    downtime_limit_ms: int,
    cal: Calibration,
    links: tuple[Rates, Rates],
    disk: DiskPhase,
) -> StrategyPrediction:
    """Pre-copy and its variants (multifd, xbzrle, auto-converge); ``links`` are the running
    rates (the mirror takes its share) and the idle ones (the whole link)."""
    plain = links[0]
    if name == "precopy":
        run = simulate(m, downtime_limit_ms, plain)
        headroom = precopy_loop.headroom(m, downtime_limit_ms, plain)
        note = _precopy_note(m, run, plain)
        return _from_run(name, m, run, cal, note, disk=disk, headroom=headroom)
    if name == "multifd":
        return _multifd(m, downtime_limit_ms, cal, links, disk)
    if name == "xbzrle":
        cost = 1.0 / m.resend_ratio + cal.xbzrle_overhead  # the pages it re-sends
        rates = replace(
            plain, resend_bps=plain.resend_bps / cost, paused_bps=plain.paused_bps / cost
        )
        run = simulate(m, downtime_limit_ms, rates)
        gain = f"re-sent pages cost ~{cost:.0%} of a page"
        note = f"{gain}; {_precopy_note(m, run, rates)}"
        headroom = precopy_loop.headroom(m, downtime_limit_ms, rates)
        return _from_run(name, m, run, cal, note, disk=disk, headroom=headroom)
    return _auto_converge(m, downtime_limit_ms, cal, plain, disk)


def _multifd(
    m: Measurement,
    downtime_limit_ms: int,
    cal: Calibration,
    links: tuple[Rates, Rates],
    disk: DiskPhase,
) -> StrategyPrediction:
    """Pre-copy whose wire carries zstd-compressed pages: the first pass at the RAM's ratio,
    later rounds and the pause at the ratio of the pages the guest changes."""
    plain, idle = links
    # Pages handed to the channels are out of QEMU's pending count until the switch; the
    # channels, not the migration thread, find the zero pages among them, so pages rewritten
    # unchanged keep no multifd from converging (vmferry.core.retry: the matrix's pre-copies
    # that stalled on them all completed with multifd).
    m = replace(m, hot_bytes=max(0, m.hot_bytes - MULTIFD_HIDDEN_BYTES), blind_dirty_bps=0)
    # zstd is the limit once the link carries compressed pages: on the cores the guest's
    # vCPUs leave it while they run, on every channel's core once they are paused.
    cpu = multifd_cpu(m, cal)
    zstd_bps = cpu.compress_bps / plain.scale
    first_bps = min(plain.first_bps * m.compress_ratio, zstd_bps)
    rates = replace(
        plain,
        first_bps=first_bps,
        resend_bps=min(plain.first_bps * m.resend_ratio, zstd_bps),
        paused_bps=min(idle.first_bps * m.resend_ratio, cal.multifd_compress_bps / idle.scale),
    )
    run = simulate(m, downtime_limit_ms, rates)
    if run.converges:
        # The channels sent what they held before the stop: less remains paused.
        left = max(0.0, run.remainder_bytes - MULTIFD_HIDDEN_BYTES)
        run = replace(run, final_s=left / rates.paused_bps)
    gain = f"zstd x{m.compress_ratio:.1f} moves {format_rate(first_bps)} of guest memory"
    if abs(m.resend_ratio - m.compress_ratio) >= 0.1:
        gain += f" (the pages it rewrites x{m.resend_ratio:.1f})"
    note = f"{gain}{cpu.describe()}; {_precopy_note(m, run, rates)}"
    headroom = precopy_loop.headroom(m, downtime_limit_ms, rates)
    return _from_run(
        name="multifd", m=m, run=run, cal=cal, note=note, disk=disk, headroom=headroom,
        contention=cpu.contention,
    )  # fmt: skip


def predict_all(
    m: Measurement, *, downtime_limit_ms: int, cal: Calibration
) -> tuple[StrategyPrediction, ...]:
    """Predict every strategy, in ``STRATEGY_NAMES`` order.

    Raises:
        ConfigError: a non-positive downtime limit.
    """
    return tuple(
        predict(name, m, downtime_limit_ms=downtime_limit_ms, cal=cal) for name in STRATEGY_NAMES
    )


def _from_run(
    name: Mechanism,
    m: Measurement,
    run: Run,
    cal: Calibration,
    note: str,
    risk: str | None = None,
    *,
    disk: DiskPhase,
    headroom: float | None = None,
    contention: float = 1.0,
) -> StrategyPrediction:
    note = disk.note() + note
    if not run.converges:
        return StrategyPrediction(
            name, False, None, None, None, None, risk, note, headroom, disk_ms=disk.ms
        )
    downtime_ms = run.final_s * 1000.0 + cal.switchover_ms
    return StrategyPrediction(
        strategy=name,
        converges=True,
        total_ms=round(cal.setup_ms + (disk.copy_s + run.copy_s) * 1000.0 + downtime_ms),
        downtime_ms=round(downtime_ms),
        transferred_bytes=round(run.sent_bytes + disk.sent_with(run.copy_s)),
        iterations=run.syncs,
        risk=risk,
        note=note,
        dirty_headroom=headroom,
        disk_ms=disk.ms,
        guest_downtime_ms=precopy_felt_ms(
            m, downtime_ms=downtime_ms, cal=cal, multifd=name == "multifd", contention=contention
        ),
    )


# Pages rewritten unchanged pending at the switch are named from one page on: a plan that
# counted them says so, however few a slow writer leaves in one round.
_NOTED_UNCHANGED_BYTES = 4096


def _precopy_note(m: Measurement, run: Run, rates: Rates) -> str:
    stalled = "; a pre-copy stalled on them" if m.blind_keeps_pace else ""
    if not run.converges:
        unchanged = (
            f" and rewrites {format_rate(m.blind_dirty_bps)} unchanged (QEMU counts those too"
            f"{stalled})"
            if m.blind_dirty_bps
            else ""
        )
        return (
            f"dirties {format_rate(m.dirty_rate_bps)}{unchanged} over a "
            f"{format_rate(rates.resend_bps)} link: never converges"
        )
    paused = format_bytes(run.remainder_bytes)
    if run.unchanged_bytes >= _NOTED_UNCHANGED_BYTES:
        # QEMU is told what they cost (core.blind.ZeroPricing) and switches with them pending.
        paused += (
            f" and {format_bytes(run.unchanged_bytes)} of pages rewritten unchanged "
            f"({format_rate(m.blind_dirty_bps)}{stalled})"
        )
    resent = run.sent_bytes - m.nonzero_bytes - run.remainder_bytes
    if resent < 1.0:
        return f"one pass, then {paused} while paused"
    return f"one pass, re-sends {format_bytes(resent)}, then {paused} while paused"


def _auto_converge(
    m: Measurement, downtime_limit_ms: int, cal: Calibration, rates: Rates, disk: DiskPhase
) -> StrategyPrediction:
    throttle = m.dirty_is_cpu_bound
    run = simulate(m, downtime_limit_ms, rates, throttle=throttle)
    headroom = precopy_loop.headroom(m, downtime_limit_ms, rates, throttle=throttle)
    link = format_rate(rates.resend_bps)
    if not run.converges:
        why = (
            f"even a {run.throttle_pct} % throttle does not catch up"
            if m.dirty_is_cpu_bound
            else "vCPU throttling does not slow a paced dirtier"
        )
        note = f"dirties {format_rate(m.dirty_rate_bps)} over a {link} link; {why}: never converges"
        return _from_run("auto-converge", m, run, cal, note, disk=disk, headroom=headroom)
    if run.throttle_pct == 0:
        note = f"no throttling needed; {_precopy_note(m, run, rates)}"
        return _from_run("auto-converge", m, run, cal, note, disk=disk, headroom=headroom)
    return _from_run(
        "auto-converge",
        m,
        run,
        cal,
        f"throttles the guest up to {run.throttle_pct} %; {_precopy_note(m, run, rates)}",
        risk=f"the guest runs up to {run.throttle_pct} % slower until the switchover",
        disk=disk,
        headroom=headroom,
    )


def _postcopy(
    m: Measurement, cal: Calibration, idle: Rates, disk: DiskPhase, touch_s: float
) -> StrategyPrediction:
    # It switches right after the disk phase; the mirror ends there, so the pull has the link.
    # Both hosts' first touches (not slowed by faults).
    copy_s = idle.first_pass_s(m) * cal.postcopy_fault_overhead + touch_s
    return StrategyPrediction(
        strategy="postcopy",
        converges=True,
        total_ms=round(cal.setup_ms + cal.postcopy_switchover_ms + (disk.copy_s + copy_s) * 1000.0),
        downtime_ms=cal.postcopy_switchover_ms,
        transferred_bytes=round(m.nonzero_bytes + disk.sent_with(0.0)),
        iterations=2,  # at setup, at the switch
        risk=POSTCOPY_RISK,
        note=(
            f"{disk.note(mirrors_writes=False)}switches at once, then pulls "
            f"{format_bytes(m.nonzero_bytes)} at {format_rate(idle.first_bps)} while the guest "
            "runs on the destination, stalling on page faults"
        ),
        disk_ms=disk.ms,
        guest_downtime_ms=postcopy_felt_ms(m, cal, missing_share=1.0),
    )


def _hybrid(
    m: Measurement,
    downtime_limit_ms: int,
    cal: Calibration,
    rates: Rates,
    idle: Rates,
    disk: DiskPhase,
) -> StrategyPrediction:
    first_s = rates.first_pass_s(m)
    first = first_pass_dirtied(m, rates)
    dirtied, unchanged = first.dirtied_bytes, first.unchanged_bytes
    # QEMU syncs as soon as the pass's unsent pages dip under the threshold: near its end on a
    # short limit, inside it on a long one, where the sync finds those pages plus what was
    # dirtied (pages rewritten unchanged count whole), and the controller switches there.
    threshold, unsent = sync_point(rates, downtime_limit_ms)
    if unsent + dirtied + unchanged <= threshold:
        # The first sync already fits the threshold: QEMU completes as a pre-copy before the
        # controller gets to switch.
        final_s = dirtied / rates.paused_bps + unchanged / rates.zero_rescan_bps
        run = Run(True, first_s, final_s, m.nonzero_bytes + dirtied, 3, dirtied, 0, unchanged)
        note = f"finishes as a pre-copy after one pass ({format_bytes(dirtied)} while paused)"
        return _from_run("hybrid", m, run, cal, note, disk=disk)
    # After the switch the mirror is gone: the pull has the whole link.
    pull_s = dirtied / idle.resend_bps * cal.postcopy_fault_overhead
    return StrategyPrediction(
        strategy="hybrid",
        converges=True,
        total_ms=round(
            cal.setup_ms + cal.postcopy_switchover_ms + (disk.copy_s + first_s + pull_s) * 1000.0
        ),
        downtime_ms=cal.postcopy_switchover_ms,
        transferred_bytes=round(m.nonzero_bytes + dirtied + disk.sent_with(first_s)),
        iterations=3,  # at setup, after the pass, at the switch
        risk=HYBRID_RISK,
        note=(
            f"{disk.note()}one pass of {format_bytes(m.nonzero_bytes)}, then post-copy pulls "
            f"the {format_bytes(dirtied)} dirtied meanwhile"
        ),
        disk_ms=disk.ms,
        guest_downtime_ms=postcopy_felt_ms(
            m, cal, missing_share=first.missing_share, writer_share=first.touched_share
        ),
    )


def _cold(m: Measurement, cal: Calibration, idle: Rates, touch_s: float) -> StrategyPrediction:
    # The guest is paused first, so the copies run at the paused rate and nothing is re-sent.
    disk = DiskPhase.paused(m, idle)
    copy_s = m.nonzero_bytes / idle.paused_bps + m.zero_bytes / idle.zero_scan_bps + touch_s
    total_ms = round(cal.setup_ms + (disk.copy_s + copy_s) * 1000.0 + cal.switchover_ms)
    what = format_bytes(m.nonzero_bytes)
    if disk.copy_bytes:
        what = f"{format_bytes(disk.copy_bytes)} of disk and {what} of RAM"
    return StrategyPrediction(
        strategy="cold",
        converges=True,
        total_ms=total_ms,
        downtime_ms=total_ms,
        transferred_bytes=round(m.nonzero_bytes + disk.sent_bytes),
        iterations=3,  # at setup, after the pass (nothing dirty), at completion
        risk=None,
        note=f"guest paused for the whole copy of {what}",
        disk_ms=disk.ms,
        guest_downtime_ms=precopy_felt_ms(m, downtime_ms=total_ms, cal=cal),
    )
