"""Sampling guest RAM through its memfd: counts and compressibility of a known file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmferry.core.errors import ConfigError
from vmferry.qemu.measure import MeasurementError, sample_ram_file

pytestmark = pytest.mark.asyncio

MIB = 1 << 20


def _memfd(tmp_path: Path, random_mib: int, total_mib: int) -> Path:
    """A RAM-like memfd: ``random_mib`` of random bytes at the start of every 4 MiB stripe
    share, the rest never written (sparse zeros)."""
    fd = os.memfd_create("memory-backend-memfd")
    os.ftruncate(fd, total_mib * MIB)
    stripe = total_mib // 4
    for index in range(4):
        os.pwrite(fd, os.urandom(random_mib * MIB // 4), index * stripe * MIB)
    link = tmp_path / "ram"
    link.symlink_to(f"/proc/{os.getpid()}/fd/{fd}")
    return link


async def test_zero_share_and_ratio_of_a_known_memfd(tmp_path: Path) -> None:
    ram = _memfd(tmp_path, random_mib=16, total_mib=64)  # a quarter random, the rest zero
    sample = await sample_ram_file(ram, ram_bytes=64 * MIB, chunks=256, chunk_bytes=16 << 10)
    assert sample.pages_sampled == 256 * 4
    assert sample.zero_fraction == pytest.approx(0.75, abs=0.05)
    assert sample.compress_ratio == pytest.approx(1.0, abs=0.02)  # random bytes


async def test_bad_geometry_and_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        await sample_ram_file(tmp_path / "x", ram_bytes=MIB, chunks=4, chunk_bytes=1000)
    with pytest.raises(MeasurementError):
        await sample_ram_file(tmp_path / "missing", ram_bytes=MIB, chunks=4, chunk_bytes=4096)
