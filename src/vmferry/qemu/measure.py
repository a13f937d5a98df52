"""Pre-flight measurements of a running guest over QMP: dirty rate, RAM size, memory content.

A migration planner needs three numbers before it moves a VM: how much RAM there is, how fast
the guest rewrites it, and what the pages look like (zero pages cost almost nothing to send,
compressible ones cost less with multifd+zstd). Everything here keeps the guest running and
finishes in a second or two.

* :func:`measure_dirty_rate` uses ``calc-dirty-rate`` in ``page-sampling`` mode: QEMU hashes a
  random sample of pages, waits, hashes them again and scales the changed fraction to the RAM
  size. It works under TCG; ``dirty-bitmap`` mode reports 0 there and ``dirty-ring`` needs KVM.
* :func:`sample_memory` has QEMU ``pmemsave`` a few chunks of guest-physical RAM into files and
  inspects them here: all-zero 4 KiB pages are counted, the others are compressed with zstd.
  Where the guest's RAM is a shared memfd the agent can open (``ram_file``),
  :func:`sample_ram_file` reads many small chunks spread over all of it with ``pread``
  instead: no QEMU command, nothing that holds QEMU's lock while the guest runs (each
  ``pmemsave`` stalled the guest for a few ms), and a better spread for the same bytes.
* :func:`measure_guest` runs all of them, the memory sample during the dirty-rate window.

Example:
    >>> profile = await measure_guest(vm.qmp, Path("/run/vmferry/scratch"))  # doctest: +SKIP
    >>> profile.dirty_rate_bps, profile.memory.zero_fraction                # doctest: +SKIP
    (20971520, 0.84)
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import zstandard

from vmferry.core.errors import ConfigError, FerryError, QMPTimeout
from vmferry.qemu.session import QmpSession

__all__ = [
    "DEFAULT_SAMPLE_PAGES",
    "GuestProfile",
    "MeasurementError",
    "MemorySample",
    "measure_dirty_rate",
    "measure_disk_writes",
    "measure_guest",
    "ram_size_bytes",
    "sample_memory",
    "zstd_bytes",
]

logger = logging.getLogger(__name__)

PAGE_SIZE_BYTES = 4096
_MIB = 1 << 20
# QEMU's accepted ranges (migration/dirtyrate.h: MIN/MAX_CALC_TIME_MS, MIN/MAX_SAMPLE_PAGE_COUNT).
_CALC_TIME_RANGE_MS = (50, 60_000)
_SAMPLE_PAGES_RANGE = (128, 16_384)
# QEMU's default is 512 per GiB: each dirty sample then weighs 2 MiB/s, so a 20 MiB/s guest
# reads as 10 samples, i.e. ±30 %. Hashing 8x as many pages costs QEMU ~16 MiB of reads per
# GiB, nothing next to the window.
DEFAULT_SAMPLE_PAGES = 4096
_POLL_S = 0.05
# pmemsave writes through QEMU's main loop; 1 MiB takes a millisecond or two, so this is ample.
_PMEMSAVE_TIMEOUT_S = 10.0
# On q35 with at most ~2 GiB, RAM sits at [0, ram) minus the legacy hole at 640 KiB..1 MiB;
# anything above 2 GiB may be relocated above 4 GiB, so the sample stays inside [1 MiB, 2 GiB).
_LOW_RAM_START = 1 << 20
_LOW_RAM_END = 2 << 30
# The level multifd-zstd uses by default: the ratio we report is the one a migration would get.
_ZSTD_LEVEL = 1
_ZERO_PAGE = bytes(PAGE_SIZE_BYTES)


class MeasurementError(FerryError):
    """QEMU's measurement came back unusable (malformed reply, nothing sampled, unreadable dump)."""


@dataclass(frozen=True, slots=True)
class MemorySample:
    """What a sample of guest RAM looks like, in 4 KiB pages.

    Attributes:
        pages_sampled: pages read from the guest.
        zero_pages: of those, pages that are all zero bytes.
        nonzero_bytes: bytes of the other pages.
        compressed_bytes: those bytes after zstd (level 1, one frame per chunk).
    """

    pages_sampled: int
    zero_pages: int
    nonzero_bytes: int
    compressed_bytes: int

    @property
    def zero_fraction(self) -> float:
        """Share of sampled pages that are all zero (0.0 for an empty sample)."""
        return self.zero_pages / self.pages_sampled if self.pages_sampled else 0.0

    @property
    def compress_ratio(self) -> float:
        """Raw / compressed size of the non-zero pages: ≥ 1.0, 1.0 when there were none."""
        if self.nonzero_bytes == 0 or self.compressed_bytes == 0:
            return 1.0
        return max(1.0, self.nonzero_bytes / self.compressed_bytes)


@dataclass(frozen=True, slots=True)
class GuestProfile:
    """The pre-flight measurements of one guest.

    Attributes:
        ram_bytes: guest RAM (base plus hot-plugged).
        dirty_rate_bps: bytes of distinct pages dirtied per second.
        memory: the content sample.
        elapsed_ms: how long measuring took.
    """

    ram_bytes: int
    dirty_rate_bps: int
    memory: MemorySample
    elapsed_ms: int


async def measure_dirty_rate(
    session: QmpSession,
    *,
    calc_time_ms: int = 1000,
    sample_pages: int = DEFAULT_SAMPLE_PAGES,
    timeout_s: float = 10,
) -> int:
    """Measure how fast the guest dirties its memory, in bytes per second.

    QEMU reports an integer rate in "MB/s"; its code computes it with ``>> 20``, so that is MiB/s
    and the result here is a multiple of 1 MiB/s (a guest dirtying less reads as 0). A page
    written twice in the window counts once, so a longer ``calc_time_ms`` reads lower for a
    guest that rewrites a small working set. QEMU only samples RAM blocks of at least 128 MiB.

    Args:
        session: the guest's QMP session.
        calc_time_ms: measurement window (QEMU accepts 50..60000 ms).
        sample_pages: pages sampled per GiB of RAM (QEMU accepts 128..16384); the relative error
            shrinks with the square root of the number of sampled pages found dirty.
        timeout_s: deadline for the whole measurement, window included.

    Returns:
        The dirty rate in bytes/s.

    Raises:
        ConfigError: an argument is outside QEMU's range, or ``timeout_s`` is shorter than the
            window.
        QMPCommandError: QEMU refused (e.g. another measurement is running).
        QMPTimeout: no result within ``timeout_s``.
        QMPConnectError: the QMP connection is gone.
        MeasurementError: QEMU measured nothing (no RAM block large enough) or answered
            nonsense.
    """
    _check_range("calc_time_ms", calc_time_ms, _CALC_TIME_RANGE_MS)
    _check_range("sample_pages", sample_pages, _SAMPLE_PAGES_RANGE)
    if timeout_s * 1000 <= calc_time_ms:
        raise ConfigError(f"timeout_s={timeout_s:g} does not cover calc_time_ms={calc_time_ms}")
    arguments = {
        "calc-time": calc_time_ms,
        "calc-time-unit": "millisecond",
        "sample-pages": sample_pages,
        "mode": "page-sampling",
    }
    try:
        async with asyncio.timeout(timeout_s):
            await session.execute("calc-dirty-rate", arguments)
            # The answer cannot come before the window ends; poll only after it.
            await asyncio.sleep(calc_time_ms / 1000)
            while True:
                info = await session.execute("query-dirty-rate", {"calc-time-unit": "millisecond"})
                rate_mib_s = _measured_rate(info)
                if rate_mib_s is not None:
                    break
                await asyncio.sleep(_POLL_S)
    except TimeoutError as err:
        raise QMPTimeout(f"dirty rate of {session.name}", timeout_s) from err
    if rate_mib_s < 0:
        # QEMU leaves -1 when no RAM block was large enough to sample.
        raise MeasurementError(f"QEMU sampled no RAM of {session.name} (RAM under 128 MiB?)")
    session.logger.debug("measure.dirty_rate %d MiB/s over %d ms", rate_mib_s, calc_time_ms)
    return rate_mib_s * _MIB


def _check_range(name: str, value: int, bounds: tuple[int, int]) -> None:
    low, high = bounds
    if not low <= value <= high:
        raise ConfigError(f"{name}={value} is outside QEMU's range {low}..{high}")


def _measured_rate(info: object) -> int | None:
    """The rate from a ``query-dirty-rate`` reply, None while QEMU is still measuring."""
    if not isinstance(info, Mapping):
        raise MeasurementError(f"query-dirty-rate returned {info!r}")
    status = info.get("status")
    if status in ("unstarted", "measuring"):
        return None
    rate = info.get("dirty-rate")
    if status != "measured" or not isinstance(rate, int):
        raise MeasurementError(f"query-dirty-rate returned status={status!r} rate={rate!r}")
    return rate


async def ram_size_bytes(session: QmpSession) -> int:
    """Guest RAM in bytes: boot-time RAM plus hot-plugged memory.

    Raises:
        QMPCommandError, QMPTimeout, QMPConnectError: from the QMP command.
        MeasurementError: the reply is malformed.
    """
    info = await session.execute("query-memory-size-summary")
    base = info.get("base-memory") if isinstance(info, Mapping) else None
    plugged = info.get("plugged-memory", 0) if isinstance(info, Mapping) else None
    if not isinstance(base, int) or not isinstance(plugged, int) or base <= 0:
        raise MeasurementError(f"query-memory-size-summary returned {info!r}")
    return base + plugged


def chunk_addresses(ram_bytes: int, chunks: int, chunk_bytes: int) -> list[int]:
    """Guest-physical start addresses of ``chunks`` chunks spread evenly over low RAM.

    RAM in ``[1 MiB, min(ram, 2 GiB))`` is cut into ``chunks`` equal strata and one chunk is
    centred in each, page-aligned (:func:`spread_chunks`). Fewer chunks are returned when they
    would not fit.

    Raises:
        ConfigError: ``chunks`` or ``chunk_bytes`` are not positive, ``chunk_bytes`` is not a
            multiple of 4 KiB, or not even one chunk fits.
    """
    return spread_chunks(_LOW_RAM_START, min(ram_bytes, _LOW_RAM_END), chunks, chunk_bytes)


def spread_chunks(low: int, high: int, chunks: int, chunk_bytes: int) -> list[int]:
    """Starts of ``chunks`` page-aligned chunks, one centred in each of as many equal strata
    of ``[low, high)``; fewer when they would not fit.

    Raises:
        ConfigError: bad geometry (see :func:`chunk_addresses`), or not even one chunk fits.
    """
    if chunks <= 0 or chunk_bytes <= 0 or chunk_bytes % PAGE_SIZE_BYTES:
        raise ConfigError(
            f"need chunks > 0 and a positive multiple of 4 KiB, got {chunks} x {chunk_bytes}"
        )
    span = high - low
    chunks = min(chunks, span // chunk_bytes) if span > 0 else 0
    if chunks <= 0:
        raise ConfigError(f"a {chunk_bytes}-byte chunk does not fit in {high} bytes of RAM")
    stratum = span / chunks
    addresses = []
    for index in range(chunks):
        centre = low + stratum * (index + 0.5)
        start = int(centre - chunk_bytes / 2) // PAGE_SIZE_BYTES * PAGE_SIZE_BYTES
        addresses.append(max(low, min(start, high - chunk_bytes)))
    return addresses


async def sample_memory(
    session: QmpSession,
    scratch_dir: Path,
    *,
    ram_bytes: int,
    chunks: int = 32,
    chunk_bytes: int = 1 << 20,
) -> MemorySample:
    """Sample guest RAM: count zero pages and how well the others compress.

    QEMU writes each chunk with ``pmemsave`` into a private directory under ``scratch_dir``
    (which QEMU must be able to write: same host and mount namespace); the files are read back
    and removed. Only RAM below 2 GiB is sampled (see :func:`chunk_addresses`). A
    group-writable ``scratch_dir`` (QEMU running as another user, in that group) makes the
    private directory writable by that group too.

    Args:
        session: the guest's QMP session.
        scratch_dir: where the temporary dump files go.
        ram_bytes: the guest's RAM (from :func:`ram_size_bytes`).
        chunks: how many chunks to sample.
        chunk_bytes: size of each chunk, a multiple of 4 KiB.

    Returns:
        The sample's page counts and sizes.

    Raises:
        ConfigError: bad chunk geometry (see :func:`chunk_addresses`).
        QMPCommandError, QMPTimeout, QMPConnectError: a ``pmemsave`` failed.
        MeasurementError: the scratch directory or a dump file is unusable.
    """
    addresses = chunk_addresses(ram_bytes, chunks, chunk_bytes)
    try:
        directory = Path(tempfile.mkdtemp(prefix="pmem-", dir=scratch_dir.absolute()))
        scratch = scratch_dir.stat()
        if scratch.st_mode & stat.S_IWGRP:
            os.chown(directory, -1, scratch.st_gid)
            os.chmod(directory, 0o770)
    except OSError as err:
        raise MeasurementError(f"cannot use scratch directory {scratch_dir}: {err}") from err
    totals = [0, 0, 0, 0]
    try:
        for index, address in enumerate(addresses):
            path = directory / f"chunk-{index}.bin"
            await session.execute(
                "pmemsave",
                {"val": address, "size": chunk_bytes, "filename": str(path)},
                timeout_s=_PMEMSAVE_TIMEOUT_S,
            )
            counts = await asyncio.to_thread(_inspect_dump, path, chunk_bytes)
            totals = [total + count for total, count in zip(totals, counts, strict=True)]
    finally:
        # Synchronous on purpose: a few small files, and no await that cancellation could skip.
        shutil.rmtree(directory, ignore_errors=True)
    sample = MemorySample(*totals)
    session.logger.debug(
        "measure.memory %d pages, zero %.3f, ratio %.2f",
        sample.pages_sampled,
        sample.zero_fraction,
        sample.compress_ratio,
    )
    return sample


def _inspect_dump(path: Path, expected_bytes: int) -> tuple[int, int, int, int]:
    """(pages, zero pages, non-zero bytes, their zstd size) of one dump file; then deletes it."""
    try:
        data = path.read_bytes()
        path.unlink()
    except OSError as err:
        raise MeasurementError(f"cannot read QEMU's memory dump {path}: {err}") from err
    if len(data) != expected_bytes:
        raise MeasurementError(f"{path} holds {len(data)} bytes, expected {expected_bytes}")
    return _inspect_bytes(data)


def _inspect_bytes(data: bytes) -> tuple[int, int, int, int]:
    """(pages, zero pages, non-zero bytes, their zstd size) of a chunk of guest RAM."""
    nonzero = [
        data[offset : offset + PAGE_SIZE_BYTES]
        for offset in range(0, len(data), PAGE_SIZE_BYTES)
        if data[offset : offset + PAGE_SIZE_BYTES] != _ZERO_PAGE
    ]
    pages = len(data) // PAGE_SIZE_BYTES
    raw = b"".join(nonzero)
    return pages, pages - len(nonzero), len(raw), zstd_bytes(raw) if raw else 0


def zstd_bytes(raw: bytes) -> int:
    """``raw``'s size once zstd compresses it as multifd would (level 1, one frame)."""
    return len(zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(raw))


async def sample_ram_file(
    ram_file: Path, *, ram_bytes: int, chunks: int = 512, chunk_bytes: int = 32 << 10
) -> MemorySample:
    """Sample guest RAM through its memfd (``/proc/<pid>/fd/<n>``): ``chunks`` chunks spread
    over the whole file (:func:`spread_chunks`; RAM above 4 GiB included), read with ``pread`` in a
    thread. Reading allocates none of the guest's untouched pages.

    Raises:
        ConfigError: bad chunk geometry.
        MeasurementError: the file cannot be read.
    """
    offsets = spread_chunks(0, ram_bytes, chunks, chunk_bytes)

    def read_all() -> MemorySample:
        totals = [0, 0, 0, 0]
        try:
            fd = os.open(ram_file, os.O_RDONLY)
        except OSError as err:
            raise MeasurementError(f"cannot open guest RAM {ram_file}: {err}") from err
        try:
            for offset in offsets:
                data = os.pread(fd, chunk_bytes, offset)
                counts = _inspect_bytes(data[: len(data) // PAGE_SIZE_BYTES * PAGE_SIZE_BYTES])
                totals = [t + c for t, c in zip(totals, counts, strict=True)]
        except OSError as err:
            raise MeasurementError(f"cannot read guest RAM {ram_file}: {err}") from err
        finally:
            os.close(fd)
        return MemorySample(*totals)

    return await asyncio.to_thread(read_all)


async def measure_guest(
    session: QmpSession,
    scratch_dir: Path,
    *,
    calc_time_ms: int = 1000,
    sample_pages: int = DEFAULT_SAMPLE_PAGES,
    chunks: int = 32,
    chunk_bytes: int = 1 << 20,
    timeout_s: float = 15,
    ram_file: Path | None = None,
) -> GuestProfile:
    """All pre-flight measurements of one guest; the memory sample runs inside the dirty-rate
    window (``pmemsave`` only reads guest memory, so it does not disturb the sampling).

    Args:
        session: the guest's QMP session.
        scratch_dir: where :func:`sample_memory` puts its temporary files.
        calc_time_ms: dirty-rate window (see :func:`measure_dirty_rate`).
        sample_pages: dirty-rate sample pages per GiB.
        chunks: memory-sample chunks.
        chunk_bytes: memory-sample chunk size.
        timeout_s: deadline for everything.
        ram_file: the guest's RAM memfd (``/proc/<pid>/fd/<n>``); given, the memory is sampled
            through it (:func:`sample_ram_file`, its own chunk geometry) instead of
            ``pmemsave``.

    Returns:
        RAM size, dirty rate, memory sample and the time it all took.

    Raises:
        ConfigError, QMPCommandError, QMPTimeout, QMPConnectError, MeasurementError: see
            :func:`measure_dirty_rate` and :func:`sample_memory`.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        async with asyncio.timeout(timeout_s):
            ram_bytes = await ram_size_bytes(session)
            rate_bps, memory = await _measure_concurrently(
                session,
                scratch_dir,
                ram_bytes,
                calc_time_ms=calc_time_ms,
                sample_pages=sample_pages,
                chunks=chunks,
                chunk_bytes=chunk_bytes,
                timeout_s=timeout_s,
                ram_file=ram_file,
            )
    except TimeoutError as err:
        raise QMPTimeout(f"measurements of {session.name}", timeout_s) from err
    profile = GuestProfile(
        ram_bytes=ram_bytes,
        dirty_rate_bps=rate_bps,
        memory=memory,
        elapsed_ms=round((loop.time() - started) * 1000),
    )
    session.logger.info(
        "measure.done ram=%d dirty=%d B/s zero=%.3f ratio=%.2f in %d ms",
        profile.ram_bytes,
        profile.dirty_rate_bps,
        profile.memory.zero_fraction,
        profile.memory.compress_ratio,
        profile.elapsed_ms,
    )
    return profile


async def _measure_concurrently(
    session: QmpSession,
    scratch_dir: Path,
    ram_bytes: int,
    *,
    calc_time_ms: int,
    sample_pages: int,
    chunks: int,
    chunk_bytes: int,
    timeout_s: float,
    ram_file: Path | None,
) -> tuple[int, MemorySample]:
    sampled = (
        sample_memory(
            session, scratch_dir, ram_bytes=ram_bytes, chunks=chunks, chunk_bytes=chunk_bytes
        )
        if ram_file is None
        else sample_ram_file(ram_file, ram_bytes=ram_bytes)
    )
    try:
        async with asyncio.TaskGroup() as group:
            rate = group.create_task(
                measure_dirty_rate(
                    session,
                    calc_time_ms=calc_time_ms,
                    sample_pages=sample_pages,
                    timeout_s=timeout_s,
                )
            )
            memory = group.create_task(sampled)
    except* FerryError as failures:
        # Callers expect our error types, not an ExceptionGroup: report the first failure.
        raise failures.exceptions[0] from None
    return rate.result(), memory.result()


async def _written_bytes(session: QmpSession) -> int:
    stats = await session.execute("query-blockstats")
    return sum(int(entry.get("stats", {}).get("wr_bytes", 0)) for entry in stats)


async def measure_disk_writes(session: QmpSession, window_s: float = 1.0) -> int:
    """The guest's disk write rate (bytes/s) over ``window_s``, from QEMU's block statistics
    (every disk of the VM together).

    Raises:
        QMPCommandError, QMPTimeout, QMPConnectError: QEMU did not answer.
    """
    loop = asyncio.get_running_loop()
    first, started = await _written_bytes(session), loop.time()
    await asyncio.sleep(window_s)
    last, ended = await _written_bytes(session), loop.time()
    return max(0, round((last - first) / max(ended - started, 1e-3)))
