"""qcow2 disk images on a host: create, measure and remove them with ``qemu-img``.

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
from pathlib import Path

from vmferry.core.errors import FerryError

__all__ = ["DiskImageError", "allocated_bytes", "create_image", "free_bytes", "remove_image"]

logger = logging.getLogger(__name__)

_TIMEOUT_S = 60.0


class DiskImageError(FerryError):
    """``qemu-img`` is missing or failed on an image."""


async def _qemu_img(*args: str) -> str:
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
        async with asyncio.timeout(_TIMEOUT_S):
            out, err = await process.communicate()
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
    await _qemu_img("create", "-q", "-f", "qcow2", str(path), str(size_bytes))
    logger.info("disk.created %s (%d bytes virtual)", path, size_bytes)


async def allocated_bytes(path: Path) -> int:
    """Bytes of guest data the image holds (its allocation on the host filesystem).

    Works while a QEMU has the image open (``-U``: no lock needed to read metadata).

    Raises:
        DiskImageError: no such image, or qemu-img failed.
    """
    info = json.loads(await _qemu_img("info", "-U", "--output=json", "-f", "qcow2", str(path)))
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
