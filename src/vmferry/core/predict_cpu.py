"""The CPU a multifd move needs against the cores its source host has: zstd's rate and the
switchover's flush when the guest's own vCPUs leave too little.

Multifd compresses in ``channels`` send threads, each as fast as one core lets it
(``Calibration.multifd_compress_bps`` is what the default two channels compress with a core each).
They share the host's cores with the guest's vCPU threads (``Measurement.guest_busy_cores``: the
vCPUs' measured busy share times their count) and with nothing else we know of. When the threads
that want to run outnumber the cores, Linux's fair scheduler gives each runnable thread an equal
share, so the channels get ``cpus x channels / (channels + guest busy cores)`` cores (never more
than one each):

* zstd then moves guest memory at ``per-channel rate x those cores``. Measured (matrix cell
  h09's guest: 256 MiB, two vCPUs busy writing, unshaped link, 2 cores): ~0.3-0.4 GB/s of guest
  memory instead of the ~0.8 GB/s an idle guest lets zstd reach; a plain stream was faster
  there (0.47 s against 0.77 s).
* the switchover waits for what the channels still held, which the destination decompresses
  on the same starved cores: multifd's flush (``Calibration.multifd_flush_ms``) grows with the
  contention, ``demand / cpus``, where the demand counts the guest's busy cores and the cores
  the channels would use at the rate the link takes. Measured on the lab (real moves through
  the agents, 30 Nov): what the guest felt beyond QEMU's downtime was a median 47 ms on
  link-bound cells (200 Mbit/s; demand under 2 cores) and 88 ms where two busy vCPUs met
  unshaped or 1 Gbit/s links (demand 3-4 cores on 2).

What this does not see is the rest of the host's load. A real CLI move of matrix cell f05's
guest (4 GiB, a CPU-bound writer, 200 Mbit/s) felt 53-227 ms alone and 148-582 ms next to two
CPU-bound processes of another session: the guest itself stopped beating for 150-280 ms in the
middle of the copy (no burst of queued heartbeats followed), the demand was ~3.2 cores on 2.
Niced processes do not help here, since the kernel groups each session (autogroup) and shares
the CPU between groups first. Lowering the migration threads' priority instead (nice 19) made
a move next to a CPU-bound guest 10x longer and its stall longer too, so vmferry does not
renice them (``bench/starve.py``).

Without ``host_cpus`` or ``guest_busy_cores`` nothing changes: zstd at the calibrated rate, no
contention.

Example:
    >>> from vmferry.core.calibration import Calibration
    >>> from vmferry.core.measurement import Measurement
    >>> m = Measurement(ram_bytes=256 << 20, zero_fraction=0.5, compress_ratio=3.0,
    ...                 dirty_rate_bps=0, bandwidth_bps=450_000_000, host_cpus=2,
    ...                 guest_busy_cores=2.0)
    >>> cpu = multifd_cpu(m, Calibration.default())
    >>> cpu.compress_cores, round(cpu.compress_bps / 1e6), cpu.contention
    (1.0, 400, 2.0)
"""

from __future__ import annotations

from dataclasses import dataclass

from vmferry.core.calibration import Calibration
from vmferry.core.measurement import Measurement

__all__ = ["CALIBRATED_CHANNELS", "MultifdCpu", "multifd_cpu"]

# ``Calibration.multifd_compress_bps`` is what this many channels compress, a core each.
CALIBRATED_CHANNELS = 2


@dataclass(frozen=True, slots=True)
class MultifdCpu:
    """What a multifd move gets of its host's CPU.

    Attributes:
        compress_cores: cores the send threads get (at most one each).
        compress_bps: guest bytes per second they compress (before time scaling).
        demand_cores: cores the guest's vCPUs and the channels would use unhindered.
        contention: ``demand / host cpus``, at least 1 (1 when the host is unknown).
    """

    compress_cores: float
    compress_bps: float
    demand_cores: float
    contention: float

    def describe(self) -> str:
        """A note for ``plan`` when the guest leaves zstd short of cores, else ``""``."""
        if self.contention <= 1.0:
            return ""
        return (
            f"; next to the guest's vCPUs zstd gets {self.compress_cores:.1f} cores "
            f"({self.demand_cores:.1f} wanted)"
        )


def multifd_cpu(
    m: Measurement, cal: Calibration, channels: int = CALIBRATED_CHANNELS
) -> MultifdCpu:
    """The cores ``channels`` send threads get next to the guest, and what that costs.

    Args:
        m: the measurement (``host_cpus``, ``guest_busy_cores``, the link and compress ratio).
        cal: the constants (``multifd_compress_bps`` for the calibrated channel count).
        channels: multifd channels (send threads), at least 1.
    """
    channels = max(1, channels)
    per_channel_bps = cal.multifd_compress_bps / CALIBRATED_CHANNELS
    full = MultifdCpu(float(channels), per_channel_bps * channels, float(channels), 1.0)
    if m.host_cpus is None or m.guest_busy_cores is None or m.host_cpus <= 0:
        return full
    guest = max(0.0, m.guest_busy_cores)
    cpus = float(m.host_cpus)
    # The channels' own want: the link's rate of compressed pages, a core per channel at most.
    wanted = min(float(channels), m.bandwidth_bps * m.compress_ratio / per_channel_bps)
    demand = guest + wanted
    if guest + channels <= cpus:
        cores = float(channels)
    else:
        cores = min(float(channels), cpus * channels / (channels + guest))
    return MultifdCpu(cores, per_channel_bps * cores, demand, max(1.0, demand / cpus))
