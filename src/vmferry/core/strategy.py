"""Choose a migration strategy from a goal, and re-plan it mid-flight from progress samples.

``choose`` takes the predictions of :mod:`vmferry.core.predict` (made with the goal's downtime
as QEMU's downtime limit) and picks what meets the goal most comfortably, preferring strategies
without post-copy's failure mode when the comfort is similar. ``replan`` watches a running
migration and says when to give up on pre-copy: switch to post-copy if the goal allows it,
otherwise cancel while the guest still runs on the source.

Example:
    >>> from vmferry.core.predict import Calibration, Measurement, predict_all
    >>> m = Measurement(ram_bytes=1 << 30, zero_fraction=0.8, compress_ratio=1.0,
    ...                 dirty_rate_bps=80_000_000, bandwidth_bps=50_000_000,
    ...                 dirty_set_bytes=128 << 20)
    >>> goal = Goal(max_downtime_ms=300)
    >>> choose(predict_all(m, downtime_limit_ms=300, cal=Calibration.default()), goal).strategy
    'hybrid'
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

from vmferry.core.errors import ConfigError
from vmferry.core.model import Mechanism, MigrationStats
from vmferry.core.predict import (
    HEADROOM_CAP,
    StrategyPrediction,
    check_strategy,
    format_bytes,
    format_ms,
)

__all__ = [
    "MARGIN_CAP",
    "Action",
    "Choice",
    "Goal",
    "Progress",
    "Replan",
    "choose",
    "margin_of",
    "meets",
    "replan",
]

# A safety factor beyond this is "plenty": 4x headroom is not meaningfully safer than 10x.
MARGIN_CAP = HEADROOM_CAP
# Margins within this factor of the best count as similar; the least risky one wins among them.
_SIMILAR_MARGIN = 0.5
# From least to most side effects: nothing extra; CPU for zstd; CPU and a page cache; a slowed
# guest; post-copy's failure window (short, then whole); the guest paused for the whole copy.
_PREFERENCE: tuple[Mechanism, ...] = (
    "precopy",
    "multifd",
    "xbzrle",
    "auto-converge",
    "hybrid",
    "postcopy",
    "cold",
)
_POSTCOPY_LIKE = frozenset({"postcopy", "hybrid"})
_PRECOPY_LIKE = frozenset({"precopy", "multifd", "xbzrle", "auto-converge", "hybrid"})
# replan(): syncs after the first pass over which the pending bytes must shrink by 10 %.
_STALL_SYNCS = 3
_STALL_SYNCS_THROTTLED = 6  # auto-converge needs a few syncs to raise its throttle
_STALL_SYNCS_PREDICTED = 2  # the prediction already said it would not converge
_MIN_SHRINK = 0.10
# ... and only while the guest dirties at least this share of what is sent.
_OUTPACED_SHARE = 0.8
# The controller switches a hybrid after the first pass (QEMU's second dirty-bitmap sync).
_HYBRID_SWITCH_SYNC = 2


@dataclass(frozen=True, slots=True)
class Goal:
    """What the user wants from a migration.

    Attributes:
        max_downtime_ms: the longest pause the guest may see.
        deadline_ms: time from start to done, None for no deadline.
        allow_postcopy: False forbids post-copy (and hybrid) and their failure mode.
        best_effort: the user asked to go ahead when the goal cannot be met (``--force``):
            a stalled pre-copy is switched to post-copy even when its faults would stall the
            guest longer than the goal.
    """

    max_downtime_ms: int
    deadline_ms: int | None = None
    allow_postcopy: bool = True
    best_effort: bool = False

    def __post_init__(self) -> None:
        if self.max_downtime_ms <= 0:
            raise ConfigError(f"max downtime must be positive, got {self.max_downtime_ms} ms")
        if self.deadline_ms is not None and self.deadline_ms <= 0:
            raise ConfigError(f"deadline must be positive, got {self.deadline_ms} ms")

    def describe(self) -> str:
        """``"300 ms downtime"`` or ``"300 ms downtime within 20 s"``."""
        text = f"{self.max_downtime_ms} ms downtime"
        if self.deadline_ms is not None:
            text += f" within {format_ms(self.deadline_ms)}"
        return text


@dataclass(frozen=True, slots=True)
class Choice:
    """The strategy ``choose`` picked.

    Attributes:
        strategy: the strategy to run.
        prediction: its prediction.
        meets_goal: whether the prediction meets every part of the goal.
        margin: see :func:`margin_of` (>= 1 when the goal is met; larger is safer).
        reason: one line for the CLI.
    """

    strategy: Mechanism
    prediction: StrategyPrediction
    meets_goal: bool
    margin: float
    reason: str


def meets(p: StrategyPrediction, goal: Goal) -> bool:
    """Whether a prediction converges within the goal's downtime (what the guest feels: see
    ``StrategyPrediction.felt_ms``) and deadline."""
    felt_ms = p.felt_ms
    if not p.converges or felt_ms is None or p.total_ms is None:
        return False
    if felt_ms > goal.max_downtime_ms:
        return False
    return goal.deadline_ms is None or p.total_ms <= goal.deadline_ms


def margin_of(p: StrategyPrediction, goal: Goal) -> float:
    """How comfortably a prediction meets the goal: the smallest of its safety factors.

    * deadline / predicted total, when there is a deadline;
    * downtime limit / predicted guest-felt downtime for post-copy, hybrid and cold;
    * for pre-copy-like strategies, whose downtime QEMU itself holds to the limit, the factor by
      which the guest's dirty rate may grow before they stop converging
      (``StrategyPrediction.dirty_headroom``), or the downtime factor if it is the smaller.

    Capped at ``MARGIN_CAP``; at least 1 when the goal is met; 0 when it does not converge.
    """
    felt_ms = p.felt_ms
    if not p.converges or felt_ms is None or p.total_ms is None:
        return 0.0
    downtime_factor = goal.max_downtime_ms / max(1, felt_ms)
    factors = [downtime_factor]
    if p.dirty_headroom is not None and downtime_factor >= 1.0:
        factors = [p.dirty_headroom]
    if goal.deadline_ms is not None:
        factors.append(goal.deadline_ms / max(1, p.total_ms))
    return min(MARGIN_CAP, *factors)


def choose(predictions: Sequence[StrategyPrediction], goal: Goal) -> Choice:
    """Pick the strategy that meets the goal most comfortably.

    Among those that meet it, the largest margin wins, but any within a factor of 2 of it count
    as similar and the least risky of those is taken (pre-copy before multifd, xbzrle,
    auto-converge, hybrid, post-copy, cold). When none meets the goal, the best effort is, with
    ``meets_goal=False``, one that keeps the downtime limit if any does, then the one that misses
    the goal by the smallest factor. Cold is never chosen unless
    it meets the downtime limit; post-copy and hybrid never when the goal forbids them.

    Args:
        predictions: one per strategy, predicted with ``goal.max_downtime_ms`` as the limit.
        goal: the user's goal.

    Returns:
        The choice and a one-line reason.

    Raises:
        ConfigError: nothing to choose from (no predictions, or all excluded by the goal).
    """
    allowed = [
        p
        for p in predictions
        if (goal.allow_postcopy or p.strategy not in _POSTCOPY_LIKE)
        and (p.strategy != "cold" or _downtime_ok(p, goal))
    ]
    if not allowed:
        raise ConfigError(
            f"no strategy to choose from for {goal.describe()}"
            + ("" if goal.allow_postcopy else " without post-copy")
        )
    meeting = [p for p in allowed if meets(p, goal)]
    if meeting:
        best = max(margin_of(p, goal) for p in meeting)
        similar = [p for p in meeting if margin_of(p, goal) >= best * _SIMILAR_MARGIN]
        pick = min(similar, key=lambda p: (_rank(p), p.total_ms or 0))
        margin = margin_of(pick, goal)
        reason = (
            f"{pick.strategy}: ~{format_ms(pick.felt_ms or 0)} felt by the guest "
            f"(QEMU ~{format_ms(pick.downtime_ms or 0)}), ~{format_ms(pick.total_ms or 0)} total, "
            f"meets {goal.describe()} with {margin:.1f}x margin"
        )
        riskier = [p.strategy for p in meeting if margin_of(p, goal) > margin and p is not pick]
        if riskier:
            reason += f" (preferred to {', '.join(riskier)}: similar margin, fewer side effects)"
        return Choice(pick.strategy, pick, True, margin, reason)

    # The downtime is what the guest feels: missing only the deadline is the lesser miss.
    pick = min(allowed, key=lambda p: (not _downtime_ok(p, goal), _shortfall(p, goal), _rank(p)))
    return Choice(
        pick.strategy, pick, False, margin_of(pick, goal), _miss_reason(pick, allowed, goal)
    )


def _rank(p: StrategyPrediction) -> int:
    return _PREFERENCE.index(p.strategy)


def _downtime_ok(p: StrategyPrediction, goal: Goal) -> bool:
    return p.converges and p.felt_ms is not None and p.felt_ms <= goal.max_downtime_ms


def _shortfall(p: StrategyPrediction, goal: Goal) -> float:
    """By what factor a prediction misses the goal (1 = just meets it, inf = never finishes)."""
    felt_ms = p.felt_ms
    if not p.converges or felt_ms is None or p.total_ms is None:
        return math.inf
    factors = [felt_ms / goal.max_downtime_ms]
    if goal.deadline_ms is not None:
        factors.append(p.total_ms / goal.deadline_ms)
    return max(factors)


def _miss_reason(
    pick: StrategyPrediction, allowed: Sequence[StrategyPrediction], goal: Goal
) -> str:
    """One sentence: why no strategy meets the goal (pre-copy's side, post-copy's side), and
    the best that can be had."""
    why = [_precopy_why(allowed, goal), _postcopy_why(allowed, goal)]
    head = f"cannot meet {goal.describe()}: {'; '.join(w for w in why if w)}"
    felt_ms = pick.felt_ms
    if not pick.converges or felt_ms is None or pick.total_ms is None:
        return f"{head}; no allowed strategy finishes"
    best = (
        f"best is {pick.strategy} at ~{format_ms(felt_ms)} felt by the guest "
        f"(QEMU ~{format_ms(pick.downtime_ms or 0)})"
    )
    if goal.deadline_ms is not None and pick.total_ms > goal.deadline_ms:
        best += f" and ~{format_ms(pick.total_ms)} in all, past the deadline"
    return f"{head}; {best}"


def _precopy_why(allowed: Sequence[StrategyPrediction], goal: Goal) -> str:
    live = [p for p in allowed if p.strategy in _PRECOPY_LIKE and p.strategy != "hybrid"]
    finishing = [p for p in live if p.converges and p.felt_ms is not None]
    if not live:
        return ""
    if not finishing:
        plain = next((p for p in live if p.strategy == "precopy"), live[0])
        detail = plain.note.rsplit("; ", 1)[-1].removesuffix(": never converges")
        return f"pre-copy never converges (the guest {detail})"
    best = min(finishing, key=lambda p: (p.felt_ms or 0, p.total_ms or 0))
    if (best.felt_ms or 0) > goal.max_downtime_ms:
        return f"{best.strategy}'s pause would be felt for ~{format_ms(best.felt_ms or 0)}"
    return f"{best.strategy} needs ~{format_ms(best.total_ms or 0)}"


def _postcopy_why(allowed: Sequence[StrategyPrediction], goal: Goal) -> str:
    if not goal.allow_postcopy:
        return "post-copy is not allowed"
    pulled = [p for p in allowed if p.strategy in _POSTCOPY_LIKE and p.felt_ms is not None]
    if not pulled:
        return ""
    best = min(pulled, key=lambda p: (p.felt_ms or 0, p.total_ms or 0))
    if (best.felt_ms or 0) > goal.max_downtime_ms:
        return (
            f"{best.strategy}'s page faults would stall the guest ~{format_ms(best.felt_ms or 0)}"
        )
    return f"{best.strategy} needs ~{format_ms(best.total_ms or 0)}"


@dataclass(frozen=True, slots=True)
class Progress:
    """One progress sample as the controller sees it.

    Attributes:
        elapsed_ms: since the migration started.
        transferred_bytes: sent so far.
        remaining_bytes: QEMU's pending bytes (dirty pages, zero pages not yet scanned included).
        dirty_rate_bps: the guest's dirty rate as QEMU measures it.
        throughput_bps: what QEMU sends per second.
        iterations: QEMU's dirty-bitmap sync count.
        expected_downtime_ms: QEMU's own estimate, if it gave one.
        is_postcopy: post-copy already runs (nothing to re-plan).
        normal_pages, zero_pages: pages QEMU sent as data and as zero flags so far.
    """

    elapsed_ms: int
    transferred_bytes: int
    remaining_bytes: int
    dirty_rate_bps: int
    throughput_bps: int
    iterations: int
    expected_downtime_ms: int | None
    is_postcopy: bool = False
    normal_pages: int = 0
    zero_pages: int = 0

    @classmethod
    def from_stats(cls, stats: MigrationStats) -> Progress:
        """The sample a :class:`MigrationStats` carries."""
        return cls(
            elapsed_ms=stats.total_ms,
            transferred_bytes=stats.transferred_bytes,
            remaining_bytes=stats.remaining_bytes,
            dirty_rate_bps=stats.dirty_rate_bps,
            throughput_bps=stats.throughput_bps,
            iterations=stats.iterations,
            expected_downtime_ms=stats.expected_downtime_ms,
            is_postcopy=stats.status.is_postcopy,
            normal_pages=stats.normal_pages,
            zero_pages=stats.zero_pages,
        )


class Action(enum.Enum):
    """What the controller should do next."""

    CONTINUE = "continue"
    SWITCH_TO_POSTCOPY = "switch-to-postcopy"
    CANCEL = "cancel"


@dataclass(frozen=True, slots=True)
class Replan:
    """``replan``'s verdict and a one-line reason for the log and the CLI."""

    action: Action
    reason: str


def replan(
    strategy: str,
    history: Sequence[Progress],
    prediction: StrategyPrediction,
    goal: Goal,
) -> Replan:
    """Decide mid-flight whether a migration should go on as it is.

    A pre-copy-like migration is *stalled* when, over the last few dirty-bitmap syncs after the
    first pass (3; 6 for auto-converge, which needs syncs to raise its throttle; 2 when the
    prediction already said it would not converge), the pending bytes did not shrink by 10 %
    while QEMU still expected more downtime than the goal and the guest dirtied at least 80 %
    of what was sent. It *misses the deadline* when the time
    left at the current net rate (sent minus dirtied) does not fit before it, or when the deadline
    has passed. Either way: switch to post-copy when the goal allows it (the switch itself pauses
    the guest only for the device state, then its page faults stall it) when the goal allows it
    and the predicted stall (``StrategyPrediction.switch_felt_ms``) fits the goal or the user
    asked for a best effort; otherwise cancel now, while the guest runs on the source.
    Nothing here raises the downtime limit: QEMU keeps holding pre-copy to it.

    Args:
        strategy: the running strategy.
        history: progress samples, oldest first.
        prediction: the strategy's prediction before it started.
        goal: the user's goal.

    Returns:
        The action and why.

    Raises:
        ConfigError: unknown strategy.
    """
    name = check_strategy(strategy)
    if not history:
        return Replan(Action.CONTINUE, "no progress sample yet")
    last = history[-1]
    if last.is_postcopy or name == "postcopy":
        return Replan(Action.CONTINUE, "post-copy runs: it finishes by itself")
    if name not in _PRECOPY_LIKE:
        return Replan(Action.CONTINUE, f"{name}: nothing to adapt")
    if name == "hybrid" and goal.allow_postcopy and last.iterations >= _HYBRID_SWITCH_SYNC:
        return Replan(Action.SWITCH_TO_POSTCOPY, "hybrid: first pass done, switching to post-copy")

    trouble = _stall(name, history, prediction, goal) or _deadline_miss(history, goal)
    if trouble is None:
        return Replan(Action.CONTINUE, _on_track(last, prediction))
    stall_ms = prediction.switch_felt_ms
    if goal.allow_postcopy and (
        stall_ms is None or stall_ms <= goal.max_downtime_ms or goal.best_effort
    ):
        return Replan(Action.SWITCH_TO_POSTCOPY, f"{trouble}: switching to post-copy")
    if goal.allow_postcopy:
        return Replan(
            Action.CANCEL,
            f"{trouble}; post-copy's page faults would stall the guest ~{format_ms(stall_ms or 0)}"
            f", over the {format_ms(goal.max_downtime_ms)} goal: cancelling, the guest keeps "
            "running on the source (--force switches anyway)",
        )
    return Replan(
        Action.CANCEL,
        f"{trouble}; post-copy is not allowed: cancelling, the guest keeps running on the source",
    )


def _pending_by_sync(history: Sequence[Progress]) -> list[tuple[int, Progress]]:
    """Per dirty-bitmap sync after the first pass, the sample with the most pending bytes
    (the closest to the sync itself)."""
    best: dict[int, Progress] = {}
    for sample in history:
        if sample.iterations < 2:
            continue
        seen = best.get(sample.iterations)
        if seen is None or sample.remaining_bytes > seen.remaining_bytes:
            best[sample.iterations] = sample
    return sorted(best.items())


def _expected_downtime_ms(sample: Progress) -> float:
    if sample.expected_downtime_ms is not None:
        return float(sample.expected_downtime_ms)
    if sample.throughput_bps <= 0:
        return math.inf
    return sample.remaining_bytes * 1000.0 / sample.throughput_bps


def _stall(
    name: Mechanism, history: Sequence[Progress], prediction: StrategyPrediction, goal: Goal
) -> str | None:
    if not prediction.converges:
        window = _STALL_SYNCS_PREDICTED
    elif name == "auto-converge":
        window = _STALL_SYNCS_THROTTLED
    else:
        window = _STALL_SYNCS
    syncs = _pending_by_sync(history)
    if len(syncs) < window:
        return None
    recent = [sample for _, sample in syncs[-window:]]
    first, latest = recent[0], recent[-1]
    if latest.remaining_bytes < first.remaining_bytes * (1.0 - _MIN_SHRINK):
        return None
    if min(_expected_downtime_ms(s) for s in recent) <= goal.max_downtime_ms:
        return None
    dirty_bps = _data_dirty_bps(history)
    if dirty_bps is None:
        dirty_bps = float(latest.dirty_rate_bps)
    if dirty_bps < latest.throughput_bps * _OUTPACED_SHARE:
        # The link still outpaces the guest: slow, not stuck (a big guest rewriting zero pages
        # hovered for a while, then converged); the deadline check covers slowness.
        return None
    as_predicted = " as predicted" if not prediction.converges else ""
    return (
        f"stalled{as_predicted}: {format_bytes(latest.remaining_bytes)} pending has not shrunk "
        f"over {window} syncs (guest dirties {format_bytes(latest.dirty_rate_bps)}/s, "
        f"{format_bytes(latest.throughput_bps)}/s sent)"
    )


def _data_dirty_bps(history: Sequence[Progress]) -> float | None:
    """The guest's dirty rate in bytes that cost the link: QEMU's figure times the share of
    the pages re-sent since the first pass that went as data (a page rewritten with zeros
    goes as a flag); QEMU's figure where it counts no pages, None until some page was re-sent
    (the share is not known yet)."""
    last = history[-1]
    if last.normal_pages + last.zero_pages <= 0:
        return float(last.dirty_rate_bps)
    first = next((s for s in history if s.iterations >= 2), last)
    data = last.normal_pages - first.normal_pages
    zeros = last.zero_pages - first.zero_pages
    if data < 0 or zeros < 0 or data + zeros <= 0:
        return None
    return last.dirty_rate_bps * data / (data + zeros)


def _deadline_miss(history: Sequence[Progress], goal: Goal) -> str | None:
    last = history[-1]
    if goal.deadline_ms is None:
        return None
    if last.elapsed_ms >= goal.deadline_ms:
        return f"deadline {format_ms(goal.deadline_ms)} passed"
    if last.iterations < 2:
        # During the first pass the pending bytes include zero pages not yet scanned, which
        # cost almost nothing: a projection from them would be far too pessimistic.
        return None
    dirty_bps = _data_dirty_bps(history)
    if dirty_bps is None:
        # Nothing re-sent yet: whether the guest's writes cost the link (data) or almost
        # nothing (zero pages) is not known, and a projection would guess.
        return None
    net_bps = last.throughput_bps - dirty_bps
    if net_bps <= 0:
        return (
            f"will miss the {format_ms(goal.deadline_ms)} deadline: the guest dirties "
            f"{format_bytes(round(dirty_bps))}/s, faster than "
            f"{format_bytes(last.throughput_bps)}/s sent"
        )
    finish_ms = last.elapsed_ms + last.remaining_bytes * 1000.0 / net_bps
    if finish_ms <= goal.deadline_ms:
        return None
    return (
        f"will miss the {format_ms(goal.deadline_ms)} deadline: ~{format_ms(finish_ms)} "
        "at the current net rate"
    )


def _on_track(last: Progress, prediction: StrategyPrediction) -> str:
    text = f"{format_bytes(last.remaining_bytes)} pending after {format_ms(last.elapsed_ms)}"
    if prediction.total_ms is not None:
        text += f" (predicted ~{format_ms(prediction.total_ms)} in all)"
    return text
