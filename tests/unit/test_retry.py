"""``auto``'s retry after a cancelled pre-copy (:mod:`vmferry.core.retry`)."""

from __future__ import annotations

from vmferry.core.model import Mechanism
from vmferry.core.predict import StrategyPrediction
from vmferry.core.retry import RETRY_SLACK, retry_as
from vmferry.core.strategy import Goal


def _prediction(
    strategy: Mechanism, *, total_ms: int | None = 8_000, felt_ms: int | None = 90
) -> StrategyPrediction:
    converges = total_ms is not None
    return StrategyPrediction(
        strategy=strategy,
        converges=converges,
        total_ms=total_ms,
        downtime_ms=10 if converges else None,
        transferred_bytes=1 << 28 if converges else None,
        iterations=5 if converges else None,
        risk=None,
        note="",
        guest_downtime_ms=felt_ms if converges else None,
    )


PLAN = (_prediction("precopy", felt_ms=60), _prediction("multifd"), _prediction("postcopy"))


def test_a_stalled_precopy_is_retried_as_multifd_under_what_is_left_of_the_deadline() -> None:
    retry = retry_as("precopy", PLAN, Goal(100, deadline_ms=77_000), spent_ms=30_000)

    assert retry is not None
    assert retry.prediction.strategy == "multifd"
    assert retry.goal.deadline_ms == 47_000
    assert retry.goal.max_downtime_ms == 100
    assert "retrying as multifd" in retry.reason
    assert "~90 ms" in retry.reason


def test_without_a_deadline_the_retry_has_none() -> None:
    retry = retry_as("xbzrle", PLAN, Goal(100), spent_ms=500_000)

    assert retry is not None
    assert retry.goal.deadline_ms is None


def test_no_retry_when_multifd_was_predicted_over_the_goal() -> None:
    plan = (_prediction("precopy"), _prediction("multifd", felt_ms=101))

    assert retry_as("precopy", plan, Goal(100), spent_ms=1_000) is None


def test_no_retry_when_multifd_does_not_converge_or_was_not_predicted() -> None:
    assert retry_as("precopy", (_prediction("multifd", total_ms=None),), Goal(100), 0) is None
    assert retry_as("precopy", (_prediction("precopy"),), Goal(100), 0) is None


def test_no_retry_when_the_rest_of_the_deadline_is_too_short_for_it() -> None:
    needed_ms = int(8_000 * RETRY_SLACK)
    goal = Goal(100, deadline_ms=50_000)

    assert retry_as("precopy", PLAN, goal, spent_ms=50_000 - needed_ms + 1) is None
    assert retry_as("precopy", PLAN, goal, spent_ms=50_000 - needed_ms) is not None


def test_only_single_stream_strategies_are_retried() -> None:
    for chosen in ("multifd", "hybrid", "postcopy", "cold"):
        assert retry_as(chosen, PLAN, Goal(100), spent_ms=0) is None
    for chosen in ("precopy", "xbzrle", "auto-converge"):
        assert retry_as(chosen, PLAN, Goal(100), spent_ms=0) is not None
