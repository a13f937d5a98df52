"""Running a planned job of many moves for real: the scheduler's dispatcher on the wall clock,
each move a :func:`vmferry.controller.migrate.migrate` of its own.

The loop is :func:`vmferry.core.job.run_job`'s with real moves: the dispatcher of the job's
policy (:class:`~vmferry.core.schedule.BandwidthDispatcher` unless a bench asks for a
fixed-concurrency baseline; the one that made the plan) says which
move starts when and with which bandwidth cap; the runner starts it as a task of the job's
task group, waits for the first move to end or for the instant the dispatcher asked to be
woken, and tells the dispatcher. Each move is recorded in the job store as it starts and
ends, and its report kept for the job report.

QEMU's bandwidth cap is set when a move starts; the dispatcher's later changes of cap
(:class:`~vmferry.core.schedule.SetCap`, when other moves end or start sending) are applied
to the move in flight through its source agent (as soon as it sends, if it still sets up),
and recorded in the job report; a change the agent refuses is logged, and the move goes on
at the cap it has. Each move's progress samples feed an
:class:`~vmferry.core.eta.EtaEstimator`, whose time left the dispatcher learns, so a move
that runs late keeps its links (see :meth:`~vmferry.core.schedule.Dispatcher.progress`).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from vmferry.agent.port import AgentPort
from vmferry.controller.cluster import Cluster
from vmferry.controller.evacuation import JobPlan
from vmferry.controller.history import History
from vmferry.controller.jobs import JobStore
from vmferry.controller.migrate import MigrationRequest, migrate
from vmferry.core.cluster_model import Move, VmName
from vmferry.core.errors import FerryError, StateError
from vmferry.core.eta import EtaEstimator, EtaHints
from vmferry.core.job import make_dispatcher, span_json
from vmferry.core.model import MigrationReport, MigrationStats
from vmferry.core.phases import Phase
from vmferry.core.schedule import Action, SetCap, Start
from vmferry.core.status import MigrationStatus, Stage

__all__ = ["JobObserver", "JobResult", "MoveResult", "Mover", "move_goal_ms", "run_plan"]

logger = logging.getLogger(__name__)


class Mover(Protocol):
    """What runs one move (:func:`vmferry.controller.migrate.migrate`; tests give their own)."""

    async def __call__(
        self,
        cluster: Cluster,
        request: MigrationRequest,
        *,
        history: History | None = None,
        on_progress: Callable[[Phase, MigrationStats | None], None] | None = None,
    ) -> MigrationReport: ...


class JobObserver(Protocol):
    """What a display is told while a job runs (times from the job's start)."""

    def started(self, move: Move, cap_bps: float | None, at_s: float) -> None: ...

    def progress(self, vm: str, phase: Phase, stats: MigrationStats | None) -> None: ...

    def ended(self, result: MoveResult) -> None: ...


@dataclass(frozen=True, slots=True)
class MoveResult:
    """One move as it ran.

    Attributes:
        move: the move.
        start_s, end_s: when it started and ended, from the job's start.
        caps: (from when, cap in bytes/s) the dispatcher gave it (the first one applied).
        report: its migration report (None: it was refused before it started).
        error: why it did not start, if it did not.
    """

    move: Move
    start_s: float
    end_s: float
    caps: tuple[tuple[float, float | None], ...]
    report: MigrationReport | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.report is not None and self.report.is_success

    def to_json(self, predicted: tuple[float, float] | None) -> dict[str, Any]:
        return {
            **span_json(self.move, self.start_s, self.end_s, self.caps),
            "predicted": None
            if predicted is None
            else {"start_s": round(predicted[0], 3), "end_s": round(predicted[1], 3)},
            "ok": self.ok,
            "error": self.error,
            "report": None if self.report is None else self.report.to_json(),
        }


@dataclass(frozen=True, slots=True)
class JobResult:
    """A job as it ran."""

    job: int
    plan: JobPlan
    moves: tuple[MoveResult, ...]

    @property
    def ok(self) -> bool:
        return all(m.ok for m in self.moves)

    @property
    def makespan_s(self) -> float:
        return max((m.end_s for m in self.moves), default=0.0)

    def to_json(self) -> dict[str, Any]:
        schedule = self.plan.require_movable()
        predicted = {r.move.name: (r.start_s, r.end_s) for r in schedule.records}
        return {
            "schema": 1,
            "job": self.job,
            "kind": self.plan.kind,
            "host": self.plan.host,
            "policy": self.plan.request.policy,
            "state": "completed" if self.ok else "failed",
            "makespan_s": round(self.makespan_s, 3),
            "predicted_makespan_s": round(schedule.makespan_s, 3),
            "moves": [m.to_json(predicted.get(m.move.name)) for m in self.moves],
            "predicted": schedule.to_json(),
        }


@dataclass(slots=True)
class _Running:
    start: Start
    start_s: float
    task: asyncio.Task[MoveResult]
    eta: EtaEstimator
    caps: list[tuple[float, float | None]] = field(default_factory=list)
    applied_mbps: int | None = None  # the cap in force (or asked of its agent)
    sending: bool = False  # its source agent has reported its migration


_SENDING = frozenset({MigrationStatus.ACTIVE, MigrationStatus.POSTCOPY_ACTIVE})
_SENT = frozenset({Phase.COMPLETED, Phase.DONE})
# How long the runner waits at most before it asks the dispatcher again (a move's progress
# may have moved a wake-up earlier).
_POLL_S = 0.5
# A move that shares its source with other moves of the job is asked for this share of the
# goal: the moves beside it (their streams in the link's queues, their compression, their
# destinations' CPU) lengthen QEMU's pause beyond its limit and what the guest feels beyond
# that pause. Evacuation lab, 30 Nov (6 multifd moves, 3-4 at once, 300 ms goal), worst felt:
# share 0.8 alone 372 ms (2 of 12 moves over the goal); 0.5 alone 351 ms (2 of 18 over: the
# guest felt 100-170 ms beyond QEMU's pause beside other moves, 50-70 ms alone); with each
# switchover's link to itself (MigrationOptions.switch_priority) 269 ms at 0.8 and 188 ms at
# 0.5 (18 moves each, none over), makespan 21.0-21.2 s in all three rounds of the latter. A
# lower limit costs these guests a pass or two more; their plans still count on the whole
# goal. Short goals keep 0.8 of theirs (SHORT_GOAL_SHARE) down to SHARED_FLOOR_GOAL_MS: half of
# a short goal would leave QEMU a limit of a few ms, which a busy guest may never get under.
SHARED_GOAL_SHARE = 0.5
SHORT_GOAL_SHARE = 0.8
SHARED_FLOOR_GOAL_MS = 100


def move_goal_ms(goal_ms: int, moves: int) -> int:
    """The downtime goal each of a job's ``moves`` is asked for when the job's is ``goal_ms``
    (see :data:`SHARED_GOAL_SHARE`); the job still judges each move by ``goal_ms``.

    >>> move_goal_ms(300, 6), move_goal_ms(150, 6), move_goal_ms(50, 6), move_goal_ms(300, 1)
    (150, 100, 40, 300)
    """
    if moves < 2:
        return goal_ms
    short = min(int(goal_ms * SHORT_GOAL_SHARE), SHARED_FLOOR_GOAL_MS)
    return max(1, int(goal_ms * SHARED_GOAL_SHARE), short)


def _mbps(cap_bps: float | None) -> int | None:
    """A cap in bytes/s as ``migrate``'s whole megabits/s (rounded down, at least 1)."""
    return None if cap_bps is None or math.isinf(cap_bps) else max(1, int(cap_bps * 8 / 1e6))


async def run_plan(
    cluster: Cluster,
    plan: JobPlan,
    store: JobStore,
    job: int,
    *,
    history: History | None,
    observer: JobObserver | None = None,
    now: Callable[[], float] | None = None,
    mover: Mover | None = None,
) -> JobResult:
    """Run every move of ``plan`` (recorded as job ``job`` of ``store``).

    Returns:
        Every move's outcome (a failed move is a result, not an exception).

    Raises:
        PlacementError: ``plan`` has VMs that cannot move.
        StateError: the dispatcher left moves that nothing will start.
    """
    plan.require_movable()
    loop = _Loop(cluster, plan, store, job, history, observer, now, mover or migrate)
    async with asyncio.TaskGroup() as group:
        loop.group = group
        loop.apply(group, loop.dispatcher.begin(0.0))
        while loop.running or loop.dispatcher.wake_s is not None:
            wake_s = loop.dispatcher.wake_s
            timeout = _POLL_S if wake_s is None else min(_POLL_S, wake_s - loop.elapsed())
            timeout = max(0.0, timeout)
            if loop.running:
                done, _ = await asyncio.wait(
                    [r.task for r in loop.running.values()],
                    timeout=timeout,
                    return_when=asyncio.FIRST_COMPLETED,
                )
            else:  # nothing runs: the dispatcher's wake-up is all there is to wait for
                await asyncio.sleep(timeout or 0.0)
                done = set()
            if not done:
                loop.apply(group, loop.dispatcher.tick(loop.elapsed()))
            for vm in sorted(n for n, r in loop.running.items() if r.task in done):
                loop.apply(group, loop.ended(vm))
    if loop.dispatcher.waiting:
        waiting = loop.dispatcher.waiting
        raise StateError("the job", f"stuck with {waiting} move(s) waiting", "progress")
    results = sorted(loop.results, key=lambda r: (r.start_s, r.move.name))
    return JobResult(job, plan, tuple(results))


class _Loop:
    """The state of :func:`run_plan`: the dispatcher, the moves running, those ended."""

    def __init__(
        self,
        cluster: Cluster,
        plan: JobPlan,
        store: JobStore,
        job: int,
        history: History | None,
        observer: JobObserver | None,
        now: Callable[[], float] | None,
        mover: Mover,
    ) -> None:
        self.cluster, self.plan, self.store, self.job = cluster, plan, store, job
        self.history, self.observer, self.mover = history, observer, mover
        self.clock = now or asyncio.get_running_loop().time
        self.began = self.clock()
        self.dispatcher = make_dispatcher(plan.request.policy, plan.model, plan.moves, plan.book)
        self.running: dict[VmName, _Running] = {}
        self.results: list[MoveResult] = []
        self.group: asyncio.TaskGroup | None = None

    def elapsed(self) -> float:
        return self.clock() - self.began

    def apply(self, group: asyncio.TaskGroup, actions: list[Action]) -> None:
        """Start the moves the dispatcher starts (as tasks of ``group``); note its caps."""
        for action in actions:
            if isinstance(action, SetCap):
                self.running[action.vm].caps.append((self.elapsed(), action.cap_bps))
                self._apply_cap(group, action.vm)
                continue
            at_s = self.elapsed()
            self.store.move_state(self.job, action.move.name, "running")
            if self.observer is not None:
                self.observer.started(action.move, action.cap_bps, at_s)
            task = group.create_task(
                _one_move(
                    self.mover,
                    self.cluster,
                    self.plan,
                    action,
                    (at_s, self.elapsed),
                    self.history,
                    self.progress,
                )
            )
            vm = self.plan.model.vm(action.move.name)
            hints = EtaHints(vm.zero_fraction, vm.dirty_rate_bps, vm.dirty_set_bytes)
            eta = EtaEstimator(hints, downtime_limit_ms=self.plan.request.max_downtime_ms)
            self.running[action.move.name] = _Running(
                action, at_s, task, eta, [(at_s, action.cap_bps)], _mbps(action.cap_bps)
            )

    def progress(self, vm: VmName, phase: Phase, stats: MigrationStats | None) -> None:
        """A move's progress: shown, learnt by the dispatcher (its time left, its links free
        once QEMU completed), and the cap it was given while it set up applied once it sends."""
        if self.observer is not None:
            self.observer.progress(vm, phase, stats)
        running = self.running.get(vm)
        if running is None:
            return
        actions: list[Action] = []
        if stats is not None:
            running.eta.add(stats)
            eta_ms = running.eta.eta_ms()
            left_s = None if eta_ms is None else eta_ms / 1000
            sends = stats.stage is Stage.MIGRATION and stats.status in _SENDING
            rate_bps = float(stats.throughput_bps) if sends else None
            actions = self.dispatcher.progress(vm, self.elapsed(), left_s, rate_bps)
        if phase in _SENT:  # its links are free while its guest is checked
            actions += self.dispatcher.released(vm, self.elapsed())
        if self.group is None:
            return
        if stats is not None and not running.sending:
            running.sending = True
            self._apply_cap(self.group, vm)
        self.apply(self.group, actions)

    def _apply_cap(self, group: asyncio.TaskGroup, vm: VmName) -> None:
        """Have ``vm``'s source agent apply its latest cap, if it sends and the cap changed."""
        running = self.running[vm]
        wanted = _mbps(running.caps[-1][1])
        if not running.sending or wanted is None or wanted == running.applied_mbps:
            return
        running.applied_mbps = wanted
        agent = self.cluster.client(running.start.move.source)
        group.create_task(_set_cap(agent, vm, wanted))

    def ended(self, vm: VmName) -> list[Action]:
        """``vm``'s move ended: record it, tell the dispatcher; what it does next."""
        opened = self.running.pop(vm)
        result = _with_caps(opened.task.result(), opened.caps)
        self.results.append(result)
        state = "completed" if result.ok else "failed"
        self.store.move_state(self.job, vm, state, result.to_json(None))
        if self.observer is not None:
            self.observer.ended(result)
        return self.dispatcher.finished(vm, self.elapsed())


async def _set_cap(agent: AgentPort, vm: VmName, cap_mbps: int) -> None:
    """Apply a cap to a move in flight; a refusal (it just ended, its agent is busy) is
    logged, and the move goes on at the cap it has."""
    try:
        await agent.set_migration_cap(vm, cap_mbps * 1_000_000 // 8)
    except FerryError as err:
        logger.warning("job.cap_not_applied %s %d Mbit/s: %s", vm, cap_mbps, err)
    else:
        logger.info("job.cap %s %d Mbit/s", vm, cap_mbps)


def _with_caps(result: MoveResult, caps: list[tuple[float, float | None]]) -> MoveResult:
    return MoveResult(
        result.move, result.start_s, result.end_s, tuple(caps), result.report, result.error
    )


async def _one_move(
    mover: Mover,
    cluster: Cluster,
    plan: JobPlan,
    start: Start,
    times: tuple[float, Callable[[], float]],
    history: History | None,
    on_progress: Callable[[VmName, Phase, MigrationStats | None], None],
) -> MoveResult:
    """One move to its result; an error before it started is its result (the job goes on
    with the others)."""
    move = start.move
    start_s, elapsed = times
    request = MigrationRequest(
        vm=move.name,
        destination=move.destination,
        # Planned hybrid or multifd runs as planned; pre-copy as "auto", which keeps the way
        # to post-copy open should it stall.
        strategy=start.strategy if start.strategy in ("hybrid", "multifd") else "auto",
        max_downtime_ms=move_goal_ms(plan.request.max_downtime_ms, len(plan.moves)),
        bandwidth_mbps=_mbps(start.cap_bps),
        force=True,  # planned as feasible: the job goes ahead with the best at its share
        switch_priority=len(plan.moves) > 1,
    )

    def progress(phase: Phase, stats: MigrationStats | None) -> None:
        on_progress(move.name, phase, stats)

    try:
        report = await mover(cluster, request, history=history, on_progress=progress)
    except FerryError as err:  # refused before anything started: the VM stays where it was
        logger.error("job.move_refused %s: %s", move.name, err)
        return MoveResult(move, start_s, elapsed(), (), None, str(err))
    return MoveResult(move, start_s, elapsed(), (), report, None)
