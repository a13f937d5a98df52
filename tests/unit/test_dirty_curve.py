"""The short-window dirty curve (:mod:`vmferry.core.dirty_curve`)."""

from __future__ import annotations

import pytest

from vmferry.core.dirty_curve import fit


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
