"""Transfer rates of a predicted migration's phases: guest memory's rates (running, paused,
zero pages) and the disk mirror's phase before RAM moves (see :mod:`vmferry.core.predict`)."""

from __future__ import annotations

from dataclasses import dataclass

from vmferry.core.calibration import Calibration
from vmferry.core.measurement import Measurement
from vmferry.core.units import format_bytes, format_ms, format_rate

__all__ = ["RAM_MIN_LINK_SHARE", "DiskPhase", "Rates"]

# While a write-blocking mirror runs, the RAM stream keeps at least this share of the link.
RAM_MIN_LINK_SHARE = 0.1


@dataclass(frozen=True, slots=True)
class Rates:
    """Guest-memory rates of one strategy (bytes of guest RAM per second, time-scaled)."""

    first_bps: float  # round 0
    resend_bps: float  # later rounds, guest running
    paused_bps: float  # the switchover copy, guest paused
    zero_scan_bps: float
    zero_rescan_bps: float  # re-dirtied pages that are still zero (core.precopy_loop)
    scale: float
    touch_s: float = 0.0  # first touches of never-allocated pages (core.predict_touch)

    @classmethod
    def plain(cls, m: Measurement, cal: Calibration, *, mirror_bps: float = 0.0) -> Rates:
        """Plain pre-copy rates; ``mirror_bps`` of the link carries mirrored disk writes while
        the guest runs (not while it is paused)."""
        running = min(m.bandwidth_bps - mirror_bps, cal.qemu_throughput_bps) / cal.time_scale
        paused = min(m.bandwidth_bps, max(cal.paused_throughput_bps, cal.qemu_throughput_bps))
        return cls(
            first_bps=running,
            resend_bps=running,
            paused_bps=paused / cal.time_scale,
            zero_scan_bps=cal.zero_scan_bps / cal.time_scale,
            zero_rescan_bps=cal.zero_rescan_bps / cal.time_scale,
            scale=cal.time_scale,
        )

    def first_pass_s(self, m: Measurement) -> float:
        """Round 0: every non-zero page as data, every zero page as a flag, and the first
        touches of pages never allocated."""
        return m.nonzero_bytes / self.first_bps + m.zero_bytes / self.zero_scan_bps + self.touch_s


@dataclass(frozen=True, slots=True)
class DiskPhase:
    """The disk mirror's part of a migration (see the module docs)."""

    copy_bytes: float  # what the mirror must copy
    copy_s: float  # the disk phase, before RAM moves
    sent_bytes: float  # the copy and the re-copied blocks
    mirror_bps: float  # guest writes mirrored synchronously, taken from the link, until the switch
    is_blocking_early: bool = False  # write-blocking from the start: guest writes throttled

    @classmethod
    def live(cls, m: Measurement, idle: Rates) -> DiskPhase:
        """The disk phase of a live strategy; ``idle`` has the whole link."""
        copy = float(m.disk_copy_bytes)
        if copy == 0.0:
            return cls(0.0, 0.0, 0.0, 0.0)
        link_bps, write_bps = idle.first_bps, float(m.disk_write_bps)
        mirror_bps = min(write_bps, (1.0 - RAM_MIN_LINK_SHARE) * m.bandwidth_bps)
        if write_bps >= link_bps:
            return cls(copy, copy / link_bps, copy, mirror_bps, is_blocking_early=True)
        recopy = min(copy * write_bps / (link_bps - write_bps), copy)
        return cls(copy, (copy + recopy) / link_bps, copy + recopy, mirror_bps)

    @classmethod
    def paused(cls, m: Measurement, idle: Rates) -> DiskPhase:
        """The disk phase of a cold migration: nothing writes, the paused rate."""
        copy = float(m.disk_copy_bytes)
        return cls(copy, copy / idle.paused_bps, copy, 0.0)

    @property
    def ms(self) -> int:
        return round(self.copy_s * 1000.0)

    def sent_with(self, running_s: float) -> float:
        """Disk bytes sent, with the writes mirrored during ``running_s`` of the RAM phase."""
        return self.sent_bytes + self.mirror_bps * running_s

    def note(self, *, mirrors_writes: bool = True) -> str:
        """The note's prefix ("" without a disk to move)."""
        if self.copy_bytes == 0.0:
            return ""
        text = f"mirrors {format_bytes(self.copy_bytes)} of disk first in {format_ms(self.ms)}"
        if self.is_blocking_early:
            text += " (guest writes throttled to the link)"
        elif self.sent_bytes > self.copy_bytes:
            text += f" ({format_bytes(self.sent_bytes - self.copy_bytes)} re-copied)"
        if mirrors_writes and self.mirror_bps > 0.0:
            text += f", then {format_rate(self.mirror_bps)} of writes share the link"
        return f"{text}; "
