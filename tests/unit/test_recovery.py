"""Post-copy recovery decisions: stall detection and the retry/backoff schedule."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmferry.controller.migrate import MigrationRequest
from vmferry.core.errors import ConfigError
from vmferry.core.recovery import RecoveryPolicy, is_stalled
from vmferry.core.status import MigrationStatus


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ("postcopy-active", True),
        ("postcopy-paused", True),
        ("postcopy-recover-setup", True),
        ("postcopy-recover", True),
        ("active", False),
        ("device", False),
        ("completed", False),
        ("failed", False),
        ("none", False),
    ],
)
def test_postcopy_statuses(status: str, expected: bool) -> None:
    parsed = MigrationStatus(status)
    assert parsed.is_postcopy is expected
    assert parsed.is_postcopy_broken is (expected and status != "postcopy-active")


@pytest.mark.parametrize(
    ("status", "idle_s", "expected"),
    [
        ("postcopy-active", 0.5, False),
        ("postcopy-active", 1.0, True),
        ("postcopy-active", 30.0, True),
        ("active", 30.0, False),  # a pre-copy that stalls is the re-planner's business
        ("postcopy-paused", 30.0, False),  # already paused: recovered, not "stalled"
        ("completed", 30.0, False),
    ],
)
def test_stall_only_counts_for_an_active_postcopy(
    status: str, idle_s: float, expected: bool
) -> None:
    parsed = MigrationStatus(status)
    assert is_stalled(parsed, last_progress_s=100.0, now_s=100.0 + idle_s, stall_s=1.0) is expected


def test_backoff_doubles_up_to_its_cap() -> None:
    policy = RecoveryPolicy(limit_s=600, first_delay_s=0.5, factor=2, max_delay_s=5)
    assert [policy.delay_s(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    assert policy.delay_s(10_000) == 5.0  # no float overflow on a long outage


def test_waits_stop_at_the_limit() -> None:
    policy = RecoveryPolicy(limit_s=10, first_delay_s=1, factor=2, max_delay_s=8)
    elapsed, attempts = 0.0, 1  # the first attempt runs at once
    while (wait := policy.next_wait_s(attempts, elapsed)) is not None:
        elapsed += wait
        attempts += 1
    # Waits 1, 2, 4, then 3 (cut to end at the limit): a last attempt runs right at 10 s.
    assert (elapsed, attempts) == (10.0, 5)
    assert policy.next_wait_s(1, 10.0) is None


@given(
    limit_s=st.floats(0.1, 600),
    first_s=st.floats(0.1, 10),
    factor=st.floats(1, 4),
    extra_s=st.floats(0, 60),
)
def test_schedule_never_passes_the_limit_and_always_ends(
    limit_s: float, first_s: float, factor: float, extra_s: float
) -> None:
    policy = RecoveryPolicy(limit_s, first_s, factor, first_s + extra_s)
    elapsed = 0.0
    for attempt in itertools.count(1):
        wait = policy.next_wait_s(attempt, elapsed)
        if wait is None:
            break
        assert 0 < wait <= policy.max_delay_s
        elapsed += wait
        assert elapsed <= limit_s + 1e-9
        assert attempt < 1_000_000
    assert elapsed >= limit_s - 1e-6


@pytest.mark.parametrize("limit_s", [0, -1, 86_401])
def test_bad_limits_are_refused(limit_s: float) -> None:
    with pytest.raises(ConfigError, match="recovery-limit"):
        RecoveryPolicy(limit_s=limit_s)
    with pytest.raises(ConfigError, match="recovery-limit"):
        MigrationRequest("vm1", "host-2", recovery_limit_s=limit_s).resolve()


def test_request_carries_its_limit() -> None:
    assert MigrationRequest("vm1", "host-2").recovery.limit_s == 600
    assert MigrationRequest("vm1", "host-2", recovery_limit_s=30).recovery.limit_s == 30
