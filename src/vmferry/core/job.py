"""A job of many moves: the discrete-event loop that runs a dispatcher, and the plan.

:func:`run_job` is the loop: it hands the dispatcher's actions to an executor, waits on the
injected clock for the next move to end, tells the dispatcher, and so on until every move
ended. The same loop runs

* a **plan**: the executor is :class:`PredictedFlow` on a :class:`FluidExecutor` (each move's
  progress from the predictor at its current share) and the clock a :class:`ManualClock`, so
  the schedule (start and end of every move, the makespan: one ETA for the whole job) comes
  out at once;
* the **simulator**: the executor is the model of pre-copy of :mod:`vmferry.core.precopy_flow`;
* real moves: the controller's executor starts migrations through the agents and reports
  them as they end, on the wall clock.

Example:
    >>> from vmferry.core.cluster_model import Cluster, Host, HostName, Move, Vm, VmName
    >>> hosts = [Host(HostName(f"h{i}"), 64 << 30, 32, 1_250_000_000) for i in (1, 2)]
    >>> vm = Vm(VmName("a"), HostName("h1"), 2 << 30, dirty_rate_bps=5_000_000)
    >>> cluster = Cluster.build(hosts, [vm])
    >>> book = CostBook(Calibration(qemu_throughput_bps=1_000_000_000))
    >>> schedule = plan_job(cluster, [Move(vm, HostName("h2"))], book=book)
    >>> 1.0 < schedule.makespan_s < 4.0, schedule.missed
    (True, 0)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from vmferry.core.cluster_model import Cluster, DeadlineUnreachable, Move, VmName
from vmferry.core.errors import ConfigError, StateError
from vmferry.core.flows import Executor, Finished, FluidExecutor
from vmferry.core.move_cost import PLANNED_PLAIN, Calibration, CostBook, MoveCost, Planned
from vmferry.core.schedule import Action, BandwidthDispatcher, Dispatcher, SetCap, Start
from vmferry.core.schedule_baselines import BASELINES, FifoDispatcher

__all__ = [
    "POLICY_NAMES",
    "Calibration",
    "Clock",
    "CostBook",
    "ManualClock",
    "MoveRecord",
    "PredictedFlow",
    "Schedule",
    "make_dispatcher",
    "plan_job",
    "run_job",
    "span_json",
]

# ``ours`` chooses each move's strategy (pre-copy, multifd with zstd, hybrid); ``ours-plain``
# is the same scheduler without compression (pre-copy or hybrid); then the peers' policies.
POLICY_NAMES: tuple[str, ...] = ("ours", "ours-plain", *BASELINES)


class Clock(Protocol):
    """Time as the job loop sees it: read it, and wait until an instant (a simulated clock
    jumps there; a real one sleeps)."""

    def now_s(self) -> float: ...

    def advance_to(self, at_s: float) -> None: ...


@dataclass(slots=True)
class ManualClock:
    """A clock that jumps to where it is told (plans, simulations, tests)."""

    at_s: float = 0.0

    def now_s(self) -> float:
        return self.at_s

    def advance_to(self, at_s: float) -> None:
        if at_s < self.at_s - 1e-9:
            raise StateError("the clock", f"at {self.at_s:.3f} s", f"no earlier than {at_s:.3f} s")
        self.at_s = max(self.at_s, at_s)


@dataclass(frozen=True, slots=True)
class MoveRecord:
    """One move of a job, as it ran (or is planned to).

    Attributes:
        move: the move.
        start_s: when it started.
        end_s: when it ended.
        caps: (from when, cap in bytes/s or None for uncapped) for each cap it ran under.
        ran_as: ``precopy``, ``multifd``, ``hybrid``, ``precopy+postcopy`` (a stalled
            pre-copy switched to post-copy) or ``multifd+hybrid`` (a stalled multifd move
            cancelled and run again as hybrid).
        felt_ms: the longest stall its guest felt.
        transferred_bytes: what crossed the link.
    """

    move: Move
    start_s: float
    end_s: float
    caps: tuple[tuple[float, float | None], ...]
    ran_as: str
    felt_ms: int
    transferred_bytes: int

    @property
    def goal_met(self) -> bool:
        return self.felt_ms <= self.move.vm.max_downtime_ms

    def cap_at(self, at_s: float) -> float | None:
        """The cap in force at ``at_s`` (within the move)."""
        current = self.caps[0][1]
        for since_s, cap in self.caps:
            if since_s <= at_s:
                current = cap
        return current

    def to_json(self) -> dict[str, Any]:
        return {
            **span_json(self.move, self.start_s, self.end_s, self.caps),
            "ran_as": self.ran_as,
            "felt_ms": self.felt_ms,
            "goal_ms": self.move.vm.max_downtime_ms,
            "transferred_bytes": self.transferred_bytes,
        }


def span_json(
    move: Move, start_s: float, end_s: float, caps: Sequence[tuple[float, float | None]]
) -> dict[str, Any]:
    """A move's place in a job: where from and to, when, under which bandwidth caps."""
    return {
        "vm": move.name,
        "source": move.source,
        "destination": move.destination,
        "start_s": round(start_s, 3),
        "end_s": round(end_s, 3),
        "cap_bps": [[round(t, 3), None if c is None else round(c)] for t, c in caps],
    }


@dataclass(frozen=True, slots=True)
class Schedule:
    """A job's moves with their times: a plan, or what ran.

    Attributes:
        policy: the dispatcher's name.
        records: one per move, in start order.
        start_s: when the job began.
    """

    policy: str
    records: tuple[MoveRecord, ...]
    start_s: float = 0.0

    @property
    def makespan_s(self) -> float:
        """From the job's start to its last move's end."""
        return max((r.end_s for r in self.records), default=self.start_s) - self.start_s

    @property
    def eta_s(self) -> float:
        """When the whole job ends (on the job's clock)."""
        return self.start_s + self.makespan_s

    @property
    def downtime_sum_ms(self) -> int:
        return sum(r.felt_ms for r in self.records)

    @property
    def missed(self) -> int:
        """Moves whose guest felt more than its downtime goal."""
        return sum(1 for r in self.records if not r.goal_met)

    @property
    def transferred_bytes(self) -> int:
        return sum(r.transferred_bytes for r in self.records)

    def to_json(self) -> dict[str, Any]:
        """The job report's schedule: every move, the makespan and the ETA."""
        return {
            "policy": self.policy,
            "start_s": round(self.start_s, 3),
            "makespan_s": round(self.makespan_s, 3),
            "eta_s": round(self.eta_s, 3),
            "downtime_sum_ms": self.downtime_sum_ms,
            "missed": self.missed,
            "transferred_bytes": self.transferred_bytes,
            "moves": [r.to_json() for r in self.records],
        }


@dataclass(slots=True)
class _Open:
    start: Start
    start_s: float
    caps: list[tuple[float, float | None]] = field(default_factory=list)


def run_job(dispatcher: Dispatcher, executor: Executor, clock: Clock) -> Schedule:
    """Run every move of ``dispatcher`` through ``executor``, on ``clock``.

    Returns:
        The moves as they ran.

    Raises:
        StateError: moves are left that nothing will ever start (the dispatcher waits for a
            move to end while none runs).
    """
    began_s = clock.now_s()
    running: dict[VmName, _Open] = {}
    records: list[MoveRecord] = []
    actions = dispatcher.begin(began_s)
    while True:
        _apply(actions, executor, running, clock.now_s())
        wake_s = dispatcher.wake_s
        event = executor.next_finished(math.inf if wake_s is None else wake_s)
        if event is not None:
            clock.advance_to(event.at_s)
            records.append(_record(running.pop(event.vm), event))
            actions = dispatcher.finished(event.vm, clock.now_s())
        elif wake_s is not None:
            clock.advance_to(max(clock.now_s(), wake_s))
            actions = dispatcher.tick(clock.now_s())
            if not actions and dispatcher.wake_s == wake_s:
                raise StateError(f"job of {dispatcher.name}", "woken in vain", "a later wake-up")
        else:
            break
    if dispatcher.waiting or running:
        raise StateError(
            f"job of {dispatcher.name}",
            f"stuck with {dispatcher.waiting} move(s) waiting",
            "progress",
        )
    records.sort(key=lambda r: (r.start_s, r.move.name))
    return Schedule(dispatcher.name, tuple(records), began_s)


def _apply(
    actions: Sequence[Action], executor: Executor, running: dict[VmName, _Open], now_s: float
) -> None:
    for action in actions:
        if isinstance(action, SetCap):
            running[action.vm].caps.append((now_s, action.cap_bps))
            executor.set_cap(action.vm, action.cap_bps, now_s)
        else:
            running[action.move.name] = _Open(action, now_s, [(now_s, action.cap_bps)])
            executor.start(action, now_s)


def _record(opened: _Open, event: Finished) -> MoveRecord:
    return MoveRecord(
        opened.start.move,
        opened.start_s,
        event.at_s,
        tuple(opened.caps),
        event.ran_as,
        event.felt_ms,
        event.transferred_bytes,
    )


class PredictedFlow:
    """A move progressing as predicted: it sets up first (no bandwidth:
    :meth:`CostBook.setup_s`), then at rate ``r`` takes the rest of the predictor's total at
    ``r``. A pre-copy that would not converge at its share is predicted as the switch to
    post-copy that rescues it (hybrid's cost), a multifd move as hybrid alike; a multifd move
    uses no more of its links than zstd fills (:meth:`CostBook.usable_bps`)."""

    def __init__(self, start: Start, now_s: float, book: CostBook, stream_bps: float) -> None:
        self._vm = start.move.vm
        self._strategy: Planned = start.strategy
        self._cap = start.cap_bps
        self._stream_bps = book.usable_bps(self._vm, start.strategy, stream_bps)
        self._book = book
        self._setup_end_s = now_s + book.setup_s(self._vm)
        self._since_s = now_s
        self._done = 0.0  # of the transfer

    def demand_bps(self) -> float:
        if self._since_s < self._setup_end_s:
            return 0.0
        return self._stream_bps if self._cap is None else min(self._cap, self._stream_bps)

    def set_cap(self, cap_bps: float) -> None:
        self._cap = cap_bps

    def _cost(self, rate_bps: float) -> tuple[str, MoveCost]:
        cost = self._book.cost(self._vm, rate_bps, self._strategy)
        if math.isinf(cost.total_s) and self._strategy != "hybrid":
            rescue = "precopy+postcopy" if self._strategy == "precopy" else "multifd+hybrid"
            return rescue, self._book.cost(self._vm, rate_bps, "hybrid")
        return self._strategy, cost

    def _transfer_s(self, rate_bps: float) -> float:
        return max(1e-3, self._cost(rate_bps)[1].total_s - self._book.setup_s(self._vm))

    def advance(self, now_s: float, rate_bps: float) -> None:
        busy_s = now_s - max(self._since_s, self._setup_end_s)
        if rate_bps > 0.0 and busy_s > 0.0:
            self._done = min(1.0, self._done + busy_s / self._transfer_s(rate_bps))
        self._since_s = max(self._since_s, now_s)

    def next_event_s(self, now_s: float, rate_bps: float) -> float:
        if now_s < self._setup_end_s:
            return self._setup_end_s
        if rate_bps <= 0.0:
            return math.inf
        return now_s + (1.0 - self._done) * self._transfer_s(rate_bps)

    def on_event(self, now_s: float, rate_bps: float) -> Finished | None:
        if now_s < self._setup_end_s or self._done < 1.0 - 1e-9:
            return None  # set up: the transfer begins (or a rounding step short of the end)
        ran_as, cost = self._cost(max(rate_bps, 1.0))
        return Finished(self._vm.name, now_s, ran_as, cost.felt_ms or 0, cost.transferred_bytes)


def make_dispatcher(
    policy: str, cluster: Cluster, moves: Sequence[Move], book: CostBook
) -> Dispatcher:
    """The dispatcher of ``policy`` (one of :data:`POLICY_NAMES`) for ``moves``.

    Raises:
        ConfigError: an unknown policy; see also :func:`vmferry.core.schedule.check_moves`.
    """
    stream_bps = book.cal.qemu_throughput_bps
    if policy == "ours":
        return BandwidthDispatcher(cluster, moves, book, stream_bps=stream_bps)
    if policy == "ours-plain":
        return BandwidthDispatcher(
            cluster, moves, book, stream_bps=stream_bps, strategies=PLANNED_PLAIN, name=policy
        )
    limits = BASELINES.get(policy)
    if limits is None:
        raise ConfigError(f"unknown policy {policy!r}: use {', '.join(POLICY_NAMES)}")
    return FifoDispatcher(policy, cluster, moves, limits, book=book, stream_bps=stream_bps)


def plan_job(
    cluster: Cluster,
    moves: Sequence[Move],
    *,
    book: CostBook,
    policy: str = "ours",
    deadline_s: float | None = None,
) -> Schedule:
    """The predicted schedule of ``moves`` under ``policy``, from time 0.

    Raises:
        DeadlineUnreachable: it ends after ``deadline_s`` (the error names its makespan).
        ConfigError, UnknownHost: bad moves or policy (see :func:`make_dispatcher`).
    """
    dispatcher = make_dispatcher(policy, cluster, moves, book)
    stream_bps = book.cal.qemu_throughput_bps
    executor = FluidExecutor(
        {h.name: float(h.link_bps) for h in cluster.hosts},
        lambda start, now_s: PredictedFlow(start, now_s, book, stream_bps),
    )
    schedule = run_job(dispatcher, executor, ManualClock())
    if deadline_s is not None and schedule.makespan_s > deadline_s:
        raise DeadlineUnreachable(schedule.makespan_s, deadline_s)
    return schedule
