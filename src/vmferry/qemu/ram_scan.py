"""Pages of guest RAM that change over a short and a long window, read through its memfd.

QEMU's ``calc-dirty-rate`` gives one average over ~1 s, in whole MiB/s. What decides whether
a pre-copy converges is what its short last rounds find dirty
(:mod:`vmferry.core.dirty_curve`), so the agent also reads a sample of the guest's RAM three
times — at the start, straight after the first read, and ~1 s after the start — and counts the
4 KiB pages whose CRC changed between the first read and each later one. Nothing here touches
QEMU: the file is read with ``pread`` in a thread, the guest keeps running unstalled (it costs
the host ~0.1 s of CPU per 256 MiB read).

Each page's window is the time between its two reads; the reads run through the chunks in the
same order, so that is the time between the passes' midpoints for every page.

Blind spot: a page rewritten with the bytes it held does not change its CRC, while QEMU's dirty
log counts it (``vmferry.core.retry`` is what handles such guests).

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
from dataclasses import dataclass
from pathlib import Path

from vmferry.qemu.measure import PAGE_SIZE_BYTES, MeasurementError, spread_chunks

__all__ = ["DEFAULT_SCAN_BYTES", "RamScan", "scan_changes"]

# Read at most this much of the guest's RAM per pass (all of it when smaller), in chunks of
# _CHUNK_BYTES spread evenly over it: hot pages sit anywhere, so the wider the better.
DEFAULT_SCAN_BYTES = 256 << 20
_CHUNK_BYTES = 256 << 10


@dataclass(frozen=True, slots=True)
class RamScan:
    """Changed bytes over two windows, scaled from the sample to the whole RAM.

    Attributes:
        short_s: the short window (about one pass over the sample).
        short_bytes: bytes of pages that changed within it.
        long_s: the long window.
        long_bytes: bytes of pages that changed within it.
        sampled_bytes: bytes read per pass.
    """

    short_s: float
    short_bytes: int
    long_s: float
    long_bytes: int
    sampled_bytes: int


def _pass(fd: int, offsets: list[int]) -> tuple[list[int], float]:
    """Every sampled page's CRC, and the pass's midpoint on the monotonic clock."""
    started = time.monotonic()
    crcs: list[int] = []
    for offset in offsets:
        data = memoryview(os.pread(fd, _CHUNK_BYTES, offset))
        whole = len(data) // PAGE_SIZE_BYTES * PAGE_SIZE_BYTES
        pages = range(0, whole, PAGE_SIZE_BYTES)
        crcs.extend(zlib.crc32(data[i : i + PAGE_SIZE_BYTES]) for i in pages)
    return crcs, (started + time.monotonic()) / 2


def _changed(first: list[int], later: list[int]) -> int:
    return sum(a != b for a, b in zip(first, later, strict=False))


async def scan_changes(
    ram_file: Path,
    *,
    ram_bytes: int,
    long_window_s: float = 1.0,
    scan_bytes: int = DEFAULT_SCAN_BYTES,
) -> RamScan:
    """Read the sample three times and count the pages that changed (see the module).

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
            first, at_first = _pass(fd, offsets)
            short, at_short = _pass(fd, offsets)
            time.sleep(max(0.0, at_first + long_window_s - time.monotonic()))
            long, at_long = _pass(fd, offsets)
        except OSError as err:
            raise MeasurementError(f"cannot read guest RAM {ram_file}: {err}") from err
        finally:
            os.close(fd)
        if not at_first < at_short < at_long or not first:
            raise MeasurementError(f"scan of {ram_file} read nothing in order")
        scale = ram_bytes / (len(first) * PAGE_SIZE_BYTES)
        return RamScan(
            short_s=round(at_short - at_first, 4),
            short_bytes=round(_changed(first, short) * PAGE_SIZE_BYTES * scale),
            long_s=round(at_long - at_first, 4),
            long_bytes=round(_changed(first, long) * PAGE_SIZE_BYTES * scale),
            sampled_bytes=len(first) * PAGE_SIZE_BYTES,
        )

    return await asyncio.to_thread(scan)
