"""First touches of guest RAM: what the pages nobody has written yet cost a migration.

Guest RAM is a ``memory-backend-memfd`` (shmem). A page the guest never wrote is a hole: it
reads as zero and occupies nothing. QEMU reads every page it migrates to check it for zeros,
and a read fault on a shmem hole *allocates* the page. The destination starts with nothing
allocated, and its main migration stream reads every zero page before flagging it zero
(``ram_handle_zero``: zeroed only if not already), while post-copy places every zero page with
a ``userfaultfd`` call. Each allocation is a page fault, a cleared page and, on this nested
host, a trip through the outer hypervisor's shadow page tables, which grows dearer the larger
the mapping. Multifd's receiving channels skip a zero page that was never received (QEMU >= 9.0),
so its destination stays sparse.

Measured (matrix runs A-D, ``bench/repredict.py``): the same pre-copy of a 4 GiB lab guest at
200 Mbit/s (h07) takes 9.6-11.9 s beyond its link time from a freshly booted source (3.85 GiB
of holes on both sides), 5.0-5.3 s when an earlier move had allocated the source's pages
(holes on the destination only), and multifd 0.4 s (neither). The cost per GiB of holes grows
with the guest's size: fitted on the fit halves' 171 moves, 0.38 s/GiB in a 1 GiB guest, 0.76
in a 2 GiB one, 1.5 in a 4 GiB one (a plain memfd read page by page here: 0.85 s/GiB at 1-2 GiB,
1.46 s/GiB at 4 GiB). So:

* touched bytes: the source's holes (RAM minus its ``resident_bytes``, at most the zero pages)
  plus the destination's zero pages: all of them for the main stream (pre-copy and its
  variants, hybrid's first pass, cold), none for multifd, and for post-copy
  ``postcopy_touch_share`` of them (its destination places zero pages without reading them,
  beside the source's scan: the fit half's post-copies of 4 GiB guests, f05 and f06, paid
  about half a first touch there);
* cost: ``touched_GiB x touch_ms_per_gib2 x RAM_GiB``, paid in the migration threads beside
  the link (zero pages send nothing): it adds to the first pass.

A source whose residency was not measured is taken as allocated (a guest that ran a while:
its page cache fills its RAM); the destination is always new.

Example:
    >>> from vmferry.core.calibration import Calibration
    >>> m = Measurement(ram_bytes=4 << 30, zero_fraction=0.95, compress_ratio=1.0,
    ...                 dirty_rate_bps=0, bandwidth_bps=25_000_000, resident_bytes=200 << 20)
    >>> cal = Calibration.default()
    >>> round(first_touch_s(m, cal, destination_share("precopy", cal)), 1)  # both sides
    11.6
    >>> round(first_touch_s(m, cal, destination_share("multifd", cal)), 1)  # the source's holes
    5.8
"""

from __future__ import annotations

from vmferry.core.calibration import Calibration
from vmferry.core.measurement import Measurement
from vmferry.core.model import Mechanism

__all__ = [
    "GIB",
    "destination_share",
    "first_touch_s",
    "source_holes_bytes",
    "touch_ms_per_gib",
]

GIB = float(1 << 30)


def touch_ms_per_gib(ram_bytes: int, cal: Calibration) -> float:
    """What allocating one GiB of a ``ram_bytes`` guest's holes costs, in ms."""
    return cal.touch_ms_per_gib2 * ram_bytes / GIB


def source_holes_bytes(m: Measurement) -> float:
    """The source's never-allocated pages that QEMU will read (0 when not measured)."""
    if m.resident_bytes is None:
        return 0.0
    return min(m.zero_bytes, float(max(0, m.ram_bytes - m.resident_bytes)))


def destination_share(strategy: Mechanism, cal: Calibration) -> float:
    """The share of a first touch ``strategy``'s destination pays per zero page: 1 for the main
    stream, ``postcopy_touch_share`` for post-copy's placing, 0 for multifd."""
    if strategy == "multifd":
        return 0.0
    return cal.postcopy_touch_share if strategy == "postcopy" else 1.0


def first_touch_s(m: Measurement, cal: Calibration, destination_share: float) -> float:
    """Seconds of first touches a move of ``m`` pays: the source's holes, and
    ``destination_share`` of a touch per zero page on the destination."""
    touched = source_holes_bytes(m) + m.zero_bytes * destination_share
    return touched / GIB * touch_ms_per_gib(m.ram_bytes, cal) / 1000.0
