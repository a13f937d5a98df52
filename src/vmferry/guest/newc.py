"""Write newc ("070701", SVR4 without CRC) cpio archives, the format Linux unpacks as initramfs.

Pure: entries in, bytes out. Each member is a 110-byte ASCII header (magic plus thirteen
8-digit hex fields), the NUL-terminated name padded so header+name is a multiple of 4, then
the data padded to a multiple of 4. A ``TRAILER!!!`` member ends the archive.

Example:
    >>> data = build_archive([Directory("bin"), RegularFile("bin/hello", b"hi\\n", 0o755)])
    >>> data[:6]
    b'070701'
"""

from __future__ import annotations

import stat
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from vmferry.core.errors import FerryError

__all__ = [
    "ArchiveError",
    "DeviceNode",
    "Directory",
    "Entry",
    "RegularFile",
    "Symlink",
    "build_archive",
]

MAGIC = b"070701"
TRAILER_NAME = "TRAILER!!!"
_FIELD_MAX = 0xFFFFFFFF


class ArchiveError(FerryError):
    """An entry cannot be put in a newc archive (bad path, duplicate, too large)."""


@dataclass(frozen=True, slots=True)
class Directory:
    """A directory; ``path`` is relative to the archive root, e.g. ``"usr/bin"``."""

    path: str
    mode: int = 0o755


@dataclass(frozen=True, slots=True)
class RegularFile:
    """A regular file with its whole content."""

    path: str
    data: bytes
    mode: int = 0o644


@dataclass(frozen=True, slots=True)
class Symlink:
    """A symbolic link to ``target`` (stored verbatim, relative or absolute)."""

    path: str
    target: str


@dataclass(frozen=True, slots=True)
class DeviceNode:
    """A character (``"c"``) or block (``"b"``) device node."""

    path: str
    kind: Literal["c", "b"]
    major: int
    minor: int
    mode: int = 0o600


Entry = Directory | RegularFile | Symlink | DeviceNode


def _normalise(path: str) -> str:
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if not parts:
        raise ArchiveError(f"empty archive path {path!r}")
    if ".." in parts:
        raise ArchiveError(f"archive path {path!r} contains '..'")
    if any("\0" in part for part in parts):
        raise ArchiveError(f"archive path {path!r} contains a NUL byte")
    return "/".join(parts)


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


def _member(
    name: str,
    *,
    ino: int,
    mode: int,
    nlink: int,
    data: bytes = b"",
    rdev: tuple[int, int] = (0, 0),
    mtime: int = 0,
) -> bytes:
    encoded = name.encode() + b"\0"
    fields = (
        ino,
        mode,
        0,  # uid: root
        0,  # gid: root
        nlink,
        mtime,
        len(data),
        0,  # devmajor
        0,  # devminor
        rdev[0],
        rdev[1],
        len(encoded),
        0,  # check: unused by newc
    )
    for value in fields:
        if not 0 <= value <= _FIELD_MAX:
            raise ArchiveError(f"{name!r}: header field {value} does not fit in 32 bits")
    header = MAGIC + b"".join(b"%08X" % value for value in fields)
    head = header + encoded
    return head + _pad4(len(head)) + data + _pad4(len(data))


def _perm(path: str, mode: int) -> int:
    if not 0 <= mode <= 0o7777:
        raise ArchiveError(f"{path!r}: mode {mode:#o} has bits beyond 0o7777")
    return mode


def build_archive(entries: Iterable[Entry], *, mtime: int = 0) -> bytes:
    """Encode entries as a complete newc archive, trailer included.

    Parent directories not listed before their contents are added (mode 0755), so the kernel
    never meets a file whose directory does not exist yet. Owners are root; ``mtime`` is fixed
    (default 0) so the same entries always give the same bytes.

    Args:
        entries: members in order.
        mtime: modification time (seconds since the epoch) stamped on every member.

    Returns:
        The archive, uncompressed.

    Raises:
        ArchiveError: a path is empty, has ``..`` or a NUL, appears twice, or a field overflows.
    """
    out: list[bytes] = []
    seen: set[str] = set()
    ino = 0

    def add(
        name: str, mode: int, nlink: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        nonlocal ino
        ino += 1
        seen.add(name)
        out.append(
            _member(name, ino=ino, mode=mode, nlink=nlink, data=data, rdev=rdev, mtime=mtime)
        )

    for entry in entries:
        path = _normalise(entry.path)
        if path in seen:
            raise ArchiveError(f"{path!r} appears twice in the archive")
        parts = path.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            if parent not in seen:
                add(parent, stat.S_IFDIR | 0o755, 2)
        match entry:
            case Directory(mode=mode):
                add(path, stat.S_IFDIR | _perm(path, mode), 2)
            case RegularFile(data=data, mode=mode):
                add(path, stat.S_IFREG | _perm(path, mode), 1, data)
            case Symlink(target=target):
                if not target:
                    raise ArchiveError(f"symlink {path!r} has an empty target")
                add(path, stat.S_IFLNK | 0o777, 1, target.encode())
            case DeviceNode(kind=kind, major=major, minor=minor, mode=mode):
                kind_bits = stat.S_IFCHR if kind == "c" else stat.S_IFBLK
                add(path, kind_bits | _perm(path, mode), 1, rdev=(major, minor))
    out.append(_member(TRAILER_NAME, ino=0, mode=0, nlink=1))
    return b"".join(out)
