"""Sampling guest RAM through its memfd: counts and compressibility of a known file."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmferry.core.errors import ConfigError
from vmferry.qemu.measure import MeasurementError, sample_ram_file

pytestmark = pytest.mark.asyncio

MIB = 1 << 20


@pytest.fixture
def ram(tmp_path: Path) -> Iterator[Path]:
    """A RAM-like 64 MiB memfd: 16 MiB of random bytes spread over four stripes, the rest
    never written (sparse zeros). Closed afterwards: other tests look for QEMU's memfds."""
    fd = os.memfd_create("vmferry-test-ram")
    try:
        os.ftruncate(fd, 64 * MIB)
        for index in range(4):
            os.pwrite(fd, os.urandom(4 * MIB), index * 16 * MIB)
        link = tmp_path / "ram"
        link.symlink_to(f"/proc/{os.getpid()}/fd/{fd}")
        yield link
    finally:
        os.close(fd)


async def test_zero_share_and_ratio_of_a_known_memfd(ram: Path) -> None:
    sample = await sample_ram_file(ram, ram_bytes=64 * MIB, chunks=256, chunk_bytes=16 << 10)
    assert sample.pages_sampled == 256 * 4
    assert sample.zero_fraction == pytest.approx(0.75, abs=0.05)
    assert sample.compress_ratio == pytest.approx(1.0, abs=0.02)  # random bytes


async def test_bad_geometry_and_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        await sample_ram_file(tmp_path / "x", ram_bytes=MIB, chunks=4, chunk_bytes=1000)
    with pytest.raises(MeasurementError):
        await sample_ram_file(tmp_path / "missing", ram_bytes=MIB, chunks=4, chunk_bytes=4096)
