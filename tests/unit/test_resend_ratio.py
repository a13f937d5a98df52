"""The pages a guest changes may compress unlike the rest of its RAM: the scan measures them,
multifd's later rounds are predicted with them (vmferry.qemu.ram_scan, vmferry.core.predict)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmferry.core.calibration import Calibration
from vmferry.core.errors import ConfigError
from vmferry.core.measurement import Measurement
from vmferry.core.predict import predict
from vmferry.qemu import ram_scan
from vmferry.qemu.measure import spread_chunks

_PAGE = 4096


def _writer(dirty_ratio: float | None) -> Measurement:
    # A 256 MiB guest whose kernel and program pages compress 3x, writing random pages at the
    # rate of its 50 Mbit/s link.
    return Measurement(
        ram_bytes=256 << 20, zero_fraction=0.5, compress_ratio=3.0,
        dirty_compress_ratio=dirty_ratio, dirty_rate_bps=6_250_000, bandwidth_bps=6_250_000,
        dirty_set_bytes=47 << 20,
    )  # fmt: skip


def test_multifd_cannot_outrun_a_writer_of_pages_that_do_not_compress() -> None:
    cal = Calibration.default()
    assumed = predict("multifd", _writer(None), downtime_limit_ms=40, cal=cal)
    measured = predict("multifd", _writer(1.0), downtime_limit_ms=40, cal=cal)
    assert assumed.converges  # 3x the link against a writer at 1x
    assert not measured.converges
    assert "rewrites x1.0" in measured.note


def test_a_ratio_under_one_is_refused() -> None:
    with pytest.raises(ConfigError, match="dirty_compress_ratio"):
        _writer(0.5)


def test_the_scan_keeps_the_pages_that_changed(tmp_path: Path) -> None:
    ram = tmp_path / "ram"
    pages = 256
    ram.write_bytes(bytes(pages * _PAGE))
    offsets = spread_chunks(0, pages * _PAGE, 4, 64 * _PAGE)  # the scan's chunks
    fd = os.open(ram, os.O_RDWR)
    try:
        first, _, none = ram_scan._pass(fd, offsets)
        for index in range(0, pages, 8):  # 32 pages rewritten with random bytes
            os.pwrite(fd, os.urandom(_PAGE), index * _PAGE)
        _, _, changed = ram_scan._pass(fd, offsets, first)
    finally:
        os.close(fd)
    assert none == []
    assert len(changed) == 32
    ratio = ram_scan._ratio(changed)
    assert ratio is not None
    assert ratio < 1.05  # random pages: nothing to gain
    assert ram_scan._ratio(changed[:4]) is None  # too few to tell
    assert (ram_scan._ratio([bytes(_PAGE)] * 32) or 0) > 50  # zero pages compress away
