"""The end of a completed migration (pure): compare both copies, start the guest on the
destination, or take it back on the source; then hand off.

States and the events that move them (see :mod:`vmferry.core.machine` for the rest)::

    completed pre-copy, held destination --> Comparing --equal--> Arriving
    Comparing --differ / could not compare--> Dropping --> Resuming --> Done
    Arriving --Arrived--> HandingOff --HandedOff--> Done
    Arriving --ArrivalFailed--> Dropping --> Resuming --> Done (post-copy: Done at once)

Only a pre-copy can be compared: both QEMUs are stopped, the source in ``postmigrate``, the
destination held before it runs. After post-copy the guest already ran on the destination, and
the report says so.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from vmferry.core.errors import StateError
from vmferry.core.handoff import HandoffVerdict, VerifyMode
from vmferry.core.migration import (
    Action,
    AgentLost,
    ArrivalFailed,
    Arrived,
    CompareCopies,
    CompareFailed,
    CopiesCompared,
    DestinationDropped,
    DropDestination,
    Event,
    FinishDestination,
    HandedOff,
    Handoff,
    Instant,
    Interrupted,
    Move,
    Notify,
    ResumeSource,
    SourceResumed,
    SourceResumeFailed,
    Tick,
    Wait,
)
from vmferry.core.migration_state import (
    Arriving,
    Comparing,
    Done,
    Dropping,
    HandingOff,
    Resuming,
    State,
)
from vmferry.core.phases import Phase
from vmferry.core.report import Reporter, arrival_failed

__all__ = ["ArrivalSteps", "EndingState", "describe_difference"]

logger = logging.getLogger(__name__)

EndingState = Comparing | Arriving | Dropping | Resuming | HandingOff
Step = tuple[State, list[Action]]


def describe_difference(verdict: HandoffVerdict) -> str:
    """One sentence on where the copies differ (the report's error)."""
    parts = []
    for check in (verdict.ram, verdict.disk):
        if check is None or check.ok:
            continue
        where = ", ".join(
            f"{r.start_bytes >> 20}-{-(-r.end_bytes >> 20)} MiB" for r in check.differing_ranges
        )
        parts.append(
            f"{check.differing_chunks} of {check.chunks_compared} {check.kind} chunks differ "
            f"(at {where})"
        )
    return "the copies differ: " + "; ".join(parts)


class ArrivalSteps:
    """The steps after QEMU completed, for :class:`~vmferry.core.machine.MigrationMachine`."""

    def __init__(self, move: Move, reporter: Reporter) -> None:
        self.move = move
        self._report = reporter

    def begin(self, arriving: Arriving) -> Step:
        """QEMU completed: compare both copies if the move can, else start the destination."""
        completed = Notify(Phase.COMPLETED, arriving.final)
        if self.move.compares and not arriving.postcopy:
            timeout_s = self.move.timing.compare_s
            return Comparing(arriving), [completed, CompareCopies(self.move.verify, timeout_s)]
        return replace(arriving, handoff=self._skipped(arriving)), [completed, FinishDestination()]

    def _skipped(self, arriving: Arriving) -> HandoffVerdict:
        mode = self.move.verify
        if arriving.postcopy:
            note = (
                "not compared: after post-copy the guest already ran on the destination "
                "before all its memory was there (its own check, or its guest agent, vouches)"
            )
        elif mode is VerifyMode.OFF:
            note = "not compared (--verify off)"
        else:
            note = "not compared: the destination was not held (post-copy was kept possible)"
        return HandoffVerdict(mode, None, None, note)

    def step(self, state: EndingState, event: Event, now: Instant) -> Step:
        match state, event:
            case Comparing(), _:
                return self._comparing(state, event)
            case Arriving(), _:
                return self._arriving(state, event, now)
            case Dropping(arriving=a), DestinationDropped(ok=True):
                return Resuming(a, state.error), [ResumeSource()]
            case Dropping(arriving=a), DestinationDropped(ok=False):
                return Done(arrival_failed(self._report, a, state.error, now)), []
            case Resuming(arriving=a), SourceResumed(integrity=integrity):
                return Done(self._report.taken_back(a, state.error, integrity, now)), []
            case Resuming(arriving=a), SourceResumeFailed(error=error):
                why = f"{state.error}; taking the guest back failed: {error}"
                return Done(arrival_failed(self._report, a, why, now)), []
            case HandingOff(), HandedOff(error=error):
                return Done(self._report.completed(state.arriving, state.arrived, error)), []
            case ((Dropping() | Resuming() | HandingOff()), Interrupted()):
                # Nearly done: the interrupted request is asked again and the ending finished
                # (the runner shields it).
                return state, [_again(state)]
        raise StateError("migration", type(state).__name__, f"no {type(event).__name__}")

    def _comparing(self, state: Comparing, event: Event) -> Step:
        arriving = state.arriving
        match event:
            case CopiesCompared(verdict=verdict) if verdict.ok:
                return replace(arriving, handoff=verdict), [FinishDestination()]
            case CopiesCompared(verdict=verdict):
                why = describe_difference(verdict)
                logger.error("migration.handoff_differs %s: %s", self.move.vm, why)
                return Dropping(replace(arriving, handoff=verdict), why), [DropDestination()]
            case CompareFailed(error=error) | AgentLost(error=error):
                why = f"the copies could not be compared ({error})"
                logger.error("migration.handoff_unchecked %s: %s", self.move.vm, why)
                return Dropping(arriving, why), [DropDestination()]
            case Tick() | Interrupted():
                return state, [CompareCopies(self.move.verify, self.move.timing.compare_s)]
        raise StateError("migration", "Comparing", f"no {type(event).__name__}")

    def _arriving(self, state: Arriving, event: Event, now: Instant) -> Step:
        timing = self.move.timing
        match event:
            case Arrived():
                flow = replace(state.flow, phase=Phase.DONE)
                arriving = replace(state, flow=flow)
                return HandingOff(arriving, event), [Notify(Phase.DONE, state.final), Handoff()]
            case AgentLost(side="destination", error=error):
                # The guest runs there meanwhile; a restarted agent keeps the VM incoming.
                away = state.away_since_s if state.away_since_s is not None else now.mono_s
                if now.mono_s - away <= timing.agent_return_s:
                    logger.warning("migration.destination_unreachable %s: %s", self.move.vm, error)
                    return replace(state, away_since_s=away), [Wait(timing.agent_retry_s)]
                return self._arrival_failed(state, error, now)
            case ArrivalFailed(error=error):
                return self._arrival_failed(state, error, now)
            case Tick() | Interrupted():
                return state, [FinishDestination()]  # (interrupted: asked again, shielded)
        raise StateError("migration", "Arriving", f"no {type(event).__name__}")

    def _arrival_failed(self, state: Arriving, error: str, now: Instant) -> Step:
        logger.error("migration.arrival_failed %s: %s", self.move.vm, error)
        if state.postcopy:
            return Done(arrival_failed(self._report, state, error, now)), []
        # Before post-copy the source holds the complete, current guest: if the destination
        # never ran it (the agent refuses to drop a copy that did), take the guest back.
        return Dropping(state, error), [DropDestination()]


def _again(state: Dropping | Resuming | HandingOff) -> Action:
    """The request an ending state waits for (asked again after an interrupt)."""
    again: dict[type, Action] = {
        Dropping: DropDestination(),
        Resuming: ResumeSource(),
        HandingOff: Handoff(),
    }
    return again[type(state)]
