"""The runner of the migration state machine: carries out its actions on two agents.

Every decision is :class:`vmferry.core.machine.MigrationMachine`'s; this module only turns its
requests into agent calls and the answers (or errors) into events, with an injectable clock.
``vmferry migrate``, ``vmferry reconcile`` (``follow``), the in-process lab and the benches all
run this one engine.

An interrupt (Ctrl-C, a deadline around the call) becomes the machine's ``Interrupted`` event;
the machine then winds the move down (cancel, or finish a switch that already happened) and the
runner carries that out shielded before the interrupt goes on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Protocol

from vmferry.agent.api import VmInfo
from vmferry.agent.port import AgentPort
from vmferry.controller.cluster import Cluster, spec_of
from vmferry.controller.history import History
from vmferry.controller.plan import Plan
from vmferry.controller.request import STRATEGIES, MigrationRequest, planned, precheck
from vmferry.controller.sides import Sides, drop_unstarted
from vmferry.core.machine import MigrationMachine
from vmferry.core.migration import (
    AbortDestination,
    Action,
    CancelSource,
    Conclude,
    Event,
    Instant,
    Interrupted,
    Move,
    Notify,
    StartPostcopy,
)
from vmferry.core.model import (
    EarlierAttempt,
    Mechanism,
    MigrationOptions,
    MigrationReport,
    MigrationStats,
)
from vmferry.core.phases import Phase
from vmferry.core.predict import StrategyPrediction
from vmferry.core.retry import retry_as

__all__ = [
    "STRATEGIES",
    "Clock",
    "LoopClock",
    "MigrationRequest",
    "ProgressCallback",
    "drop_unstarted",
    "follow",
    "migrate",
    "run",
]

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[Phase, MigrationStats | None], None]


class Clock(Protocol):
    """The runner's time: readings for the machine, and sleeping (tests inject their own)."""

    def now(self) -> Instant: ...

    async def sleep(self, seconds: float) -> None: ...


class LoopClock:
    """The event loop's monotonic clock and the wall clock (guest heartbeats use it)."""

    def now(self) -> Instant:
        return Instant(asyncio.get_running_loop().time(), time.time() * 1000)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


async def migrate(
    cluster: Cluster,
    request: MigrationRequest,
    *,
    history: History | None = None,
    on_progress: ProgressCallback | None = None,
    on_plan: Callable[[Plan], None] | None = None,
    clock: Clock | None = None,
) -> MigrationReport:
    """Migrate a VM between two hosts of ``cluster`` and verify it on arrival (``on_plan``
    sees the pre-flight's plan, if one was made).

    Returns the report (also recorded in ``history``); a failed migration is a report with
    status ``failed``, not an exception.

    Raises:
        ConfigError: bad request, unknown VM or host, no room on the destination.
        StateError: the VM is not in a state to migrate (e.g. already migrating).
        FerryError: an agent became unreachable before anything started.
    """
    request.resolve()  # bad options are refused before anything is measured
    info, source, destination = await precheck(cluster, request)
    plans: list[Plan] = []

    def seen(plan: Plan) -> None:
        plans.append(plan)
        if on_plan is not None:
            on_plan(plan)

    strategy, options, prediction = await planned(cluster, request, info, history, seen)
    attempt = _Attempt(cluster, info, source, destination, clock or LoopClock(), history)
    report, machine = await attempt.run(request, strategy, options, prediction, on_progress)
    retry = None
    if request.strategy == "auto" and plans and machine.replan_cancelled is not None:
        retry = retry_as(strategy, plans[0].predictions, request.goal, report.total_ms)
    if retry is None or report.running_on != info.host:
        return report
    logger.warning("migration.retry %s: %s", info.name, retry.reason)
    deadline_ms = retry.goal.deadline_ms
    again = replace(request, deadline_s=None if deadline_ms is None else deadline_ms / 1000)
    mechanism, options = again.resolve(retry.prediction.strategy)
    second, _ = await attempt.run(again, mechanism, options, retry.prediction, on_progress)
    earlier = EarlierAttempt(report.strategy, report.total_ms, report.error)
    return replace(second, retried_from=earlier)


class _Attempt:
    """One VM's migration attempts between the same two hosts (``auto`` may retry once)."""

    def __init__(
        self,
        cluster: Cluster,
        info: VmInfo,
        source: AgentPort,
        destination: AgentPort,
        clock: Clock,
        history: History | None,
    ) -> None:
        self.info, self.source, self.destination = info, source, destination
        self.clock, self.history = clock, history

    async def run(
        self,
        request: MigrationRequest,
        strategy: Mechanism,
        options: MigrationOptions,
        prediction: StrategyPrediction | None,
        on_progress: ProgressCallback | None,
    ) -> tuple[MigrationReport, MigrationMachine]:
        """Run one attempt to its report (recorded in the history)."""
        move = Move(
            vm=self.info.name,
            source=self.info.host,
            destination=request.destination,
            strategy=strategy,
            goal=request.goal,
            recovery=request.recovery,
            uses_postcopy=options.uses_postcopy,
            prediction=prediction,
            tls=options.tls,
            verify=request.verify,
            held=options.hold,
        )
        started_at = datetime.now(UTC)
        sides = Sides(self.source, self.destination, spec_of(self.info), options)
        machine = MigrationMachine(move)
        report = await run(machine, sides, self.clock, on_progress)
        if self.history is not None:
            self.history.record(report, started_at)
        return report, machine


async def follow(
    source: AgentPort,
    destination: AgentPort | None,
    move: Move,
    clock: Clock | None = None,
) -> tuple[MigrationReport, str | None]:
    """Follow a migration already in flight to QEMU's outcome, recovering a broken post-copy
    on the way (``vmferry reconcile``; ``move.mode`` is ``FOLLOW``).

    Args:
        destination: its destination's agent; None when no host holds a copy (a broken
            post-copy then cannot be recovered: the guest is lost).

    Returns:
        The report and the host whose QEMU died during post-copy, if one did.
    """
    machine = MigrationMachine(move)
    report = await run(machine, Sides(source, destination), clock or LoopClock())
    return report, machine.lost_host


async def run(
    machine: MigrationMachine,
    sides: Sides,
    clock: Clock,
    on_progress: ProgressCallback | None = None,
) -> MigrationReport:
    """Run ``machine`` to its report, carrying out its actions on ``sides``."""
    try:
        await _drive(machine, machine.start(clock.now()), sides, clock, on_progress)
    except asyncio.CancelledError:
        # Wind the move down (shielded), then let the interrupt go on.
        actions = machine.handle(Interrupted(), clock.now())
        await asyncio.shield(_drive(machine, actions, sides, clock, on_progress))
        logger.warning("migration.interrupted %s: %s", machine.move.vm, machine.report)
        raise
    assert machine.report is not None
    return machine.report


async def _drive(
    machine: MigrationMachine,
    actions: list[Action],
    sides: Sides,
    clock: Clock,
    on_progress: ProgressCallback | None,
) -> None:
    """Carry out actions and feed back answers until the machine concludes."""
    name = machine.move.vm
    while (event := await _carry_out(actions, name, sides, clock, on_progress)) is not None:
        actions = machine.handle(event, clock.now())


async def _carry_out(
    actions: list[Action],
    name: str,
    sides: Sides,
    clock: Clock,
    on_progress: ProgressCallback | None,
) -> Event | None:
    """The effects, then the request's answer (None once the machine concluded)."""
    for action in actions:
        match action:
            case Notify(phase=phase, stats=stats):
                if on_progress is not None:
                    on_progress(phase, stats)
            case Conclude():
                return None
            case StartPostcopy() | CancelSource() | AbortDestination():
                await sides.apply(action, name)
            case _:
                return await sides.answer(action, name, clock.sleep)
    raise AssertionError(f"no request among {actions}")
