"""Digests of a stopped VM's guest RAM and of a disk image, read directly by the host agent.

Guest RAM lives in a ``memory-backend-memfd`` object, so the agent (root, or QEMU's user) opens
QEMU's memfd through ``/proc/<pid>/fd/<n>`` and reads it with ``pread``, never ``mmap``: a read
fault on a never-written page of a memfd (shmem) allocates that page, so an mmap digest would grow
the VM's memory by every page the guest never touched; ``pread`` returns zeros for them and
allocates nothing. A chunk without any data (``SEEK_DATA`` past its end) is not read at all: its
digest is the digest of its zeros.

A disk image is hashed by guest-visible content: ``qemu-img map`` says where each extent's data
lives (the image or a backing file, at an offset) and which extents read as zeros; data extents
are read from the files, zeros are not read. A qcow2, its mirror and a raw copy of the same disk
give the same digests. Compressed or encrypted data, external data files and formats other than
raw and qcow2 are refused (:class:`ImageNotReadable`).

Chunks are hashed with xxh3_128 on ``workers`` threads, off the event loop: ``os.preadv`` and
xxhash (for buffers over 64 KiB) release the GIL, so threads scale (``bench/digest.py``).
"""

from __future__ import annotations

import asyncio
import bisect
import errno
import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import xxhash

from vmferry.core.errors import FerryError
from vmferry.core.handoff import ChunkPlan, DigestKind, Digests
from vmferry.qemu.image_map import Extent, ImageLayer, ImageMap, map_image

__all__ = [
    "DEFAULT_WORKERS",
    "QEMU_MEMFD_NAME",
    "DigestError",
    "DigestTimeout",
    "GuestRamNotFound",
    "ImageNotReadable",
    "digest_image",
    "digest_ram",
    "find_ram_fd",
]

logger = logging.getLogger(__name__)

DEFAULT_WORKERS = min(4, os.cpu_count() or 1)

QEMU_MEMFD_NAME = "memory-backend-memfd"

_READABLE_FORMATS = ("raw", "qcow2")
_BYTES_PER_THREAD = 64 << 20


class DigestError(FerryError):
    """A digest could not be made (unreadable file, wrong size, short read)."""


class GuestRamNotFound(DigestError):
    """QEMU's guest RAM memfd was not found among the process's open files.

    Attributes:
        pid: QEMU's process id.
        name: the memfd's name.
    """

    def __init__(self, pid: int, name: str, reason: str) -> None:
        super().__init__(f"guest RAM memfd {name!r} of QEMU process {pid} not found: {reason}")
        self.pid = pid
        self.name = name


class ImageNotReadable(DigestError):
    """An image's content cannot be read by offset (compressed, encrypted, unsupported format).

    Attributes:
        path: the image.
        reason: what stands in the way.
    """

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"cannot digest disk image {path}: {reason}")
        self.path = path
        self.reason = reason


class DigestTimeout(DigestError):
    """Hashing did not finish within the caller's deadline (the threads were stopped)."""

    def __init__(self, what: str, timeout_s: float) -> None:
        super().__init__(f"digest of {what} took longer than {timeout_s:g} s")
        self.timeout_s = timeout_s


def find_ram_fd(pid: int, size_bytes: int, name: str = QEMU_MEMFD_NAME) -> Path:
    """The ``/proc/<pid>/fd/<n>`` link to QEMU's guest RAM memfd.

    QEMU names every ``memory-backend-memfd``'s memfd after the object type, not its id (the link
    reads ``/memfd:memory-backend-memfd (deleted)``, QEMU 10), so the guest RAM is the one memfd
    of that name whose size is the VM's memory.

    Args:
        pid: QEMU's process id.
        size_bytes: the VM's memory size.
        name: the memfd's name.

    Raises:
        GuestRamNotFound: no such process, no permission to look, no such memfd of that size, or
            several.
    """
    fd_dir = Path(f"/proc/{pid}/fd")
    wanted = f"/memfd:{name}"
    try:
        entries = os.listdir(fd_dir)
    except FileNotFoundError as err:
        raise GuestRamNotFound(pid, name, "no such process") from err
    except PermissionError as err:
        raise GuestRamNotFound(
            pid, name, "permission denied (run the agent as root or as QEMU's user)"
        ) from err
    found: list[Path] = []
    memfds: list[str] = []
    for entry in sorted(entries, key=int):
        try:
            link = os.readlink(fd_dir / entry)
            size = os.stat(fd_dir / entry).st_size if link.startswith("/memfd:") else -1
        except OSError:
            continue  # closed since listdir
        if link in (wanted, f"{wanted} (deleted)") and size == size_bytes:
            found.append(fd_dir / entry)
        elif size >= 0:
            memfds.append(f"{link.removesuffix(' (deleted)')} of {size} bytes")
    if len(found) == 1:
        return found[0]
    if found:
        raise GuestRamNotFound(
            pid, name, f"{len(found)} memfds of {size_bytes} bytes ({', '.join(map(str, found))})"
        )
    seen = ", ".join(memfds) or "none"
    raise GuestRamNotFound(
        pid,
        name,
        f"no memfd of {size_bytes} bytes by that name (memfds open: {seen}); "
        "is guest RAM a memory-backend-memfd?",
    )


async def digest_ram(
    path: Path, plan: ChunkPlan, *, timeout_s: float, workers: int = DEFAULT_WORKERS
) -> Digests:
    """Hash guest RAM at ``path`` (a memfd link from :func:`find_ram_fd`) over ``plan``.

    The VM must be stopped, or the digest describes no single moment.

    Raises:
        DigestError: cannot open it, its size is not the plan's, or a read failed.
        DigestTimeout: not done within ``timeout_s``.
    """
    started = time.perf_counter()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise DigestError(f"cannot open guest RAM {path}: {err.strerror}") from err
    try:
        size = os.fstat(fd).st_size
        if size != plan.size_bytes:
            raise DigestError(f"guest RAM {path} is {size} bytes, the plan {plan.size_bytes}")
        reader = functools.partial(_ram_chunk, fd, plan)
        values = await _hash_plan(reader, plan, f"guest RAM {path}", timeout_s, workers)
    finally:
        os.close(fd)
    digests = Digests(DigestKind.RAM, plan, values, _ms_since(started))
    _log_done(digests, path)
    return digests


async def digest_image(
    path: Path,
    plan: ChunkPlan,
    *,
    timeout_s: float,
    fmt: str | None = None,
    workers: int = DEFAULT_WORKERS,
    image_map: ImageMap | None = None,
) -> Digests:
    """Hash the guest-visible content of the disk image at ``path`` over ``plan``.

    Works while a QEMU has the image open; the VM must be stopped and its writes flushed (QEMU
    flushes when it stops a VM), or the image's metadata on disk may lag behind QEMU's.

    Args:
        path: the image.
        plan: chunks of the image's virtual size.
        timeout_s: deadline for mapping and hashing together.
        fmt: the image's format when known (probed otherwise).
        workers: hashing threads.
        image_map: its map, taken already (while nothing has written to it since).

    Raises:
        ImageNotReadable: compressed, encrypted or externally stored data, an unsupported format.
        ImageMapError: qemu-img failed on it (missing, not an image) or ran past ``timeout_s``.
        DigestError: its virtual size is not the plan's, or a read failed or came up short.
        DigestTimeout: hashing not done within what ``timeout_s`` left.
    """
    started = time.perf_counter()
    image = image_map or await map_image(path, fmt=fmt, timeout_s=timeout_s)
    if image.virtual_size_bytes != plan.size_bytes:
        raise DigestError(
            f"disk image {path} is {image.virtual_size_bytes} bytes, the plan {plan.size_bytes}"
        )
    fds = _open_layers(image)
    try:
        reader = _ImageChunks(image, fds, plan)
        remaining_s = max(0.0, timeout_s - (time.perf_counter() - started))
        values = await _hash_plan(reader.digest, plan, f"disk image {path}", remaining_s, workers)
    finally:
        for fd in fds.values():
            os.close(fd)
    digests = Digests(DigestKind.DISK, plan, values, _ms_since(started))
    _log_done(digests, path)
    return digests


# (chunk index, reusable buffer of plan.chunk_bytes) -> the chunk's digest
_ChunkDigest = Callable[[int, bytearray], bytes]


async def _hash_plan(
    reader: _ChunkDigest, plan: ChunkPlan, what: str, timeout_s: float, workers: int
) -> tuple[bytes, ...]:
    """Run ``reader`` over the plan on ``workers`` threads; on timeout or cancellation, stop
    them and wait until they have (each finishes its current chunk at most)."""
    stop = threading.Event()
    job = asyncio.ensure_future(asyncio.to_thread(_hash_all, reader, plan, max(1, workers), stop))
    try:
        async with asyncio.timeout(timeout_s):
            return await asyncio.shield(job)
    except TimeoutError as err:
        stop.set()
        await asyncio.gather(job, return_exceptions=True)
        raise DigestTimeout(what, timeout_s) from err
    except BaseException:
        stop.set()
        await asyncio.gather(job, return_exceptions=True)
        raise


def _hash_all(
    reader: _ChunkDigest, plan: ChunkPlan, workers: int, stop: threading.Event
) -> tuple[bytes, ...]:
    indexes = plan.indexes
    values: list[bytes] = [b""] * len(indexes)
    # A second thread costs a wake-up (~ms on a busy host): worth it for a full plan only.
    workers = max(1, min(workers, len(indexes), plan.planned_bytes // _BYTES_PER_THREAD))

    def work(first: int) -> None:
        buffer = bytearray(plan.chunk_bytes)
        # Strided, so the cheap chunks (holes) and the dear ones spread over the threads.
        for position in range(first, len(indexes), workers):
            if stop.is_set():
                return
            values[position] = reader(indexes[position], buffer)

    if workers == 1:
        work(0)
    else:
        with ThreadPoolExecutor(workers, thread_name_prefix="digest") as pool:
            futures = [pool.submit(work, k) for k in range(workers)]
            try:
                for future in futures:
                    future.result()
            except BaseException:
                stop.set()  # the other threads stop at their next chunk
                raise
    if stop.is_set():
        raise DigestError("digest stopped")
    return tuple(values)


@functools.lru_cache(maxsize=8)
def _zero_digest(length: int) -> bytes:
    return xxhash.xxh3_128_digest(bytes(length))


def _ram_chunk(fd: int, plan: ChunkPlan, index: int, buffer: bytearray) -> bytes:
    chunk = plan.chunk_range(index)
    try:
        data_at = os.lseek(fd, chunk.start_bytes, os.SEEK_DATA)
    except OSError as err:
        # ENXIO: no data from here to the end. Anything else: read the chunk to be sure.
        data_at = plan.size_bytes if err.errno == errno.ENXIO else chunk.start_bytes
    if data_at >= chunk.end_bytes:
        return _zero_digest(chunk.length_bytes)
    view = memoryview(buffer)[: chunk.length_bytes]
    _read_exactly(fd, view, chunk.start_bytes)
    return xxhash.xxh3_128_digest(view)


def _read_exactly(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        try:
            count = os.preadv(fd, [view[done:]], offset + done)
        except OSError as err:
            raise DigestError(f"read at byte {offset + done} failed: {err.strerror}") from err
        if count == 0:
            raise DigestError(f"file ends at byte {offset + done}, {len(view) - done} bytes short")
        done += count


def _open_layers(image: ImageMap) -> dict[int, int]:
    """Open the files that hold data, after refusing what cannot be read by offset."""
    depths = sorted({e.depth for e in image.extents if not e.zero})
    for extent in image.extents:
        if extent.zero:
            continue
        if extent.compressed:
            raise ImageNotReadable(image.path, f"compressed data at byte {extent.start_bytes}")
        if extent.offset_bytes is None:
            raise ImageNotReadable(image.path, f"no file offset for byte {extent.start_bytes}")
    for depth in depths:
        layer = image.layers[depth]
        problem = _layer_problem(layer)
        if problem is not None:
            where = "" if depth == 0 else f" (backing file {layer.filename})"
            raise ImageNotReadable(image.path, problem + where)
    fds: dict[int, int] = {}
    try:
        for depth in depths:
            fds[depth] = os.open(image.layers[depth].filename, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        for fd in fds.values():
            os.close(fd)
        raise DigestError(f"cannot open {err.filename}: {err.strerror}") from err
    return fds


def _layer_problem(layer: ImageLayer) -> str | None:
    """Why data stored in ``layer`` cannot be read at its offset, None when it can."""
    if layer.format not in _READABLE_FORMATS:
        return f"format {layer.format} (only {' and '.join(_READABLE_FORMATS)})"
    if layer.encrypted:
        return "encrypted"
    if layer.data_file is not None:
        return f"data in an external data file {layer.data_file}"
    if not layer.is_plain_file:
        return f"not a plain file: {layer.filename}"
    return None


class _ImageChunks:
    """Digests of an image's chunks: data extents read from their files, zeros not read."""

    def __init__(self, image: ImageMap, fds: dict[int, int], plan: ChunkPlan) -> None:
        self.extents = image.extents
        self.starts = [e.start_bytes for e in image.extents]
        self.fds = fds
        self.plan = plan
        self.zeros = memoryview(bytes(plan.chunk_bytes))

    def digest(self, index: int, buffer: bytearray) -> bytes:
        chunk = self.plan.chunk_range(index)
        pieces = self._pieces(chunk.start_bytes, chunk.end_bytes)
        if all(extent.zero for extent, _, _ in pieces):
            return _zero_digest(chunk.length_bytes)
        view = memoryview(buffer)[: chunk.length_bytes]
        for extent, start, end in pieces:
            part = view[start - chunk.start_bytes : end - chunk.start_bytes]
            if extent.zero:
                part[:] = self.zeros[: end - start]
            else:
                assert extent.offset_bytes is not None  # refused in _open_layers
                offset = extent.offset_bytes + start - extent.start_bytes
                _read_exactly(self.fds[extent.depth], part, offset)
        return xxhash.xxh3_128_digest(view)

    def _pieces(self, start: int, end: int) -> list[tuple[Extent, int, int]]:
        """The extents overlapping ``[start, end)``, each clipped to it."""
        pieces = []
        position = bisect.bisect_right(self.starts, start) - 1
        while position < len(self.extents) and self.extents[position].start_bytes < end:
            extent = self.extents[position]
            pieces.append((extent, max(start, extent.start_bytes), min(end, extent.end_bytes)))
            position += 1
        return pieces


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000


def _log_done(digests: Digests, path: Path) -> None:
    plan = digests.plan
    logger.info(
        "digest.%s %s: %s plan, %d chunks, %d bytes in %.1f ms",
        digests.kind,
        path,
        plan.mode,
        len(plan.indexes),
        plan.planned_bytes,
        digests.elapsed_ms,
    )
