"""Pages of guest RAM that change over a short and a long window, read through its memfd.

QEMU's ``calc-dirty-rate`` gives one average over ~1 s, in whole MiB/s. What decides whether
a pre-copy converges is what its short last rounds find dirty
(:mod:`vmferry.core.dirty_curve`), so the agent also reads a sample of the guest's RAM three
times — at the start, straight after the first read, and ~1 s after the start (and once more
~2.5 s after it when the count bends, :class:`RamScan`) — and counts the 4 KiB pages whose CRC
changed between the first read and each later one. Nothing here touches
QEMU: the file is read with ``pread`` in a thread, the guest keeps running unstalled (it costs
the host ~0.1 s of CPU per 256 MiB read).

Each page's window is the time between its two reads; the reads run through the chunks in the
same order, so that is the time between the passes' midpoints for every page.

The pages found changed in the long window are also compressed as multifd would (zstd level 1,
up to :data:`_RATIO_SAMPLE_BYTES` of them): what a guest rewrites may compress quite unlike the
rest of its RAM (a kernel's and a program's pages next to a writer's random ones), and it is
what a pre-copy's later rounds send (``RamScan.changed_ratio``).

Blind spot: a page rewritten with the bytes it held does not change its CRC, while QEMU's dirty
log counts it (:mod:`vmferry.core.blind` learns those from the VM's moves).

Example:
    >>> scan = await scan_changes(Path("/proc/4242/fd/17"), ram_bytes=1 << 30)  # doctest: +SKIP
    >>> scan.short_s, scan.short_bytes, scan.long_s, scan.long_bytes             # doctest: +SKIP
    (0.16, 593920, 1.07, 2285568)
"""

from __future__ import annotations

import asyncio
import os
import time
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

from vmferry.qemu.measure import PAGE_SIZE_BYTES, MeasurementError, spread_chunks, zstd_bytes

__all__ = ["DEFAULT_SCAN_BYTES", "FAR_WINDOW_S", "RamScan", "scan_changes"]

# Read at most this much of the guest's RAM per pass (all of it when smaller), in chunks of
# _CHUNK_BYTES spread evenly over it: hot pages sit anywhere, so the wider the better.
DEFAULT_SCAN_BYTES = 256 << 20
_CHUNK_BYTES = 256 << 10  # read per pread
# Changed pages compressed for their ratio, at most (~10 ms of zstd).
_RATIO_SAMPLE_BYTES = 4 << 20
# The third window, and when it is read: the long window's count under this share of what the
# short one's would grow to linearly, and at least _FAR_MIN_BYTES changed (a few MiB of hot
# pages settle nowhere that matters).
FAR_WINDOW_S = 2.5
_BENT = 0.85
_FAR_MIN_BYTES = 4 << 20
# Fewer changed pages than this tell no ratio.
_RATIO_MIN_PAGES = 16


@dataclass(frozen=True, slots=True)
class RamScan:
    """Changed bytes over two windows, scaled from the sample to the whole RAM.

    Attributes:
        short_s: the short window (about one pass over the sample).
        short_bytes: bytes of pages that changed within it.
        long_s: the long window.
        long_bytes: bytes of pages that changed within it.
        sampled_bytes: bytes read per pass.
        changed_ratio: zstd's ratio (raw / compressed, >= 1) over the pages changed in the
            long window, None when too few changed.
        far_s: a third window (:data:`FAR_WINDOW_S`), read only when the first two bend (the
            count grew slower than the window): whether it levels off there tells a small set
            filled at once from a writer with hot pages (``core.dirty_curve.settled_bytes``).
        far_bytes: bytes of pages that changed within it.
    """

    short_s: float
    short_bytes: int
    long_s: float
    long_bytes: int
    sampled_bytes: int
    changed_ratio: float | None = None
    far_s: float | None = None
    far_bytes: int | None = None


def _pass(
    fd: int, offsets: list[int], changed_from: list[int] | None = None
) -> tuple[list[int], float, list[bytes]]:
    """Every sampled page's CRC, the pass's midpoint on the monotonic clock, and (given the
    CRCs of an earlier pass) the first pages whose CRC changed since, up to the ratio sample."""
    started = time.monotonic()
    crcs: list[int] = []
    changed: list[bytes] = []
    earlier = changed_from or []
    room = 0 if changed_from is None else _RATIO_SAMPLE_BYTES // PAGE_SIZE_BYTES
    for offset in offsets:
        data = memoryview(os.pread(fd, _CHUNK_BYTES, offset))
        whole = len(data) // PAGE_SIZE_BYTES * PAGE_SIZE_BYTES
        for i in range(0, whole, PAGE_SIZE_BYTES):
            crc = zlib.crc32(data[i : i + PAGE_SIZE_BYTES])
            if len(changed) < room and earlier[len(crcs)] != crc:
                changed.append(bytes(data[i : i + PAGE_SIZE_BYTES]))
            crcs.append(crc)
    return crcs, (started + time.monotonic()) / 2, changed


def _ratio(pages: list[bytes]) -> float | None:
    """zstd's ratio over ``pages`` as one stream (as a multifd channel compresses them)."""
    if len(pages) < _RATIO_MIN_PAGES:
        return None
    raw = b"".join(pages)
    return max(1.0, len(raw) / zstd_bytes(raw))


def _bends(scan: RamScan) -> bool:
    """Whether the long window changed markedly less than the short one's pace would have."""
    linear = scan.short_bytes * scan.long_s / scan.short_s
    return scan.long_bytes >= _FAR_MIN_BYTES and scan.long_bytes < _BENT * linear


def _changed(first: list[int], later: list[int]) -> int:
    return sum(a != b for a, b in zip(first, later, strict=False))


async def scan_changes(
    ram_file: Path,
    *,
    ram_bytes: int,
    long_window_s: float = 1.0,
    far_window_s: float | None = FAR_WINDOW_S,
    scan_bytes: int = DEFAULT_SCAN_BYTES,
) -> RamScan:
    """Read the sample three times (four when the count bends, see :class:`RamScan`) and count
    the pages that changed (see the module).

    Raises:
        ConfigError: a RAM size that holds no chunk.
        MeasurementError: the file cannot be read.
    """
    chunks = max(1, min(ram_bytes, scan_bytes) // _CHUNK_BYTES)
    offsets = spread_chunks(0, ram_bytes, chunks, _CHUNK_BYTES)

    def scan() -> RamScan:
        try:
            fd = os.open(ram_file, os.O_RDONLY)
        except OSError as err:
            raise MeasurementError(f"cannot open guest RAM {ram_file}: {err}") from err
        try:
            first, at_first, _ = _pass(fd, offsets)
            short, at_short, _ = _pass(fd, offsets)
            time.sleep(max(0.0, at_first + long_window_s - time.monotonic()))
            long, at_long, changed = _pass(fd, offsets, first)
            if not at_first < at_short < at_long or not first:
                raise MeasurementError(f"scan of {ram_file} read nothing in order")
            scale = ram_bytes / (len(first) * PAGE_SIZE_BYTES)
            scan = RamScan(
                short_s=round(at_short - at_first, 4),
                short_bytes=round(_changed(first, short) * PAGE_SIZE_BYTES * scale),
                long_s=round(at_long - at_first, 4),
                long_bytes=round(_changed(first, long) * PAGE_SIZE_BYTES * scale),
                sampled_bytes=len(first) * PAGE_SIZE_BYTES,
                changed_ratio=_ratio(changed),
            )
            if far_window_s is None or not _bends(scan) or far_window_s <= scan.long_s:
                return scan
            time.sleep(max(0.0, at_first + far_window_s - time.monotonic()))
            far, at_far, _ = _pass(fd, offsets)
        except OSError as err:
            raise MeasurementError(f"cannot read guest RAM {ram_file}: {err}") from err
        finally:
            os.close(fd)
        far_bytes = round(_changed(first, far) * PAGE_SIZE_BYTES * scale)
        return replace(scan, far_s=round(at_far - at_first, 4), far_bytes=far_bytes)

    return await asyncio.to_thread(scan)
