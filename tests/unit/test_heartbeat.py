"""Guest-observed downtime from heartbeat gaps."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from vmferry.core.heartbeat import HeartbeatGaps


def test_largest_gap_inside_window() -> None:
    gaps = HeartbeatGaps()
    gaps.observe(1, 0.0)
    gaps.observe(2, 5.0)
    gaps.open_window(6.0)
    for seq, t in [(3, 10.0), (4, 15.0), (5, 95.0), (6, 100.0)]:
        gaps.observe(seq, t)
    assert gaps.close_window() == 80
    assert gaps.dropped == 0


def test_gap_before_window_does_not_count_but_silence_at_start_does() -> None:
    gaps = HeartbeatGaps()
    gaps.observe(1, 0.0)
    gaps.observe(2, 500.0)  # before the window: not counted
    gaps.open_window(600.0)
    gaps.observe(3, 650.0)  # 50 ms since the window opened (last arrival predates it)
    assert gaps.close_window() == 50


def test_drops_and_stale_heartbeats() -> None:
    gaps = HeartbeatGaps()
    gaps.open_window(0.0)
    gaps.observe(1, 1.0)
    gaps.observe(5, 2.0)  # 3 dropped
    gaps.observe(4, 3.0)  # stale (late from the old home): ignored
    assert gaps.dropped == 3
    assert gaps.received == 2
    assert gaps.last_seq == 5


@given(st.lists(st.floats(min_value=0.1, max_value=1000.0), min_size=1, max_size=50))
def test_window_gap_is_the_max_interval(intervals: list[float]) -> None:
    gaps = HeartbeatGaps()
    gaps.observe(1, 0.0)
    gaps.open_window(0.0)
    t = 0.0
    arrivals = [t]
    for seq, step in enumerate(intervals, start=2):
        t += step
        arrivals.append(t)
        gaps.observe(seq, t)
    # The gaps between the arrival times fed (a float sum: 1.5 may arrive as 1.4999...).
    fed = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    assert gaps.close_window() == round(max(fed))
