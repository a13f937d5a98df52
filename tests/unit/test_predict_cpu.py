"""Multifd's CPU: zstd on the cores the guest's vCPUs leave, and the switchover's longer flush."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmferry.core.calibration import Calibration
from vmferry.core.errors import ConfigError
from vmferry.core.measurement import Measurement
from vmferry.core.predict import predict
from vmferry.core.predict_cpu import CALIBRATED_CHANNELS, multifd_cpu

MIB = 1 << 20
CAL = Calibration.default()
PER_CHANNEL_BPS = CAL.multifd_compress_bps / CALIBRATED_CHANNELS
UNSHAPED_BPS = 450_000_000
LINK_200M_BPS = 25_000_000


def guest(*, busy: float | None, cpus: int | None = 2, link_bps: int = UNSHAPED_BPS) -> Measurement:
    return Measurement(
        ram_bytes=256 * MIB,
        zero_fraction=0.5,
        compress_ratio=3.0,
        dirty_rate_bps=0,
        bandwidth_bps=link_bps,
        host_cpus=cpus,
        guest_busy_cores=busy,
    )


@pytest.mark.parametrize(
    ("busy", "cpus", "link_bps", "cores", "contention"),
    [
        # Unknown host or guest: the calibrated rate, no contention (as before).
        (None, 2, UNSHAPED_BPS, 2.0, 1.0),
        (1.0, None, UNSHAPED_BPS, 2.0, 1.0),
        # An idle guest leaves both cores to the two channels.
        (0.0, 2, UNSHAPED_BPS, 2.0, 1.0),
        # Two busy vCPUs and two channels share 2 cores fairly: a core for the channels.
        (2.0, 2, UNSHAPED_BPS, 1.0, 2.0),
        # One busy vCPU: 2 x 2 / 3 cores; the channels want both (the link takes it all).
        (1.0, 2, UNSHAPED_BPS, 4 / 3, 1.5),
        # A 200 Mbit/s link takes 75 MB/s of compressed pages: the channels want ~0.19 core.
        (1.0, 2, LINK_200M_BPS, 4 / 3, 1.0),
        # A big host has room for all of it.
        (4.0, 16, UNSHAPED_BPS, 2.0, 1.0),
    ],
)
def test_cores_and_contention(
    busy: float | None, cpus: int | None, link_bps: int, cores: float, contention: float
) -> None:
    cpu = multifd_cpu(guest(busy=busy, cpus=cpus, link_bps=link_bps), CAL)
    assert cpu.compress_cores == pytest.approx(cores)
    assert cpu.compress_bps == pytest.approx(PER_CHANNEL_BPS * cores)
    assert cpu.contention == pytest.approx(contention)


@given(
    busy=st.floats(min_value=0.0, max_value=64.0),
    cpus=st.integers(min_value=1, max_value=64),
    channels=st.integers(min_value=1, max_value=8),
    link_bps=st.integers(min_value=1_000_000, max_value=2_000_000_000),
)
def test_channels_never_get_more_than_a_core_each_or_than_the_host(
    busy: float, cpus: int, channels: int, link_bps: int
) -> None:
    cpu = multifd_cpu(guest(busy=busy, cpus=cpus, link_bps=link_bps), CAL, channels)
    assert 0.0 < cpu.compress_cores <= min(channels, cpus) + 1e-9
    assert cpu.contention >= 1.0
    # A busier guest never leaves zstd more cores.
    busier = multifd_cpu(guest(busy=busy + 1.0, cpus=cpus, link_bps=link_bps), CAL, channels)
    assert busier.compress_cores <= cpu.compress_cores + 1e-9
    assert busier.contention >= cpu.contention - 1e-9


def test_a_starved_multifd_move_is_predicted_slower_and_felt_longer() -> None:
    idle = predict("multifd", guest(busy=0.0), downtime_limit_ms=300, cal=CAL)
    busy = predict("multifd", guest(busy=2.0), downtime_limit_ms=300, cal=CAL)
    unknown = predict("multifd", guest(busy=None), downtime_limit_ms=300, cal=CAL)
    assert idle.total_ms == unknown.total_ms
    assert idle.guest_downtime_ms == unknown.guest_downtime_ms
    assert busy.total_ms is not None
    assert idle.total_ms is not None
    assert busy.total_ms > idle.total_ms
    assert busy.guest_downtime_ms is not None
    assert idle.guest_downtime_ms is not None
    # The flush doubles at a contention of 2: what the guest feels grows by one flush.
    assert busy.guest_downtime_ms - idle.guest_downtime_ms == pytest.approx(
        CAL.multifd_flush_ms, abs=1
    )
    assert "zstd gets 1.0 cores" in busy.note


def test_pre_copy_does_not_change_with_the_cpu_figures() -> None:
    plain = predict("precopy", guest(busy=None), downtime_limit_ms=300, cal=CAL)
    busy = predict("precopy", guest(busy=2.0), downtime_limit_ms=300, cal=CAL)
    assert dataclasses.replace(busy, note=plain.note) == plain


@pytest.mark.parametrize(("cpus", "busy"), [(0, 1.0), (2, -0.5), (2, float("nan"))])
def test_bad_cpu_figures_are_refused(cpus: int, busy: float) -> None:
    with pytest.raises(ConfigError):
        guest(busy=busy, cpus=cpus)
