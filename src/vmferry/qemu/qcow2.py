"""Disk images on a host: create, probe, copy, measure and remove them with ``qemu-img``.

Every call runs ``qemu-img`` as a subprocess with an argv list (never a shell string) and a
deadline. Images are thin: a new image allocates nothing until the guest (or a mirror) writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vmferry.core.errors import ConfigError, FerryError

__all__ = [
    "DiskImageError",
    "ImageFormat",
    "ImageInfo",
    "UnusableImage",
    "allocated_bytes",
    "copy_image",
    "create_image",
    "free_bytes",
    "probe_image",
    "qemu_img",
    "remove_image",
]

logger = logging.getLogger(__name__)

_TIMEOUT_S = 60.0


class DiskImageError(FerryError):
    """``qemu-img`` is missing or failed on an image."""


class UnusableImage(ConfigError):
    """A user's image vmferry will not run: missing, unreadable, not a disk image, a format
    it does not take, or in use by another QEMU."""


ImageFormat = Literal["qcow2", "raw"]
# Where a raw image shows it is a disk: an MBR/boot signature, a GPT header, or a filesystem
# written to the whole disk (ext2/3/4, XFS, Btrfs). Anything else is a file, not a disk.
_RAW_MARKS: tuple[tuple[int, bytes], ...] = (
    (510, b"\x55\xaa"),
    (512, b"EFI PART"),
    (1024 + 56, b"\x53\xef"),
    (0, b"XFSB"),
    (0x10040, b"_BHRfS_M"),
)


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """What ``qemu-img info`` found in a user's image."""

    path: Path
    format: ImageFormat
    virtual_size_bytes: int
    actual_size_bytes: int
    backing_file: str | None


async def qemu_img(*args: str, timeout_s: float = _TIMEOUT_S) -> str:
    """Run ``qemu-img ARGS`` (an argv, never a shell string); its standard output.

    Raises:
        DiskImageError: qemu-img is missing, failed, or took longer than ``timeout_s``.
    """
    tool = shutil.which("qemu-img")
    if tool is None:
        raise DiskImageError("qemu-img not found: install qemu-utils")
    logger.debug("running qemu-img %s", args)
    process = await asyncio.create_subprocess_exec(
        tool,
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout_s):
            out, err = await process.communicate()
    except TimeoutError as error:
        process.kill()
        await process.wait()
        raise DiskImageError(f"qemu-img {args[0]} took longer than {timeout_s:g} s") from error
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        raise
    if process.returncode != 0:
        raise DiskImageError(
            f"qemu-img {args[0]} failed ({process.returncode}): {err.decode(errors='replace')}"
        )
    return out.decode()


async def create_image(path: Path, size_bytes: int) -> None:
    """Create an empty qcow2 image of ``size_bytes`` at ``path`` (which must not exist).

    Raises:
        DiskImageError: ``path`` exists already, or qemu-img failed.
    """
    if path.exists():
        raise DiskImageError(f"disk image {path} exists already; refusing to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    await qemu_img("create", "-q", "-f", "qcow2", str(path), str(size_bytes))
    logger.info("disk.created %s (%d bytes virtual)", path, size_bytes)


async def allocated_bytes(path: Path) -> int:
    """Bytes of guest data the image holds (its allocation on the host filesystem).

    Works while a QEMU has the image open (``-U``: no lock needed to read metadata).

    Raises:
        DiskImageError: no such image, or qemu-img failed.
    """
    info = json.loads(await qemu_img("info", "-U", "--output=json", "-f", "qcow2", str(path)))
    return int(info.get("actual-size", 0))


def remove_image(path: Path) -> None:
    """Delete an image file (no error when it is already gone)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
        logger.info("disk.removed %s", path)


def free_bytes(directory: Path) -> int:
    """Space available to unprivileged writers on ``directory``'s filesystem."""
    directory.mkdir(parents=True, exist_ok=True)
    stats = os.statvfs(directory)
    return stats.f_bavail * stats.f_frsize


async def probe_image(path: Path) -> ImageInfo:
    """Probe a user's image: its format from its content (never from its name), its size.

    ``qemu-img info`` runs without ``-U``, so an image another QEMU holds open fails here
    (QEMU's image lock) before anything is created.

    Raises:
        UnusableImage: missing, unreadable, not a disk image, not qcow2 or raw, in use.
    """
    if not path.is_absolute():
        raise UnusableImage(f"image path must be absolute: {path}")
    if not path.is_file():
        raise UnusableImage(f"no image file at {path}")
    if not os.access(path, os.R_OK):
        raise UnusableImage(f"image {path} is not readable")
    if "," in str(path):
        raise UnusableImage(f"image path must not contain ',': {path}")
    try:
        info = json.loads(await qemu_img("info", "--output=json", str(path)))
    except DiskImageError as err:
        if "lock" in str(err):
            raise UnusableImage(
                f"image {path} is in use by another QEMU (it holds the image's lock)"
            ) from err
        raise UnusableImage(f"cannot read image {path}: {err}") from err
    fmt = info.get("format")
    if fmt not in ("qcow2", "raw"):
        raise UnusableImage(f"image {path} is {fmt}: vmferry runs qcow2 and raw images")
    if fmt == "raw" and not _looks_like_disk(path):
        raise UnusableImage(
            f"{path} is not a disk image (no partition table, boot sector or filesystem)"
        )
    backing = info.get("backing-filename")
    return ImageInfo(
        path=path,
        format="qcow2" if fmt == "qcow2" else "raw",
        virtual_size_bytes=int(info["virtual-size"]),
        actual_size_bytes=int(info.get("actual-size", 0)),
        backing_file=backing if isinstance(backing, str) else None,
    )


def _looks_like_disk(path: Path) -> bool:
    with path.open("rb") as file:
        head = file.read(0x10040 + 8)
    return any(head[at : at + len(mark)] == mark for at, mark in _RAW_MARKS)


async def copy_image(image: ImageInfo, target: Path, timeout_s: float) -> None:
    """Copy a user's image into a new qcow2 at ``target`` (sparse; a backing chain is
    flattened). The user's file is only read.

    Raises:
        DiskImageError: ``target`` exists, or qemu-img failed (a partial copy is removed).
    """
    if target.exists():
        raise DiskImageError(f"disk image {target} exists already; refusing to overwrite it")
    target.parent.mkdir(parents=True, exist_ok=True)
    args = ["convert", "-q", "-f", image.format, "-O", "qcow2", str(image.path), str(target)]
    try:
        await qemu_img(*args, timeout_s=timeout_s)
    except BaseException:
        remove_image(target)
        raise
    logger.info("disk.copied %s -> %s", image.path, target)
