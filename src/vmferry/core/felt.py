"""Guest-felt downtime: the longest stall a guest's applications see during a move.

QEMU's ``downtime`` counts its stop-and-copy pause only. The guest feels more, and
:mod:`vmferry.core.predict` adds it to every prediction as ``guest_downtime_ms``:

* **pre-copy-like** (and cold): the pause, plus resuming on the destination (the held copy's
  comparison, ``cont``, the first timer tick there): ``Calibration.resume_felt_ms``; multifd
  also flushes its channels after QEMU stopped counting (``Calibration.multifd_flush_ms``).
  QEMU also stops counting once the last bytes are in its sockets, not across the link: each
  stream still holds up to :data:`NOTSENT_LOWAT_BYTES` unsent (the agent keeps it that small:
  :mod:`vmferry.qemu.sockets`) plus what is in flight, which the guest waits for
  (:func:`drain_ms`).
* **post-copy and hybrid**: the switch (device state only), the same resume, then page faults.
  Every page the guest touches that is still on the source is fetched by one request over the
  link; the page comes back on the preempt channel (without it a fault waits behind the bulk
  copy's stream: 100+ ms here), but still behind the bytes already queued at the sending link.
  One fault costs ``service + (queued bytes + the page) / link rate`` (see
  :func:`fault_latency_ms`; measured here: 0.6 ms + what TCP keeps queued, ~36 KB on the lab's
  shaped links but never under ~1 ms of a link QEMU fills twice over (TCP small queues),
  nothing to speak of on a link faster than QEMU sends or under a ``--bandwidth`` cap, where
  QEMU paces itself; after hybrid's pass the bulk copy has little left to send and a fault
  waits behind ``Calibration.hybrid_queue_share`` of that queue). One fault is short; the
  stall is long because right after the
  switch the guest's hot set (kernel paths, timers, the application's stacks) is missing and it
  needs a *chain* of them, one after another, before it runs again: ~300-460 pages for a cold
  1 GiB lab guest (``Calibration.fault_chain``), the hot pages re-dirtied during the pass for
  hybrid (``Calibration.hybrid_hot_share`` of them). A CPU-bound writer adds some of its own
  (``Calibration.writer_chain``, scaled by how much of its dirty set is still missing). More
  vCPUs did not shorten it (measured: ``bench/stalls.py``).

So the longest stall is ``switch + drain + resume + chain x fault latency``. The chain is learnt
from history (:meth:`vmferry.core.calibration.Calibration.refined`); the link's queue can also be
measured (``Measurement.link_queue_ms``: the delay a small packet sees behind a bulk transfer on
this path).

Example:
    >>> from vmferry.core.calibration import Calibration
    >>> from vmferry.core.measurement import Measurement
    >>> m = Measurement(ram_bytes=1 << 30, zero_fraction=0.8, compress_ratio=1.0,
    ...                 dirty_rate_bps=0, bandwidth_bps=25_000_000)  # 200 Mbit/s
    >>> cal = Calibration.default()
    >>> precopy_felt_ms(m, downtime_ms=20, cal=cal)  # 20 + 30 + (131,072 + 36,000) / 25,000
    57
    >>> round(fault_latency_ms(m, cal), 2)  # 0.6 + (36,000 + 4,096) / 25,000 bytes per ms
    2.2
    >>> postcopy_felt_ms(m, cal, missing_share=1.0)  # 1 + 30 + 7 (drain) + 350 x 2.2
    809
"""

from __future__ import annotations

from vmferry.core.calibration import Calibration
from vmferry.core.measurement import Measurement

__all__ = [
    "MULTIFD_STREAMS",
    "NOTSENT_LOWAT_BYTES",
    "PAGE_BYTES",
    "drain_ms",
    "fault_latency_ms",
    "postcopy_felt_ms",
    "precopy_felt_ms",
]

PAGE_BYTES = 4096
# What a migration socket may hold unsent (``TCP_NOTSENT_LOWAT``, set by the source agent):
# ~20 ms at 50 Mbit/s, nothing at 10 Gbit/s. Without it Linux lets ~1-4 MB wait there.
NOTSENT_LOWAT_BYTES = 128 << 10
# Streams whose unsent bytes a multifd switch waits for: its channels end their last pass at
# different times, so about one channel's worth is left (the matrix bench's fit half: what the
# guest felt beyond QEMU's figure did not grow with the channels' count on slow links).
MULTIFD_STREAMS = 1


def precopy_felt_ms(
    m: Measurement,
    *,
    downtime_ms: float,
    cal: Calibration,
    multifd: bool = False,
    contention: float = 1.0,
) -> int:
    """What the guest feels of a pre-copy's (or cold move's) pause of ``downtime_ms``: the
    last pass's bytes still to cross the link, the resume, and a multifd move's flush, longer
    by ``contention`` when the guest and zstd wanted more cores than the host has
    (:mod:`vmferry.core.predict_cpu`)."""
    if multifd:
        flush_ms = cal.multifd_flush_ms * max(1.0, contention)
        extra_ms = drain_ms(m, cal, streams=MULTIFD_STREAMS) + flush_ms
    else:
        extra_ms = drain_ms(m, cal)
    return round(downtime_ms + cal.resume_felt_ms + extra_ms)


def drain_ms(m: Measurement, cal: Calibration, *, streams: int = 1) -> float:
    """How long the bytes QEMU already handed to its ``streams`` sockets (unsent, and queued
    at the sending link) take to cross the link after it stopped counting."""
    return streams * NOTSENT_LOWAT_BYTES / (m.bandwidth_bps / 1000.0) + _queue_ms(m, cal)


def _queue_ms(m: Measurement, cal: Calibration) -> float:
    """The wait behind the bytes queued at the sending link (none on a link faster than QEMU
    sends), measured or from the calibration: ``link_queue_bytes``, and on a link QEMU
    fills twice over (a shaped port, not loopback) never less than ``link_queue_floor_ms``
    of the link's time (Linux's TCP small queues let a socket keep about a millisecond of its
    pacing rate queued below it: ~125 KB on a 1 Gbit/s link)."""
    if m.link_queue_ms is not None:
        return m.link_queue_ms
    if m.bandwidth_bps >= cal.qemu_throughput_bps:
        return 0.0
    queue_ms = cal.link_queue_bytes / (m.bandwidth_bps / 1000.0)
    if 2 * m.bandwidth_bps <= cal.qemu_throughput_bps:
        return max(queue_ms, cal.link_queue_floor_ms)
    return queue_ms


def fault_latency_ms(m: Measurement, cal: Calibration, *, queue_share: float = 1.0) -> float:
    """One post-copy page fault: serviced by both QEMUs, then the page behind the bytes queued
    at the sending link (none on a link faster than QEMU sends; ``queue_share`` of them when
    the bulk copy has little left to send, as after hybrid's pass)."""
    page_ms = PAGE_BYTES / (m.bandwidth_bps / 1000.0)
    return cal.fault_service_ms + page_ms + _queue_ms(m, cal) * queue_share


def postcopy_felt_ms(
    m: Measurement, cal: Calibration, *, missing_share: float, writer_share: float | None = None
) -> int:
    """The longest stall of a post-copy (``missing_share`` = 1) or hybrid switch.

    Args:
        m: the measurement (link rate and queue, the writer).
        cal: the constants (chain lengths, resume, fault service time).
        missing_share: share of the guest's dirty set still on the source at the switch (1 for
            post-copy; what the pass left dirty for hybrid).
        writer_share: share of it a CPU-bound writer faults on, pages it rewrote unchanged
            included (zeros over zero pages fault all the same); ``missing_share`` if None.
    """
    share = min(1.0, max(0.0, missing_share))
    whole = share >= 1.0
    hot = cal.fault_chain * (1.0 if whole else cal.hybrid_hot_share)
    writes = share if writer_share is None else min(1.0, max(share, writer_share))
    writing = m.dirty_rate_bps + m.blind_dirty_bps > 0
    writer = cal.writer_chain * writes if m.dirty_is_cpu_bound and writing else 0.0
    queue_share = 1.0 if whole else cal.hybrid_queue_share
    stall_ms = (hot + writer) * fault_latency_ms(m, cal, queue_share=queue_share)
    # The device state follows the bulk stream's unsent bytes across the link.
    switch_ms = cal.postcopy_switchover_ms + drain_ms(m, cal)
    return round(switch_ms + cal.resume_felt_ms + stall_ms)
