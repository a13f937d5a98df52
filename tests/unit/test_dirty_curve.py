"""The short-window dirty curve (:mod:`vmferry.core.dirty_curve`)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmferry.agent.api import GuestMeasurement
from vmferry.controller.plan import dirty_set_bound
from vmferry.core.dirty_curve import fit, settled_bytes

WINDOWS_S = (0.16, 1.07, 2.5)  # the scan's: one pass, ~1 s, ~2.5 s
MIB = float(1 << 20)


def _windows(
    set_bytes: float, rate_bps: float, hot_bytes: float = 0.0
) -> tuple[tuple[float, float], ...]:
    """What a writer at ``rate_bps`` into random pages of ``set_bytes`` (plus pages rewritten
    within any window) changes over the scan's windows."""
    return tuple(
        (w, hot_bytes + set_bytes * -math.expm1(-rate_bps * w / set_bytes)) for w in WINDOWS_S
    )


def test_the_lab_writers_measured_windows_give_its_rate_and_hot_pages() -> None:
    curve = fit(short_s=0.15, short_bytes=593_920, long_s=2.2, long_bytes=3_952_640)

    assert curve.rate_bps == pytest.approx(1_638_000, rel=0.01)
    assert curve.hot_bytes == pytest.approx(340 << 10, rel=0.01)


def test_a_calm_guest_has_neither() -> None:
    curve = fit(short_s=0.1, short_bytes=0, long_s=1.0, long_bytes=0)

    assert (curve.hot_bytes, curve.rate_bps) == (0, 0)


def test_a_saturated_dirty_set_bends_the_line_but_stays_within_what_was_seen() -> None:
    # A 64 MiB set rewritten in full within both windows: no slope, all of it "hot".
    curve = fit(short_s=0.15, short_bytes=64 << 20, long_s=1.0, long_bytes=64 << 20)

    assert curve.rate_bps == 0
    assert curve.hot_bytes == 64 << 20


def test_noise_that_shrinks_the_long_window_clamps_at_zero() -> None:
    curve = fit(short_s=0.15, short_bytes=8192, long_s=1.0, long_bytes=4096)

    assert curve.rate_bps == 0
    assert curve.hot_bytes == 8192


@pytest.mark.parametrize(("short_s", "long_s"), [(0.0, 1.0), (1.0, 1.0), (2.0, 1.0)])
def test_windows_must_be_positive_and_increasing(short_s: float, long_s: float) -> None:
    with pytest.raises(ValueError, match="windows"):
        fit(short_s=short_s, short_bytes=0, long_s=long_s, long_bytes=0)


@given(
    set_mib=st.floats(min_value=8.0, max_value=4096.0),
    fill_s=st.floats(min_value=0.01, max_value=0.8),
)
def test_a_set_filled_within_the_windows_is_read_back(set_mib: float, fill_s: float) -> None:
    set_bytes = set_mib * MIB
    found = settled_bytes(_windows(set_bytes, rate_bps=set_bytes / fill_s))

    assert found == pytest.approx(set_bytes, rel=0.02)


@given(
    set_mib=st.floats(min_value=64.0, max_value=4096.0),
    rate_mbps=st.floats(min_value=0.5, max_value=20.0),  # below ~2 % of the level: settled
    hot_mib=st.floats(min_value=0.0, max_value=32.0),
)
def test_a_writer_still_far_from_filling_its_set_tells_no_set(
    set_mib: float, rate_mbps: float, hot_mib: float
) -> None:
    # A few seconds of writes cover under a fifth of the set: the count grows near linearly,
    # and hot pages (rewritten within every window) must not read as a small settled set.
    windows = _windows(set_mib * MIB, rate_mbps * 1e6, hot_mib * MIB)
    if rate_mbps * 1e6 * WINDOWS_S[-1] < 0.2 * set_mib * MIB:
        assert settled_bytes(windows) is None


def test_a_calm_or_levelled_guest_settles_on_what_changed() -> None:
    assert settled_bytes(((0.16, 0.0), (1.07, 0.0), (2.5, 0.0))) is None
    assert settled_bytes(((0.16, 3 * MIB), (1.07, 3 * MIB), (2.5, 3 * MIB))) == round(3 * MIB)
    # Measured under load: flat within 0.4 %, its slopes noise.
    flat = ((0.4799, 25_448_448.0), (1.2419, 25_481_216.0), (2.7232, 25_538_560.0))
    assert settled_bytes(flat) == 25_538_560
    # Noise: the late window saw fewer pages changed than the middle one.
    assert settled_bytes(((0.16, 2 * MIB), (1.07, 5 * MIB), (2.5, 4 * MIB))) == round(5 * MIB)


def test_settled_bytes_wants_three_increasing_windows() -> None:
    with pytest.raises(ValueError, match="three increasing"):
        settled_bytes(((0.16, 0.0), (1.07, 0.0)))
    with pytest.raises(ValueError, match="three increasing"):
        settled_bytes(((0.16, 0.0), (0.1, 0.0), (2.5, 0.0)))


@pytest.mark.parametrize(
    ("settled", "hot", "bound"),
    [
        (None, 0, 3 << 30),  # not seen settling: the non-zero part of RAM
        (47 << 20, 40 << 20, 47 << 20),  # a small set filled at once
        (47 << 20, 60 << 20, 60 << 20),  # never below the pages rewritten within any window
        (8 << 30, 0, 3 << 30),  # never beyond the non-zero part
    ],
)
def test_a_plan_bounds_the_dirty_set_by_where_it_settled(
    settled: int | None, hot: int, bound: int
) -> None:
    guest = GuestMeasurement(
        ram_bytes=4 << 30,
        dirty_rate_bps=50 << 20,
        zero_fraction=0.25,
        compress_ratio=1.0,
        vcpu_busy=1.0,
        elapsed_ms=2500,
        hot_bytes=hot,
        settled_bytes=settled,
    )

    assert dirty_set_bound(guest) == bound
    assert GuestMeasurement.from_json(guest.to_json()) == guest
    older = {k: v for k, v in guest.to_json().items() if k != "settled_bytes"}
    assert GuestMeasurement.from_json(older).settled_bytes is None  # an agent from before
