"""Digests of guest RAM (a real memfd) and of disk images (real qemu-img), as the agent makes them.

No VM is booted: a memfd named as QEMU names it stands for QEMU's guest RAM (found through this
process's ``/proc/<pid>/fd`` as the agent finds QEMU's), and images are made with ``qemu-img`` and
``qemu-io``. Every digest is checked against xxh3_128 of the bytes, computed here independently.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import xxhash

from vmferry.agent.digest import (
    QEMU_MEMFD_NAME,
    DigestError,
    DigestTimeout,
    GuestRamNotFound,
    ImageNotReadable,
    digest_image,
    digest_ram,
    find_ram_fd,
)
from vmferry.core.handoff import ChunkPlan, DigestKind, VerifyMode, compare, plan_chunks
from vmferry.qemu.image_map import ImageMapError, map_image

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
TIMEOUT_S = 60.0


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = os.memfd_create(QEMU_MEMFD_NAME, os.MFD_CLOEXEC)
    os.ftruncate(fd, 64 * MIB)
    yield fd
    os.close(fd)


def fill(fd: int, writes: dict[int, bytes]) -> None:
    for offset, data in writes.items():
        os.pwrite(fd, data, offset)


WRITES = {0: b"\x01" * 4096, 5 * MIB + 12: os.urandom(3 * MIB), 63 * MIB: bytes(MIB)}


def expected(read: Path, plan: ChunkPlan) -> tuple[bytes, ...]:
    """xxh3_128 of each planned chunk's bytes, read plainly."""
    with read.open("rb") as f:
        out = []
        for index in plan.indexes:
            chunk = plan.chunk_range(index)
            f.seek(chunk.start_bytes)
            out.append(xxhash.xxh3_128_digest(f.read(chunk.length_bytes)))
        return tuple(out)


def test_find_ram_fd_picks_the_memfd_of_the_vms_size(memfd: int) -> None:
    other = os.memfd_create(QEMU_MEMFD_NAME, os.MFD_CLOEXEC)  # e.g. a second backend
    try:
        os.ftruncate(other, 2 * MIB)
        path = find_ram_fd(os.getpid(), 64 * MIB)
        assert path.name == str(memfd)
        assert os.readlink(path) == f"/memfd:{QEMU_MEMFD_NAME} (deleted)"
        assert find_ram_fd(os.getpid(), 2 * MIB).name == str(other)
        with pytest.raises(GuestRamNotFound, match=r"memfds open: .* of 2097152 bytes"):
            find_ram_fd(os.getpid(), GIB)
        os.ftruncate(other, 64 * MIB)
        with pytest.raises(GuestRamNotFound, match="2 memfds of 67108864 bytes"):
            find_ram_fd(os.getpid(), 64 * MIB)
    finally:
        os.close(other)
    with pytest.raises(GuestRamNotFound, match="no such process"):
        find_ram_fd(2**22 + 1, 64 * MIB)


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", [VerifyMode.FULL, VerifyMode.SAMPLE])
async def test_ram_digest_is_the_hash_of_the_bytes_and_allocates_nothing(
    memfd: int, mode: VerifyMode
) -> None:
    fill(memfd, WRITES)
    allocated = os.fstat(memfd).st_blocks
    path = find_ram_fd(os.getpid(), 64 * MIB)
    plan = plan_chunks(
        mode, 64 * MIB, seed=11, chunk_bytes=MIB if mode is VerifyMode.FULL else None
    )
    digests = await digest_ram(path, plan, timeout_s=TIMEOUT_S)
    assert digests.kind is DigestKind.RAM
    assert digests.values == expected(path, plan)
    assert os.fstat(memfd).st_blocks == allocated  # holes stay holes


@pytest.mark.asyncio
async def test_ram_written_zeros_equal_holes_and_one_flipped_byte_is_found(memfd: int) -> None:
    fill(memfd, WRITES)
    other = os.memfd_create(QEMU_MEMFD_NAME, os.MFD_CLOEXEC)
    try:
        os.ftruncate(other, 64 * MIB)
        fill(other, {**WRITES, 40 * MIB: bytes(8 * MIB)})  # zeros written where memfd has a hole
        plan = plan_chunks(VerifyMode.FULL, 64 * MIB, 0, chunk_bytes=MIB)
        here = Path(f"/proc/self/fd/{memfd}")
        there = Path(f"/proc/self/fd/{other}")
        assert compare(
            await digest_ram(here, plan, timeout_s=TIMEOUT_S),
            await digest_ram(there, plan, timeout_s=TIMEOUT_S),
        ).is_equal
        os.pwrite(other, b"\xff", 6 * MIB + 4095)
        result = compare(
            await digest_ram(here, plan, timeout_s=TIMEOUT_S, workers=1),
            await digest_ram(there, plan, timeout_s=TIMEOUT_S, workers=3),
        )
        assert result.differing == (6,)
    finally:
        os.close(other)


@pytest.mark.asyncio
async def test_ram_digest_refuses_a_wrong_size_and_keeps_its_deadline(memfd: int) -> None:
    path = find_ram_fd(os.getpid(), 64 * MIB)
    with pytest.raises(DigestError, match="the plan"):
        await digest_ram(path, plan_chunks(VerifyMode.FULL, GIB, 0), timeout_s=TIMEOUT_S)
    fill(memfd, {0: os.urandom(64 * MIB)})
    with pytest.raises(DigestTimeout):
        await digest_ram(path, plan_chunks(VerifyMode.FULL, 64 * MIB, 0), timeout_s=0)
    with pytest.raises(DigestError, match="cannot open"):
        await digest_ram(Path("/nonexistent"), plan_chunks(VerifyMode.FULL, MIB, 0), timeout_s=1)


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def qemu_io(image: Path, fmt: str, *commands: str) -> None:
    argv = ["qemu-io", "-f", fmt]
    for command in commands:
        argv += ["-c", command]
    subprocess.run([*argv, str(image)], check=True, capture_output=True)


def sparse_raw(path: Path, size: int, writes: dict[int, bytes]) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
        for offset, data in writes.items():
            f.seek(offset)
            f.write(data)
    return path


DISK_WRITES = {
    0: os.urandom(64 * KIB),
    300 * MIB + 5: os.urandom(5 * MIB),
    700 * MIB: bytes(2 * MIB),  # written zeros: data in the raw file, zero in the qcow2
    GIB - 4 * KIB: os.urandom(4 * KIB),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", [VerifyMode.FULL, VerifyMode.SAMPLE])
async def test_a_sparse_gib_reads_alike_as_raw_and_as_qcow2(
    tmp_path: Path, mode: VerifyMode
) -> None:
    raw = sparse_raw(tmp_path / "disk.raw", GIB, DISK_WRITES)
    qcow2 = tmp_path / "disk.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2))
    plan = plan_chunks(mode, GIB, seed=3)
    from_raw = await digest_image(raw, plan, fmt="raw", timeout_s=TIMEOUT_S)
    from_qcow2 = await digest_image(qcow2, plan, timeout_s=TIMEOUT_S)  # format probed
    assert from_raw.kind is DigestKind.DISK
    assert compare(from_raw, from_qcow2).is_equal
    assert from_raw.values == expected(raw, plan)


@pytest.mark.asyncio
async def test_one_flipped_byte_is_found_in_its_chunk(tmp_path: Path) -> None:
    raw = sparse_raw(tmp_path / "a.raw", 256 * MIB, {0: os.urandom(MIB), 200 * MIB: bytes(10)})
    qcow2 = tmp_path / "a.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2))
    flipped = 200 * MIB + 3  # among the written zeros at 200 MiB
    qemu_io(qcow2, "qcow2", f"write -P 0x5a {flipped} 1")
    plan = plan_chunks(VerifyMode.FULL, 256 * MIB, 0)
    result = compare(
        await digest_image(raw, plan, fmt="raw", timeout_s=TIMEOUT_S),
        await digest_image(qcow2, plan, fmt="qcow2", timeout_s=TIMEOUT_S),
    )
    assert result.differing == (flipped // plan.chunk_bytes,)
    assert result.differing_ranges[0].start_bytes <= flipped < result.differing_ranges[0].end_bytes


@pytest.mark.asyncio
async def test_a_backing_chain_reads_like_its_flattened_copy(tmp_path: Path) -> None:
    base, top, flat = tmp_path / "base.qcow2", tmp_path / "top.qcow2", tmp_path / "flat.raw"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "64M")
    qemu_io(base, "qcow2", "write -P 0x11 0 3M", "write -P 0x12 40M 1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", str(top))
    qemu_io(top, "qcow2", "write -P 0x22 1M 512k", "write -z 40M 64k")
    qemu_img("convert", "-O", "raw", str(top), str(flat))
    image = await map_image(top, timeout_s=TIMEOUT_S)
    assert {e.depth for e in image.extents if e.data} == {0, 1}
    assert [layer.format for layer in image.layers] == ["qcow2", "qcow2"]
    plan = plan_chunks(VerifyMode.FULL, 64 * MIB, 0, chunk_bytes=MIB)
    chained = await digest_image(top, plan, fmt="qcow2", timeout_s=TIMEOUT_S)
    assert chained.values == expected(flat, plan)


@pytest.mark.asyncio
async def test_what_cannot_be_read_by_offset_is_refused(tmp_path: Path) -> None:
    raw = sparse_raw(tmp_path / "c.raw", 16 * MIB, {0: b"vmferry " * 4096})
    compressed = tmp_path / "c.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", str(raw), str(compressed))
    plan = plan_chunks(VerifyMode.FULL, 16 * MIB, 0)
    with pytest.raises(ImageNotReadable, match="compressed"):
        await digest_image(compressed, plan, timeout_s=TIMEOUT_S)
    vmdk = tmp_path / "c.vmdk"
    qemu_img("convert", "-f", "raw", "-O", "vmdk", str(raw), str(vmdk))
    with pytest.raises(ImageNotReadable, match="format vmdk"):
        await digest_image(vmdk, plan, timeout_s=TIMEOUT_S)
    with pytest.raises(ImageMapError, match="failed"):
        await digest_image(tmp_path / "missing.qcow2", plan, timeout_s=TIMEOUT_S)
    with pytest.raises(ImageMapError, match="failed"):
        await digest_image(raw, plan, fmt="qcow2", timeout_s=TIMEOUT_S)  # not a qcow2
    with pytest.raises(DigestError, match="the plan"):
        await digest_image(raw, plan_chunks(VerifyMode.FULL, GIB, 0), timeout_s=TIMEOUT_S)
