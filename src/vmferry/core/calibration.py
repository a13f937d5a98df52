"""Calibration of the predictor: the machine/QEMU constants it needs, and their refinement
from past migrations (predicted against actual)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace

from vmferry.core.errors import ConfigError
from vmferry.core.model import Mechanism, Prediction

__all__ = ["Calibration", "CalibrationSample"]

# A single sample moves a ratio by at most this factor either way.
_MAX_RATIO = 5.0
# Felt constants are learnt from moves of the same kind of guest once there are this many.
_MIN_SAME_GUEST = 3


@dataclass(frozen=True, slots=True)
class CalibrationSample:
    """One finished migration: what was predicted (with the calibration being refined) and what
    QEMU reported.

    Attributes:
        strategy: the strategy that ran.
        predicted: the prediction made before it started.
        actual_total_ms: the measured total (same scope as the prediction).
        actual_downtime_ms: QEMU's downtime, None if unknown.
        actual_guest_downtime_ms: the longest stall the guest felt, None if unknown.
        guest: the kind of guest that moved (``lab``, ``own``; None if unknown): what a guest
            feels is learnt from its own kind once there are enough of them.
    """

    strategy: Mechanism
    predicted: Prediction
    actual_total_ms: int
    actual_downtime_ms: int | None
    actual_guest_downtime_ms: int | None = None
    guest: str | None = None


@dataclass(frozen=True, slots=True)
class Calibration:
    """Machine and QEMU constants of the model.

    Defaults come from QEMU 10 under TCG on a 2-core host (DESIGN.md "Facts"); ``refined``
    adjusts them from past migrations.

    Attributes:
        qemu_throughput_bps: what one QEMU migration thread pushes at most (CPU-bound under TCG;
            ~420 MB in ~1.0-1.2 s on loopback).
        paused_throughput_bps: what QEMU pushes once the guest is paused (the switchover copy,
            a cold migration): TCG vCPU threads no longer compete for the host's cores.
        zero_scan_bps: how fast QEMU scans and flags zero pages already allocated on both hosts
            (~0.025 s per GiB, fitted with ``touch_ms_per_gib2``; multifd moved 4 GiB guests
            whose source pages were allocated in 0.4 s beyond their link time). A page never
            allocated costs a first touch on top.
        zero_rescan_bps: how fast QEMU's pre-copy takes pages that were dirtied but are still
            zero (a guest writing zeros over zero pages), in bytes of pages: the dirty log's
            upkeep per page and the zero check, under TCG. Measured here: a 1 GiB lab guest
            rewriting 256 MiB of zeros, QEMU counting 1.0-1.3 GiB/s of dirty pages, rounds of
            ~55 ms that each found ~66 MB dirty (:mod:`vmferry.core.precopy_loop`).
        touch_ms_per_gib2: allocating never-touched pages of guest RAM (memfd holes) when QEMU
            reads them on the source or the destination, per GiB of such pages and per GiB of
            the guest's RAM: the cost per page grows with the mapping on this nested host
            (:mod:`vmferry.core.predict_touch`). Least absolute deviations over the 171 moves
            of the fit halves of matrix runs A-D: 0.38 s/GiB in a 1 GiB guest, 1.5 s/GiB in a
            4 GiB one (the held-out halves alone would say 0.30 per GiB of RAM).
        postcopy_touch_share: what post-copy's destination pays per zero page it places, as
            a share of a first touch (f05, f06: about half).
        setup_ms: starting the destination and the handshakes, before the first byte.
        switchover_ms: device state and the final bitmap sync, paid in every pre-copy downtime.
        postcopy_switchover_ms: downtime of a switch to post-copy (device state only; the
            destination runs before its RAM arrives).
        multifd_compress_bps: guest bytes per second zstd compresses for multifd on this host.
        postcopy_fault_overhead: factor on post-copy transfer time (page faults, round trips).
        xbzrle_overhead: extra wire cost of an xbzrle re-sent page, as a fraction of a page
            (headers, cache misses, pages whose delta overflows and go whole).
        time_scale: factor on every predicted transfer time, learnt from history by
            ``refined`` (1.0 = the reference machine).
        resume_felt_ms: what the guest feels beyond QEMU's pause when it runs again on the
            destination (comparison of the held copy, ``cont``, the first tick there).
        multifd_flush_ms: what a multifd move's guest feels beyond that and the channels'
            unsent bytes: the destination decompresses what was in flight after QEMU stopped
            counting its downtime (~0-70 ms here, learnt from history).
        fault_service_ms: one post-copy page fault's handling by both QEMUs (0.6 ms here).
        link_queue_bytes: what stands queued at the sending link in front of a fault's page
            on a link slower than QEMU (~36 KB on the lab's shaped links: TCP's packets in
            flight), when the path's own queue was not measured.
        link_queue_floor_ms: the least a fault's page waits there on a link slower than QEMU:
            TCP small queues keep ~1 ms of a socket's rate queued (matrix runs A-F, fit half:
            post-copy's stalls on 1 Gbit/s links were 1.4-1.9x what 36 KB alone predicted).
        fault_chain: sequential faults a guest takes to run again after a switch to post-copy
            (its hot set: kernel paths, timers, stacks; 300-460 for a 1 GiB lab guest).
        hybrid_hot_share: the share of that chain still missing after hybrid's first pass.
        hybrid_queue_share: the share of the link's queue a fault waits behind after hybrid's
            switch, when the bulk copy has only the pass's dirtied pages left (fit half of
            matrix runs A-F: hybrid's stalls were ~0.6x the full queue's prediction on
            50-200 Mbit/s links).
        writer_chain: extra sequential faults a CPU-bound writer adds (its missing pages).
        (See :mod:`vmferry.core.felt`.)
    """

    qemu_throughput_bps: int = 450_000_000
    paused_throughput_bps: int = 900_000_000
    zero_scan_bps: int = 40_000_000_000
    zero_rescan_bps: int = 1_200_000_000
    setup_ms: int = 300
    switchover_ms: int = 20
    postcopy_switchover_ms: int = 1
    multifd_compress_bps: int = 800_000_000
    postcopy_fault_overhead: float = 1.05
    xbzrle_overhead: float = 0.05
    time_scale: float = 1.0
    resume_felt_ms: int = 30
    multifd_flush_ms: int = 25
    fault_service_ms: float = 0.6
    link_queue_bytes: int = 36_000
    link_queue_floor_ms: float = 1.0
    fault_chain: float = 350.0
    hybrid_hot_share: float = 0.4
    hybrid_queue_share: float = 0.5
    writer_chain: float = 50.0
    touch_ms_per_gib2: float = 380.0
    postcopy_touch_share: float = 0.5

    def __post_init__(self) -> None:
        rates = (
            self.qemu_throughput_bps,
            self.paused_throughput_bps,
            self.zero_scan_bps,
            self.zero_rescan_bps,
            self.multifd_compress_bps,
        )
        if min(rates) <= 0:
            raise ConfigError("calibration rates must be positive")
        if min(self.setup_ms, self.switchover_ms, self.postcopy_switchover_ms) < 0:
            raise ConfigError("calibration times must be >= 0")
        if self.postcopy_fault_overhead < 1.0 or self.xbzrle_overhead < 0.0:
            raise ConfigError("postcopy_fault_overhead must be >= 1 and xbzrle_overhead >= 0")
        if not self.time_scale > 0.0:
            raise ConfigError("time_scale must be positive")
        felt = (
            self.resume_felt_ms,
            self.multifd_flush_ms,
            self.fault_service_ms,
            self.link_queue_bytes,
            self.link_queue_floor_ms,
        )
        chains = (
            self.fault_chain,
            self.hybrid_hot_share,
            self.hybrid_queue_share,
            self.writer_chain,
        )
        if min(*felt, *chains) < 0.0:
            raise ConfigError("felt-downtime constants must be >= 0")
        if self.touch_ms_per_gib2 < 0.0 or not 0.0 <= self.postcopy_touch_share <= 1.0:
            raise ConfigError("touch_ms_per_gib2 must be >= 0 and postcopy_touch_share 0..1")

    @classmethod
    def default(cls) -> Calibration:
        """The reference machine's constants (see the attributes)."""
        return cls()

    def refined(
        self, samples: Sequence[CalibrationSample], *, guest: str | None = None
    ) -> Calibration:
        """Adjust the constants to past migrations predicted with this calibration.

        Transfer times scale by the geometric mean of actual / predicted (setup excluded);
        post-copy samples move ``postcopy_fault_overhead`` instead. Switchover times shift by
        the median downtime error. What the guest felt beyond QEMU's pause after a pre-copy
        shifts ``resume_felt_ms``; post-copy's and hybrid's felt stalls scale ``fault_chain``
        (see :meth:`_refined_felt`). Each adjustment is shrunk towards no change by
        ``n / (n + 2)`` for ``n`` samples, so one odd run does not swing the model, and each
        ratio is clamped to 0.2..5.

        Args:
            samples: (predicted, actual) pairs; unusable ones (non-positive times) are skipped.
            guest: the kind of guest about to move: the felt constants come from moves of
                that kind when there are at least three with a felt stall (a Debian
                userland's fault chain is ~1.5x the lab guest's), else from all.

        Returns:
            A new calibration (this one when there is nothing to learn).
        """
        copy_ratios: list[float] = []
        postcopy_ratios: list[float] = []
        downtime_errors: list[float] = []
        switch_errors: list[float] = []
        for sample in samples:
            predicted_ms = sample.predicted.total_ms - self.setup_ms
            actual_ms = sample.actual_total_ms - self.setup_ms
            if predicted_ms > 0 and actual_ms > 0:
                ratio = min(5.0, max(0.2, actual_ms / predicted_ms))
                (postcopy_ratios if sample.strategy == "postcopy" else copy_ratios).append(ratio)
            if sample.actual_downtime_ms is None or sample.strategy == "cold":
                continue
            error = float(sample.actual_downtime_ms - sample.predicted.downtime_ms)
            if sample.strategy in ("postcopy", "hybrid"):
                switch_errors.append(error)
            else:
                downtime_errors.append(error)

        time_scale = self.time_scale * _shrunk_ratio(copy_ratios)
        # Post-copy times carry time_scale too: move the overhead so that the product matches.
        overhead = (
            self.postcopy_fault_overhead
            * _shrunk_ratio(postcopy_ratios)
            * self.time_scale
            / time_scale
        )
        return replace(
            self._refined_felt(_same_guest(samples, guest)),
            time_scale=time_scale,
            postcopy_fault_overhead=max(1.0, overhead),
            switchover_ms=max(1, round(self.switchover_ms + _shrunk_shift(downtime_errors))),
            postcopy_switchover_ms=max(
                0, round(self.postcopy_switchover_ms + _shrunk_shift(switch_errors))
            ),
        )

    def _refined_felt(self, samples: Sequence[CalibrationSample]) -> Calibration:
        """The guest-felt constants: pre-copy samples shift the resume by the median of
        (felt - QEMU's downtime - resume), multifd ones its flush alike; post-copy and hybrid
        samples scale the fault chain by actual / predicted stall beyond the switch and the
        resume."""
        resume_errors: list[float] = []
        flush_errors: list[float] = []
        chain_ratios: list[float] = []
        for sample in samples:
            felt_ms, qemu_ms = sample.actual_guest_downtime_ms, sample.actual_downtime_ms
            if felt_ms is None or qemu_ms is None or sample.strategy == "cold":
                continue
            if sample.strategy not in ("postcopy", "hybrid"):
                error_ms = self._beyond_error_ms(sample, felt_ms - qemu_ms)
                (flush_errors if sample.strategy == "multifd" else resume_errors).append(error_ms)
                continue
            base_ms = self.postcopy_switchover_ms + self.resume_felt_ms
            predicted_ms = sample.predicted.guest_downtime_ms
            if predicted_ms is not None and predicted_ms > base_ms and felt_ms > base_ms:
                ratio = (felt_ms - base_ms) / (predicted_ms - base_ms)
                chain_ratios.append(min(_MAX_RATIO, max(1.0 / _MAX_RATIO, ratio)))
        return replace(
            self,
            resume_felt_ms=max(0, round(self.resume_felt_ms + _shrunk_shift(resume_errors))),
            multifd_flush_ms=max(0, round(self.multifd_flush_ms + _shrunk_shift(flush_errors))),
            fault_chain=self.fault_chain * _shrunk_ratio(chain_ratios),
        )

    def _beyond_error_ms(self, sample: CalibrationSample, beyond_ms: int) -> float:
        """How far what the guest felt beyond QEMU's pause was from what the prediction put
        there (the drain, the resume, a multifd flush); old records without the felt
        prediction are judged against the resume (and flush) alone."""
        predicted = sample.predicted
        if predicted.guest_downtime_ms is not None:
            return float(beyond_ms - (predicted.guest_downtime_ms - predicted.downtime_ms))
        flush_ms = self.multifd_flush_ms if sample.strategy == "multifd" else 0
        return float(beyond_ms - self.resume_felt_ms - flush_ms)


def _same_guest(
    samples: Sequence[CalibrationSample], guest: str | None
) -> Sequence[CalibrationSample]:
    """The samples of ``guest``'s kind that measured a felt stall, if there are enough."""
    if guest is None:
        return samples
    same = [s for s in samples if s.guest == guest and s.actual_guest_downtime_ms is not None]
    return same if len(same) >= _MIN_SAME_GUEST else samples


def _shrunk_ratio(ratios: Sequence[float]) -> float:
    if not ratios:
        return 1.0
    mean_log = statistics.fmean(math.log(r) for r in ratios)
    return math.exp(mean_log * len(ratios) / (len(ratios) + 2))


def _shrunk_shift(errors: Sequence[float]) -> float:
    if not errors:
        return 0.0
    return statistics.median(errors) * len(errors) / (len(errors) + 2)
