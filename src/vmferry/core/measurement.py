"""What a pre-flight measured about a guest and its path: the predictor's input."""

from __future__ import annotations

from dataclasses import dataclass

from vmferry.core.errors import ConfigError

__all__ = ["Measurement"]


@dataclass(frozen=True, slots=True)
class Measurement:
    """What a pre-flight measured (a few seconds, guest running).

    Attributes:
        ram_bytes: guest RAM size.
        zero_fraction: share of guest pages that are entirely zero (0..1), from a sample.
        compress_ratio: zstd ratio (raw / compressed, >= 1) of the sampled non-zero pages.
        dirty_rate_bps: bytes per second the guest dirties (QEMU ``calc-dirty-rate``).
        bandwidth_bps: achievable TCP throughput between the two hosts on the migration path.
        dirty_set_bytes: bound on the distinct bytes being re-dirtied, if known (else all RAM).
        dirty_is_cpu_bound: the dirtier needs CPU to dirty, so throttling vCPUs slows it. False
            for a time-paced dirtier (it catches up after each throttle sleep) and by default.
        disk_copy_bytes: allocated disk bytes a mirror must copy; 0 without a disk or on
            shared storage (nothing of the disk moves).
        disk_write_bps: bytes per second the guest writes to its disk (ignored when
            ``disk_copy_bytes`` is 0).
        link_queue_ms: the delay a small packet sees behind a bulk transfer on this path (the
            link's queue), None when not measured (the calibration's guess is used).
        hot_bytes: bytes the guest writes again within any short window (its dirty curve's
            intercept, :mod:`vmferry.core.dirty_curve`): dirty at every sync of a pre-copy's
            last rounds, however short; 0 when not measured.
        host_cpus: the source host's CPUs, None when unknown.
        guest_busy_cores: cores the guest's vCPUs keep busy (their measured busy share times
            their count), None when not measured. With ``host_cpus`` it tells what multifd's
            zstd threads get (:mod:`vmferry.core.predict_cpu`).
        resident_bytes: guest RAM the source host has allocated (its memfd's blocks), None when
            not measured. A page never written since boot is a hole there: reading it to check
            for zeros allocates it, which costs far more than the check
            (:mod:`vmferry.core.predict_touch`).
        blind_dirty_bps: pages per second (in bytes) the guest rewrites with the bytes they
            held, a guest writing zeros over zero pages: QEMU's dirty log counts them, a content
            comparison (``dirty_rate_bps``) cannot see them. Learnt from what QEMU counted
            during this VM's earlier moves (:mod:`vmferry.core.blind`); 0 when unknown.
        blind_keeps_pace: a recent pre-copy of this VM stalled on those rewrites: take them
            as keeping pace with QEMU whatever ``blind_dirty_bps`` says.
        dirty_compress_ratio: zstd ratio (>= 1) of the pages the guest was seen changing (what
            a pre-copy's later rounds re-send), None when not measured (``compress_ratio`` is
            then taken for them too).
    """

    ram_bytes: int
    zero_fraction: float
    compress_ratio: float
    dirty_rate_bps: int
    bandwidth_bps: int
    dirty_set_bytes: int | None = None
    dirty_is_cpu_bound: bool = False
    disk_copy_bytes: int = 0
    disk_write_bps: int = 0
    link_queue_ms: float | None = None
    hot_bytes: int = 0
    host_cpus: int | None = None
    guest_busy_cores: float | None = None
    resident_bytes: int | None = None
    blind_dirty_bps: int = 0
    blind_keeps_pace: bool = False
    dirty_compress_ratio: float | None = None

    def __post_init__(self) -> None:
        if self.ram_bytes <= 0:
            raise ConfigError(f"ram_bytes must be positive, got {self.ram_bytes}")
        if not 0.0 <= self.zero_fraction <= 1.0:
            raise ConfigError(f"zero_fraction must be 0..1, got {self.zero_fraction}")
        if not self.compress_ratio >= 1.0:
            raise ConfigError(f"compress_ratio must be >= 1, got {self.compress_ratio}")
        if self.dirty_compress_ratio is not None and not self.dirty_compress_ratio >= 1.0:
            raise ConfigError(f"dirty_compress_ratio must be >= 1, got {self.dirty_compress_ratio}")
        if self.dirty_rate_bps < 0 or self.blind_dirty_bps < 0:
            raise ConfigError(
                f"dirty rates must be >= 0, got {self.dirty_rate_bps} and {self.blind_dirty_bps}"
            )
        if self.bandwidth_bps <= 0:
            raise ConfigError(f"bandwidth_bps must be positive, got {self.bandwidth_bps}")
        if self.dirty_set_bytes is not None and self.dirty_set_bytes < 0:
            raise ConfigError(f"dirty_set_bytes must be >= 0, got {self.dirty_set_bytes}")
        if self.link_queue_ms is not None and not self.link_queue_ms >= 0.0:
            raise ConfigError(f"link_queue_ms must be >= 0, got {self.link_queue_ms}")
        if self.host_cpus is not None and self.host_cpus <= 0:
            raise ConfigError(f"host_cpus must be positive, got {self.host_cpus}")
        if self.guest_busy_cores is not None and not self.guest_busy_cores >= 0.0:
            raise ConfigError(f"guest_busy_cores must be >= 0, got {self.guest_busy_cores}")
        if self.resident_bytes is not None and self.resident_bytes < 0:
            raise ConfigError(f"resident_bytes must be >= 0, got {self.resident_bytes}")
        if self.disk_copy_bytes < 0 or self.disk_write_bps < 0:
            raise ConfigError(
                f"disk_copy_bytes and disk_write_bps must be >= 0, got "
                f"{self.disk_copy_bytes} and {self.disk_write_bps}"
            )

    @property
    def resend_ratio(self) -> float:
        """How well the pages a later round re-sends compress (the changed pages' ratio when
        measured, else the whole RAM's)."""
        return (
            self.compress_ratio if self.dirty_compress_ratio is None else self.dirty_compress_ratio
        )

    @property
    def nonzero_bytes(self) -> float:
        """Guest memory that has to travel as data."""
        return self.ram_bytes * (1.0 - self.zero_fraction)

    @property
    def zero_bytes(self) -> float:
        """Guest memory that travels as a zero-page flag."""
        return self.ram_bytes * self.zero_fraction
