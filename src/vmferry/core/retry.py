"""What ``auto`` does after the strategy it chose was cancelled mid-flight.

``auto`` chooses by the pre-flight's profile. The profile's dirty rate comes from page
sampling (``calc-dirty-rate``), which compares page contents over a ~1 s window; QEMU's dirty
log counts every page written at each sync, however short the round. Some guests look calm to
the first and keep a single-stream pre-copy from ever converging under the second: pages
rewritten with the bytes they held (a guest zeroing zero pages), and a few hot pages (the
kernel's, a writer's bookkeeping) written again within every round, which the last rounds of a
slow link make ~50 ms long. Such a pre-copy is cancelled by :func:`vmferry.core.strategy.replan`
with the guest still running on the source.

Multifd's channels keep what the migration thread handed them out of QEMU's pending count
until the switch, so it converges on many of those guests (measured on the matrix bench:
all 6 cells whose pre-copy stalled this way completed with multifd, 3 of them within the goal,
the 3 others where multifd's own prediction was over it already). The retry is taken
only when multifd was predicted to meet the goal on its own terms and what is left of the
deadline still holds its predicted time with room to spare: anything else is a refusal as
before, with the guest running on the source.

Example:
    >>> retry = retry_as(chosen="precopy", predictions=plan.predictions,   # doctest: +SKIP
    ...                  goal=goal, spent_ms=14_000)
    >>> retry.prediction.strategy if retry else None                        # doctest: +SKIP
    'multifd'
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from vmferry.core.predict import StrategyPrediction
from vmferry.core.strategy import Goal

__all__ = ["RETRY_SLACK", "Retry", "retry_as"]

# Single-stream pre-copy-like mechanisms: the ones whose stall multifd can get past.
_SINGLE_STREAM = frozenset({"precopy", "xbzrle", "auto-converge"})
# What is left of the deadline must hold the retry's predicted total this many times over.
RETRY_SLACK = 1.5


@dataclass(frozen=True, slots=True)
class Retry:
    """A second attempt: the strategy's prediction and the goal it runs under (the deadline
    shortened by the time the first attempt took)."""

    prediction: StrategyPrediction
    goal: Goal
    reason: str


def retry_as(
    chosen: str,
    predictions: Sequence[StrategyPrediction],
    goal: Goal,
    spent_ms: int,
) -> Retry | None:
    """The retry after ``auto``'s ``chosen`` strategy was cancelled mid-flight, or None.

    Args:
        chosen: the strategy that was cancelled.
        predictions: the plan's predictions (from the same pre-flight).
        goal: the user's goal.
        spent_ms: time the cancelled attempt took, cancelling included.
    """
    if chosen not in _SINGLE_STREAM:
        return None
    multifd = next((p for p in predictions if p.strategy == "multifd"), None)
    if multifd is None or not multifd.converges or multifd.total_ms is None:
        return None
    felt_ms = multifd.felt_ms
    if felt_ms is None or felt_ms > goal.max_downtime_ms:
        return None
    deadline_ms = None
    if goal.deadline_ms is not None:
        deadline_ms = goal.deadline_ms - spent_ms
        if deadline_ms < multifd.total_ms * RETRY_SLACK:
            return None
    reason = (
        f"{chosen} was cancelled with the guest on the source; retrying as multifd "
        f"(predicted ~{felt_ms} ms felt by the guest, ~{multifd.total_ms / 1000:.1f} s)"
    )
    return Retry(multifd, replace(goal, deadline_ms=deadline_ms), reason)
