"""First touches of never-allocated guest RAM: who pays them, what they cost, and the matrix's
4 GiB moves they explain (runs A-D of 30 Nov, held-out cells h06 and h07)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmferry.agent.api import GuestMeasurement
from vmferry.agent.preflight import _resident_bytes
from vmferry.core.calibration import Calibration
from vmferry.core.errors import ConfigError
from vmferry.core.measurement import Measurement
from vmferry.core.model import MECHANISMS
from vmferry.core.move_cost import qemu_downtime_limit_ms
from vmferry.core.predict import predict
from vmferry.core.predict_touch import (
    destination_share,
    first_touch_s,
    source_holes_bytes,
    touch_ms_per_gib,
)

MIB = 1 << 20
GIB = 1 << 30
CAL = Calibration.default()
NO_TOUCH = dataclasses.replace(CAL, touch_ms_per_gib2=0.0)
LINK_200M_BPS = 25_000_000


def lab_guest(ram: int, nonzero: int, *, resident: int | None) -> Measurement:
    """A lab guest writing zeros over its working set (the matrix's zero pattern: the profile
    sees no content change, so no dirty rate), on a 200 Mbit/s link."""
    return Measurement(
        ram_bytes=ram,
        zero_fraction=1.0 - nonzero / ram,
        compress_ratio=3.0,
        dirty_rate_bps=0,
        bandwidth_bps=LINK_200M_BPS,
        dirty_set_bytes=190 * MIB,
        hot_bytes=340 << 10,
        resident_bytes=resident,
    )


H07_NONZERO = 157_300_000  # h07-lab-4G-200M-paced-0.25x-zero: post-copy's predicted bytes
H06_NONZERO = 116_400_000  # h06-lab-2G-200M-paced-0.25x-zero


@pytest.mark.parametrize(
    ("ram", "nonzero", "strategy", "fresh_source", "actual_s"),
    [
        # (lowest, highest) total of runs A-D. The first move of a cell leaves a freshly
        # booted guest: holes on both hosts.
        (4 * GIB, H07_NONZERO, "precopy", True, (17.06, 19.30)),
        (2 * GIB, H06_NONZERO, "precopy", True, (7.38, 8.16)),
        # `auto` (5th move) chose pre-copy from a source allocated by hybrid's destination.
        (4 * GIB, H07_NONZERO, "precopy", False, (12.42, 12.73)),
        (2 * GIB, H06_NONZERO, "precopy", False, (6.04, 7.71)),
        # Hybrid (4th) from post-copy's destination, which placed every page.
        (4 * GIB, H07_NONZERO, "hybrid", False, (12.26, 13.65)),
        # Multifd (2nd) from pre-copy's destination: neither side touches a hole.
        (4 * GIB, H07_NONZERO, "multifd", False, (2.44, 2.94)),
        # Post-copy (3rd) from multifd's destination, which it left sparse.
        (4 * GIB, H07_NONZERO, "postcopy", True, (13.96, 15.38)),
        (2 * GIB, H06_NONZERO, "postcopy", True, (6.76, 6.92)),
    ],
)
def test_reproduces_the_matrix_big_guests(
    ram: int, nonzero: int, strategy: str, fresh_source: bool, actual_s: tuple[float, float]
) -> None:
    m = lab_guest(ram, nonzero, resident=nonzero if fresh_source else ram)
    p = predict(strategy, m, downtime_limit_ms=qemu_downtime_limit_ms(100), cal=CAL)
    assert p.total_ms is not None
    low, high = actual_s
    assert 0.85 * low <= p.total_ms / 1000 <= 1.15 * high


def test_without_first_touches_the_4_gib_precopy_was_predicted_at_half_its_time() -> None:
    m = lab_guest(4 * GIB, H07_NONZERO, resident=H07_NONZERO)
    p = predict("precopy", m, downtime_limit_ms=70, cal=NO_TOUCH)
    assert p.total_ms is not None
    assert p.total_ms < 0.6 * 17_060


@pytest.mark.parametrize(
    ("strategy", "share"),
    [
        ("precopy", 1.0),
        ("xbzrle", 1.0),
        ("auto-converge", 1.0),
        ("hybrid", 1.0),
        ("cold", 1.0),
        ("postcopy", CAL.postcopy_touch_share),
        ("multifd", 0.0),
    ],
)
def test_destination_share_per_strategy(strategy: str, share: float) -> None:
    assert destination_share(next(s for s in MECHANISMS if s == strategy), CAL) == share


@pytest.mark.parametrize(
    ("resident", "holes"),
    [
        (None, 0.0),  # not measured: taken as allocated
        (4 * GIB, 0.0),
        (5 * GIB, 0.0),  # more than RAM (a hugepage's rounding): no holes either
        (GIB, 3 * GIB),
        (0, 3.5 * GIB),  # never more than the zero pages (the rest holds data)
    ],
)
def test_source_holes(resident: int | None, holes: float) -> None:
    m = dataclasses.replace(lab_guest(4 * GIB, GIB // 2, resident=None), resident_bytes=resident)
    assert source_holes_bytes(m) == pytest.approx(holes)


def test_cost_per_gib_grows_with_the_guest() -> None:
    assert touch_ms_per_gib(2 * GIB, CAL) == pytest.approx(2 * touch_ms_per_gib(GIB, CAL))
    small = lab_guest(GIB, 100 * MIB, resident=100 * MIB)
    big = lab_guest(4 * GIB, 400 * MIB, resident=400 * MIB)
    # Four times the holes, each GiB four times dearer.
    assert first_touch_s(big, CAL, 1.0) == pytest.approx(16 * first_touch_s(small, CAL, 1.0))


def test_a_touch_is_paid_once_beside_the_link_and_not_time_scaled() -> None:
    fresh = lab_guest(4 * GIB, H07_NONZERO, resident=H07_NONZERO)
    allocated = dataclasses.replace(fresh, resident_bytes=4 * GIB)
    slow = dataclasses.replace(CAL, time_scale=2.0)
    for cal in (CAL, slow):
        source_ms = first_touch_s(fresh, cal, 0.0) * 1000
        for strategy in ("precopy", "multifd", "postcopy", "hybrid", "cold"):
            a = predict(strategy, fresh, downtime_limit_ms=70, cal=cal).total_ms
            b = predict(strategy, allocated, downtime_limit_ms=70, cal=cal).total_ms
            assert a is not None
            assert b is not None
            assert a - b == pytest.approx(source_ms, abs=2), strategy


def test_cold_pays_the_touches_in_its_downtime() -> None:
    m = lab_guest(4 * GIB, H07_NONZERO, resident=4 * GIB)
    with_touch = predict("cold", m, downtime_limit_ms=70, cal=CAL).downtime_ms
    without = predict("cold", m, downtime_limit_ms=70, cal=NO_TOUCH).downtime_ms
    assert with_touch is not None
    assert without is not None
    assert with_touch - without == pytest.approx(first_touch_s(m, CAL, 1.0) * 1000, abs=2)


@settings(max_examples=60, deadline=None)
@given(
    ram_mib=st.integers(min_value=128, max_value=8192),
    nonzero_share=st.floats(min_value=0.01, max_value=1.0),
    resident_share=st.floats(min_value=0.0, max_value=1.0),
    rate=st.integers(min_value=0, max_value=20_000_000),
    strategy=st.sampled_from(MECHANISMS),
)
def test_more_allocated_never_predicts_longer(
    ram_mib: int, nonzero_share: float, resident_share: float, rate: int, strategy: str
) -> None:
    ram = ram_mib * MIB
    m = Measurement(
        ram_bytes=ram,
        zero_fraction=1.0 - nonzero_share,
        compress_ratio=2.0,
        dirty_rate_bps=rate,
        bandwidth_bps=LINK_200M_BPS,
        dirty_set_bytes=ram // 8,
        resident_bytes=round(ram * resident_share),
    )
    allocated = dataclasses.replace(m, resident_bytes=ram)
    sparse = predict(strategy, m, downtime_limit_ms=200, cal=CAL)
    dense = predict(strategy, allocated, downtime_limit_ms=200, cal=CAL)
    assert first_touch_s(m, CAL, 1.0) >= first_touch_s(allocated, CAL, 1.0) >= 0.0
    if sparse.converges:
        assert dense.converges
        assert sparse.total_ms is not None
        assert dense.total_ms is not None
        assert dense.total_ms <= sparse.total_ms


def test_invalid_constants_and_measurements_are_refused() -> None:
    with pytest.raises(ConfigError):
        dataclasses.replace(CAL, touch_ms_per_gib2=-1.0)
    with pytest.raises(ConfigError):
        dataclasses.replace(CAL, postcopy_touch_share=1.5)
    with pytest.raises(ConfigError):
        lab_guest(GIB, 100 * MIB, resident=-1)


# -- the agent measures residency: the memfd's blocks ---------------------------------------------


def test_the_agent_reads_what_the_memfd_has_allocated(tmp_path: Path) -> None:
    fd = os.memfd_create("guest-ram")
    try:
        os.ftruncate(fd, 8 * MIB)
        os.pwrite(fd, b"\1" * MIB, 2 * MIB)  # the guest wrote 1 MiB; the rest is holes
        assert _resident_bytes(Path(f"/proc/self/fd/{fd}")) == MIB
    finally:
        os.close(fd)
    assert _resident_bytes(None) is None
    assert _resident_bytes(tmp_path / "gone") is None


@pytest.mark.parametrize("resident", [None, 0, 3 * GIB])
def test_residency_survives_the_agent_api(resident: int | None) -> None:
    m = GuestMeasurement(
        ram_bytes=4 * GIB,
        dirty_rate_bps=0,
        zero_fraction=0.9,
        compress_ratio=2.0,
        vcpu_busy=None,
        elapsed_ms=900,
        resident_bytes=resident,
    )
    assert GuestMeasurement.from_json(m.to_json()) == m
    old_agent = {k: v for k, v in m.to_json().items() if k != "resident_bytes"}
    assert GuestMeasurement.from_json(old_agent).resident_bytes is None
