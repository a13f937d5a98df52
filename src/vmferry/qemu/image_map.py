"""Where a disk image's guest-visible bytes live: ``qemu-img map`` and its backing chain, parsed.

``qemu-img map`` lists the image's extents in guest order: zeros (unallocated or zero clusters,
holes of a raw file), and data with the ``offset`` in the file it is stored in, that file being
the image itself (``depth`` 0) or a backing file (``depth`` n, the n-th file of
``qemu-img info --backing-chain``). With both, a reader can hash an image's content while a QEMU
has it open (``-U``, force-share) without going through QEMU, and two layouts of the same content
(a qcow2 and its mirror, a raw file) read alike.

Only raw and qcow2 files are described; whether an extent can be read by offset (not compressed,
not encrypted, not in an external data file) is for the reader to decide from the fields here.
The raw JSON never leaves this module.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from vmferry.qemu.qcow2 import DiskImageError, qemu_img

__all__ = ["Extent", "ImageLayer", "ImageMap", "ImageMapError", "map_image"]

logger = logging.getLogger(__name__)


class ImageMapError(DiskImageError):
    """``qemu-img`` is missing, failed, ran out of time, or said something we cannot parse."""


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of guest bytes ``[start_bytes, start_bytes + length_bytes)`` with one status.

    Attributes:
        depth: the backing-chain layer that holds it (0: the image itself).
        present: allocated somewhere in the chain.
        zero: reads as zeros.
        data: holds data (read at ``offset_bytes`` of layer ``depth``'s file).
        compressed: stored compressed (no offset to read at).
        offset_bytes: where the data starts in layer ``depth``'s file, None when not addressable.
    """

    start_bytes: int
    length_bytes: int
    depth: int
    present: bool
    zero: bool
    data: bool
    compressed: bool
    offset_bytes: int | None

    @property
    def end_bytes(self) -> int:
        return self.start_bytes + self.length_bytes


@dataclass(frozen=True, slots=True)
class ImageLayer:
    """One file of an image's backing chain.

    Attributes:
        filename: as QEMU names it (a path for files; ``json:{...}`` or a URL otherwise).
        format: ``raw``, ``qcow2``, ...
        encrypted: its data is encrypted on disk.
        data_file: a qcow2 external data file holding its data, None when it holds its own.
    """

    filename: str
    format: str
    encrypted: bool
    data_file: str | None

    @property
    def is_plain_file(self) -> bool:
        return not self.filename.startswith("json:") and "://" not in self.filename


@dataclass(frozen=True, slots=True)
class ImageMap:
    """An image's guest-visible layout.

    Attributes:
        path: the image.
        virtual_size_bytes: its size as the guest sees it.
        layers: ``layers[d]`` is the file an extent of ``depth`` d is stored in.
        extents: contiguous, in guest order, covering ``[0, virtual_size_bytes)``.
    """

    path: Path
    virtual_size_bytes: int
    layers: tuple[ImageLayer, ...]
    extents: tuple[Extent, ...]


async def map_image(path: Path, *, fmt: str | None = None, timeout_s: float = 60.0) -> ImageMap:
    """Map ``path``'s guest-visible bytes (works while a QEMU has it open).

    Args:
        path: the image.
        fmt: its format (``raw``/``qcow2``) when known; probed by ``qemu-img`` otherwise. Pass it
            for raw images a guest writes to: a guest can write what probes as another format.
        timeout_s: deadline for both ``qemu-img`` calls together.

    Raises:
        ImageMapError: qemu-img missing, failed (no such image, unreadable, not an image) or
            timed out, or its output is not what this module understands.
    """
    path = path.absolute()
    format_args = () if fmt is None else ("-f", fmt)
    # Both at once (this runs while the guest is paused); each kills its process if cancelled.
    info_task = asyncio.ensure_future(
        _qemu_img("info", "-U", "--backing-chain", "--output=json", *format_args, str(path))
    )
    map_task = asyncio.ensure_future(
        _qemu_img("map", "-U", "--output=json", *format_args, str(path))
    )
    try:
        async with asyncio.timeout(timeout_s):
            info, extents = await asyncio.gather(info_task, map_task)
    except TimeoutError as err:
        raise ImageMapError(f"qemu-img took longer than {timeout_s:g} s to map {path}") from err
    finally:
        info_task.cancel()
        map_task.cancel()
        await asyncio.gather(info_task, map_task, return_exceptions=True)
    size, layers = _parse_chain(info, path)
    parsed = _parse_extents(extents, path)
    _check_coverage(parsed, size, len(layers), path)
    return ImageMap(path, size, layers, parsed)


async def _qemu_img(*args: str) -> object:
    """``qemu-img ARGS`` (its deadline is the caller's), its JSON output parsed."""
    try:
        out = await qemu_img(*args, timeout_s=math.inf)
    except DiskImageError as error:
        raise ImageMapError(str(error)) from error
    try:
        return json.loads(out)
    except ValueError as error:
        raise ImageMapError(f"qemu-img {args[0]} printed no JSON: {error}") from error


def _parse_chain(data: object, path: Path) -> tuple[int, tuple[ImageLayer, ...]]:
    if not isinstance(data, list) or not data:
        raise ImageMapError(
            f"qemu-img info of {path}: expected a list of images, got {data!r:.200}"
        )
    layers: list[ImageLayer] = []
    for entry in data:
        if not isinstance(entry, dict):
            raise ImageMapError(f"qemu-img info of {path}: not an object: {entry!r:.200}")
        filename, fmt = entry.get("filename"), entry.get("format")
        encrypted = entry.get("encrypted", False)
        if (
            not isinstance(filename, str)
            or not isinstance(fmt, str)
            or not isinstance(encrypted, bool)
        ):
            raise ImageMapError(f"qemu-img info of {path}: bad image entry {entry!r:.200}")
        layers.append(ImageLayer(filename, fmt, encrypted, _data_file(entry)))
    size = data[0].get("virtual-size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ImageMapError(f"qemu-img info of {path}: no virtual size")
    return size, tuple(layers)


def _data_file(entry: dict[str, object]) -> str | None:
    specific = entry.get("format-specific")
    if not isinstance(specific, dict):
        return None
    data = specific.get("data")
    if not isinstance(data, dict):
        return None
    name = data.get("data-file")
    return name if isinstance(name, str) else None


def _parse_extents(data: object, path: Path) -> tuple[Extent, ...]:
    if not isinstance(data, list):
        raise ImageMapError(f"qemu-img map of {path}: expected a list, got {data!r:.200}")
    return tuple(_extent(entry, path) for entry in data)


def _extent(entry: object, path: Path) -> Extent:
    if not isinstance(entry, dict):
        raise ImageMapError(f"qemu-img map of {path}: not an object: {entry!r:.200}")
    offset = entry.get("offset")
    if offset is not None:
        offset = _count(entry, "offset", path)
    return Extent(
        start_bytes=_count(entry, "start", path),
        length_bytes=_count(entry, "length", path),
        depth=_count(entry, "depth", path),
        present=_flag(entry, "present", path),
        zero=_flag(entry, "zero", path),
        data=_flag(entry, "data", path),
        compressed=_flag(entry, "compressed", path, default=False),
        offset_bytes=offset,
    )


def _count(entry: dict[str, object], key: str, path: Path) -> int:
    value = entry.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ImageMapError(f"qemu-img map of {path}: bad {key!r} in {entry!r:.200}")
    return value


def _flag(entry: dict[str, object], key: str, path: Path, default: bool | None = None) -> bool:
    value = entry.get(key, default)
    if not isinstance(value, bool):
        raise ImageMapError(f"qemu-img map of {path}: bad {key!r} in {entry!r:.200}")
    return value


def _check_coverage(extents: tuple[Extent, ...], size: int, layers: int, path: Path) -> None:
    position = 0
    for extent in extents:
        if extent.start_bytes != position or extent.length_bytes == 0:
            raise ImageMapError(
                f"qemu-img map of {path}: extents not contiguous at byte {extent.start_bytes}"
            )
        if extent.depth >= layers and not extent.zero:
            raise ImageMapError(
                f"qemu-img map of {path}: data at depth {extent.depth} of a {layers}-file chain"
            )
        position = extent.end_bytes
    if position != size:
        raise ImageMapError(f"qemu-img map of {path}: extents cover {position} of {size} bytes")
