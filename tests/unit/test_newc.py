"""newc archives: exact header layout, 4-byte padding, and a parse-back of arbitrary trees."""

from __future__ import annotations

import shutil
import stat
import subprocess
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmferry.guest.newc import (
    ArchiveError,
    DeviceNode,
    Directory,
    Entry,
    RegularFile,
    Symlink,
    build_archive,
)


@dataclass(frozen=True)
class Member:
    name: str
    ino: int
    mode: int
    nlink: int
    rdev: tuple[int, int]
    data: bytes


def read_newc(archive: bytes) -> list[Member]:
    """An independent reader: strict about magic, alignment and the trailer."""
    members: list[Member] = []
    offset = 0
    while True:
        assert offset % 4 == 0
        header = archive[offset : offset + 110]
        assert header[:6] == b"070701", f"bad magic at {offset}"
        fields = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        ino, mode, _uid, _gid, nlink, _mtime, size, _, _, rmaj, rmin, namesize, check = fields
        assert check == 0
        name_end = offset + 110 + namesize
        raw_name = archive[offset + 110 : name_end]
        assert raw_name.endswith(b"\0")
        assert b"\0" not in raw_name[:-1]
        data_start = name_end + (-name_end % 4)
        assert archive[name_end:data_start] == b"\0" * (data_start - name_end)
        data_end = data_start + size
        next_offset = data_end + (-data_end % 4)
        assert archive[data_end:next_offset] == b"\0" * (next_offset - data_end)
        name = raw_name[:-1].decode()
        offset = next_offset
        if name == "TRAILER!!!":
            assert offset == len(archive)
            return members
        members.append(Member(name, ino, mode, nlink, (rmaj, rmin), archive[data_start:data_end]))


def test_empty_archive_is_just_a_trailer() -> None:
    archive = build_archive([])
    assert read_newc(archive) == []
    assert archive.startswith(b"070701")
    assert len(archive) % 4 == 0


@pytest.mark.parametrize("name_len", range(1, 9))
@pytest.mark.parametrize("data_len", range(9))
def test_padding_for_every_name_and_data_length(name_len: int, data_len: int) -> None:
    name = "f" * name_len
    data = bytes(range(data_len))
    members = read_newc(build_archive([RegularFile(name, data, 0o640)]))
    assert [(m.name, m.data, m.mode) for m in members] == [(name, data, stat.S_IFREG | 0o640)]


@pytest.mark.parametrize(
    ("entry", "mode", "data", "rdev"),
    [
        (Directory("etc", 0o700), stat.S_IFDIR | 0o700, b"", (0, 0)),
        (RegularFile("init", b"#!/bin/sh\n", 0o755), stat.S_IFREG | 0o755, b"#!/bin/sh\n", (0, 0)),
        (Symlink("sh", "busybox"), stat.S_IFLNK | 0o777, b"busybox", (0, 0)),
        (DeviceNode("console", "c", 5, 1), stat.S_IFCHR | 0o600, b"", (5, 1)),
        (DeviceNode("sda", "b", 8, 0, 0o660), stat.S_IFBLK | 0o660, b"", (8, 0)),
    ],
)
def test_each_entry_kind(entry: Entry, mode: int, data: bytes, rdev: tuple[int, int]) -> None:
    (member,) = read_newc(build_archive([entry]))
    assert (member.mode, member.data, member.rdev) == (mode, data, rdev)


def test_exact_header_bytes() -> None:
    archive = build_archive([RegularFile("a", b"xyz", 0o644)], mtime=0x1234)
    expected = (
        b"070701"
        + b"00000001"  # ino
        + b"000081A4"  # S_IFREG | 0644
        + b"00000000" * 2  # uid, gid
        + b"00000001"  # nlink
        + b"00001234"  # mtime
        + b"00000003"  # filesize
        + b"00000000" * 4  # dev and rdev
        + b"00000002"  # namesize with NUL
        + b"00000000"  # check
        + b"a\0"
        + b"xyz\0"
    )
    assert archive.startswith(expected)


def test_missing_parents_are_added_first_and_paths_normalised() -> None:
    members = read_newc(build_archive([RegularFile("/usr/share/doc/x", b"1")]))
    assert [m.name for m in members] == ["usr", "usr/share", "usr/share/doc", "usr/share/doc/x"]
    assert all(stat.S_ISDIR(m.mode) for m in members[:3])


def test_inodes_are_unique() -> None:
    members = read_newc(build_archive([Directory("a"), RegularFile("a/b", b""), Symlink("c", "a")]))
    assert len({m.ino for m in members}) == len(members)


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([RegularFile("", b"")], "empty"),
        ([RegularFile("/", b"")], "empty"),
        ([RegularFile("a/../b", b"")], ".."),
        ([RegularFile("a", b""), RegularFile("./a", b"")], "twice"),
        ([Directory("a", 0o17777)], "mode"),
        ([Symlink("a", "")], "empty target"),
        ([DeviceNode("d", "c", 1 << 32, 0)], "32 bits"),
    ],
)
def test_rejects_bad_entries(entries: list[Entry], message: str) -> None:
    with pytest.raises(ArchiveError, match=message):
        build_archive(entries)


_names = st.text(alphabet="abcxyz019_-.", min_size=1, max_size=12).filter(
    lambda s: s not in (".", "..")
)


@given(
    files=st.dictionaries(
        st.lists(_names, min_size=1, max_size=3).map("/".join),
        st.binary(max_size=300),
        max_size=12,
    )
)
def test_any_tree_parses_back(files: dict[str, bytes]) -> None:
    # A path cannot be both a file and the parent of another file.
    paths = sorted(files)
    files = {p: d for p, d in files.items() if not any(q.startswith(p + "/") for q in paths)}
    members = read_newc(build_archive([RegularFile(p, d) for p, d in files.items()]))
    parsed = {m.name: m.data for m in members if stat.S_ISREG(m.mode)}
    assert parsed == files
    seen: set[str] = set()
    for member in members:
        parent = member.name.rpartition("/")[0]
        assert not parent or parent in seen, "a parent directory must precede its contents"
        seen.add(member.name)


@pytest.mark.skipif(shutil.which("busybox") is None, reason="cross-check needs busybox cpio")
def test_busybox_cpio_lists_the_archive() -> None:
    archive = build_archive(
        [
            Directory("bin"),
            RegularFile("bin/tool", b"\x7fELF" + bytes(61), 0o755),
            Symlink("bin/sh", "tool"),
            DeviceNode("dev/console", "c", 5, 1),
        ]
    )
    listing = subprocess.run(
        ["busybox", "cpio", "-t"], input=archive, capture_output=True, check=True
    ).stdout.decode()
    assert listing.split() == ["bin", "bin/tool", "bin/sh", "dev", "dev/console"]
