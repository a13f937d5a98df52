"""The migration as a pure state machine: events in, actions out (vocabulary in
:mod:`vmferry.core.migration`).

Every decision of a move lives here (stall, re-plan, hybrid switch, post-copy recovery and its
backoff, agent-lost grace, rollback, what each ending reports), under one rule: at every moment
exactly one intact copy of the guest runs (README, "Architecture: one migration engine").

Each state carries its own data. States and the events that move them::

    Preparing --DestinationPrepared--> Starting --SourceStarted--> Precopy
    Precopy --Progressed(postcopy status)--> Postcopy --broken--> Recovering --ok--> Postcopy
    Precopy --stall / re-plan cancel / handover failed--> Cancelling
    Precopy|Postcopy|Cancelling --outcome completed--> Arriving --Arrived--> HandingOff --> Done
    ... --outcome failed/cancelled--> Concluding --SidesChecked--> Done
    Arriving --ArrivalFailed--> Dropping --> Resuming --> Done
    (a held pre-copy is compared first: Comparing --equal--> Arriving; see core/arrival.py)
    any copying state --Interrupted--> Winding (no new decisions; ends as above)

Example:
    >>> from vmferry.core.strategy import Goal
    >>> m = MigrationMachine(Move("vm1", "host-1", "host-2", "precopy", Goal(300)))
    >>> m.start(Instant(0.0, 0.0))
    [Notify(phase=<Phase.PREPARING: 'preparing'>, stats=None), PrepareDestination()]
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import replace

from vmferry.core.arrival import ArrivalSteps
from vmferry.core.errors import StateError
from vmferry.core.migration import (
    AbortDestination,
    Action,
    AgentLost,
    CancelSource,
    CheckSides,
    Conclude,
    DestinationFailed,
    DestinationPrepared,
    Event,
    HandOverDisk,
    HandoverDone,
    HandoverFailed,
    IncomingStatus,
    Instant,
    Interrupted,
    Mode,
    Move,
    NotBroken,
    Notify,
    Poll,
    PrepareDestination,
    Progressed,
    QueryIncoming,
    RecoverPostcopy,
    RecoveryTried,
    SidesChecked,
    SourceOutcome,
    SourceStarted,
    SourceStartFailed,
    StartPostcopy,
    StartSource,
    Tick,
    Wait,
)
from vmferry.core.migration_state import (
    Arriving,
    Cancelling,
    Comparing,
    Concluding,
    Done,
    Dropping,
    Flow,
    HandingOff,
    Postcopy,
    Precopy,
    Preparing,
    Recovering,
    Resuming,
    Starting,
    State,
    Winding,
    is_postcopy,
)
from vmferry.core.model import MigrationReport, MigrationStats
from vmferry.core.phases import Phase, QemuStatus, transition
from vmferry.core.report import (
    Reporter,
    lost_in_postcopy,
    rolled_back,
    split_postcopy,
)
from vmferry.core.status import MigrationStatus, Stage
from vmferry.core.strategy import Action as ReplanAction
from vmferry.core.strategy import Progress, replan

__all__ = ["MigrationMachine"]

Step = tuple[State, list[Action]]

logger = logging.getLogger(__name__)

# A recovery that finds the post-copy not broken (QEMU inside its switch, or its link still
# carrying it) waits again (each wait is ``Timing.postcopy_switch_s`` of allowed quiet); past
# this many it recovers as for a break.
_QUIET_WAITS = 5


class MigrationMachine:
    """One migration's state machine. Feed it the answers to its requests; it never blocks.

    Raises (from ``handle``):
        StateError: an event that is no answer to the request outstanding (a runner bug).
    """

    def __init__(self, move: Move) -> None:
        self.move = move
        self.state: State = Preparing()
        self._report = Reporter(move)
        self._arrival = ArrivalSteps(move, self._report)
        # The host whose QEMU died during post-copy (the guest is then lost), if one did.
        self.lost_host: str | None = None
        # Why a re-plan cancelled the move mid-flight (the guest then runs on the source).
        self.replan_cancelled: str | None = None

    @property
    def is_done(self) -> bool:
        return isinstance(self.state, Done)

    @property
    def report(self) -> MigrationReport | None:
        return self.state.report if isinstance(self.state, Done) else None

    def start(self, now: Instant) -> list[Action]:
        """The first actions: prepare the destination (or, following, poll the source)."""
        self._report.started = now
        flow = Flow(Phase.PREPARING, now.mono_s, self.move.first_attempt)
        if self.move.mode is Mode.FOLLOW:
            self.state = Precopy(replace(flow, phase=Phase.SETUP))
            return [self._poll(flow, postcopy=False)]
        return [Notify(Phase.PREPARING, None), PrepareDestination()]

    def handle(self, event: Event, now: Instant) -> list[Action]:
        """The actions that follow ``event`` (effects first, then exactly one request)."""
        self.state, actions = self._step(self.state, event, now)
        if isinstance(self.state, Done):
            actions.append(Conclude(self.state.report))
        return actions

    def _step(self, state: State, event: Event, now: Instant) -> Step:
        match state, event:
            case Done(), _:
                raise StateError("migration", "done", "a migration in progress")
            case ((Preparing() | Starting()), _):
                return self._setup(state, event, now)
            case ((Precopy() | Cancelling() | Postcopy() | Winding()), Progressed()):
                return self._progressed(state, event, now)
            case ((Precopy() | Cancelling() | Postcopy() | Winding()), _):
                return self._copying(state, event, now)
            case Recovering(), _:
                return self._recovering(state, event, now)
            case _:
                return self._ending(state, event, now)

    def _unexpected(self, state: State, event: Event) -> StateError:
        return StateError("migration", type(state).__name__, f"no {type(event).__name__}")

    def _setup(self, state: State, event: Event, now: Instant) -> Step:
        flow = Flow(Phase.SETUP, now.mono_s, self.move.first_attempt)
        match state, event:
            case Preparing(), DestinationPrepared():
                return Starting(), [StartSource()]
            case Preparing(), DestinationFailed(error=error):
                # The guest never left the source; the destination's leftovers are reconcile's.
                logger.error("migration.destination_failed %s: %s", self.move.vm, error)
                why = f"the destination on {self.move.destination} could not be prepared: {error}"
                return Concluding(flow, SourceOutcome("failed", error), False, why), [self._check()]
            case Starting(), SourceStarted():
                return Precopy(flow), [Notify(Phase.SETUP, None), self._poll(flow, False)]
            case Starting(), SourceStartFailed(error=error):
                logger.error("migration.not_started %s: %s", self.move.vm, error)
                why = f"could not start the migration on {self.move.source}: {error}"
                state = Concluding(flow, SourceOutcome("failed", error), False, why)
                return state, [AbortDestination(), self._check()]
            case ((Preparing() | Starting()), Interrupted()):
                report = self._report.build(flow, now, status="cancelled", error="interrupted")
                return Done(report), [AbortDestination()]
        raise self._unexpected(state, event)

    def _progressed(
        self, state: Precopy | Cancelling | Postcopy | Winding, event: Progressed, now: Instant
    ) -> Step:
        flow = replace(state.flow, since=event.next_since)
        effects: list[Action] = []
        synced = False
        for stats in event.samples:
            flow = self._absorb(flow, stats, now)
            synced = synced or stats.stage is Stage.DISK_SYNCED
            effects.append(Notify(flow.phase, stats))
        seen_postcopy = any(stats.status.is_postcopy for stats in event.samples)
        if isinstance(state, Precopy | Cancelling) and seen_postcopy:
            state = Postcopy(flow)  # the destination owns the guest from now on
        elif isinstance(state, Winding):
            state = replace(state, flow=flow, postcopy=state.postcopy or seen_postcopy)
        elif isinstance(state, Precopy | Cancelling):
            state = replace(state, flow=flow, away_since_s=None)
        else:
            state = replace(state, flow=flow)
        if event.outcome is not None:
            new_state, actions = self._outcome(state, event.outcome, now)
            return new_state, effects + actions
        if isinstance(state, Precopy) and synced and not state.handed_over:
            state = replace(state, handed_over=True, handing_over=True)
            return state, [*effects, HandOverDisk()]
        new_state, actions = self._decide(state, now)
        return new_state, effects + actions

    def _absorb(self, flow: Flow, stats: MigrationStats, now: Instant) -> Flow:
        """One sample into the flow: progress marks, the phase shown, the re-plan history."""
        flow = replace(flow, last=stats)
        if stats.stage is Stage.DISK_COPY:
            flow = replace(flow, disk_ms=stats.total_ms)
            if stats.disk_copied_bytes != flow.disk_sent_bytes:
                flow = replace(
                    flow, disk_sent_bytes=stats.disk_copied_bytes, progress_at_s=now.mono_s
                )
            return flow
        if stats.stage is Stage.DISK_SYNCED:
            return flow
        if stats.status == MigrationStatus.POSTCOPY_ACTIVE and flow.postcopy_from_bytes is None:
            # The switch is under way: the quiet clock starts (Flow.postcopy_moving, is_broken).
            flow = replace(
                flow, postcopy_from_bytes=stats.transferred_bytes, progress_at_s=now.mono_s
            )
        if stats.transferred_bytes != flow.sent_bytes:
            flow = replace(flow, sent_bytes=stats.transferred_bytes, progress_at_s=now.mono_s)
        phase = flow.phase
        if stats.status not in (MigrationStatus.FAILED, MigrationStatus.CANCELLED):
            # QEMU may repeat an older status once; the phase shown never goes back.
            with contextlib.suppress(StateError):
                phase = transition(phase, QemuStatus(stats.status))
        # The re-plan's deadline counts from before the disk copy, QEMU's clock from after.
        sample = Progress.from_stats(replace(stats, total_ms=stats.total_ms + flow.disk_ms))
        return replace(flow, phase=phase, progress=(*flow.progress, sample))

    def _decide(self, state: Precopy | Cancelling | Postcopy | Winding, now: Instant) -> Step:
        flow = state.flow
        match state:
            case Postcopy() if state.is_broken(now.mono_s, self.move.timing):
                return self._begin_recovery(flow, now)
            case Winding(postcopy=True) if flow.is_broken(now.mono_s, self.move.timing):
                why = "interrupted while the post-copy was broken: run `vmferry reconcile`"
                return self._done_failed(flow, why, now, alive=False, running_on_destination=True)
            case Precopy() if self.move.mode is Mode.MIGRATE and flow.quiet_s(now.mono_s) > (
                self.move.timing.precopy_stall_s
            ):
                why = (
                    f"{_what(flow)} sent nothing for {self.move.timing.precopy_stall_s:g} s (link "
                    f"down? destination gone?): cancelled; the guest stays on {self.move.source}"
                )
                logger.warning("migration.stalled %s: cancelling", self.move.vm)
                return self._cancel(flow, why)
            case Precopy() if self._should_check(state, now):
                # Quiet for a while: a dead destination QEMU is noticed now, not at the stall.
                state = replace(state, checking=True, checked_at_s=flow.progress_at_s)
                return state, [self._check()]
            case Precopy():
                return self._replan(state, now)
        return state, [self._poll(flow, isinstance(state, Postcopy))]

    def _should_check(self, state: Precopy, now: Instant) -> bool:
        quiet_s = state.flow.quiet_s(now.mono_s)
        return (
            self.move.mode is Mode.MIGRATE
            and quiet_s >= self.move.timing.quiet_check_s
            and state.checked_at_s != state.flow.progress_at_s  # once per quiet spell
        )

    def _checked(self, state: Precopy, event: SidesChecked) -> Step:
        flow = state.flow
        if not event.destination_dead:
            return replace(state, checking=False), [self._poll(flow, False)]
        why = (
            f"the destination QEMU on {self.move.destination} died during {_what(flow)}: "
            f"cancelled; the guest stays on {self.move.source}"
        )
        logger.warning("migration.destination_died %s: cancelling", self.move.vm)
        return self._cancel(flow, why)

    def _replan(self, state: Precopy, now: Instant) -> Step:
        """Re-plan against the goal (switch to post-copy, or cancel) and hybrid's switch."""
        move, flow, last = self.move, state.flow, state.flow.last
        effects: list[Action] = []
        in_ram = last is not None and last.stage is Stage.MIGRATION
        if move.prediction is not None and move.mode is Mode.MIGRATE and in_ram:
            # A move that cannot switch to post-copy is never cancelled for what a switch
            # would cost the guest: it runs on to its deadline as the user asked.
            goal = move.goal if move.uses_postcopy else replace(move.goal, best_effort=True)
            decision = replan(move.strategy, flow.progress, move.prediction, goal)
            if decision.action is ReplanAction.CANCEL:
                logger.warning("migration.replan %s: %s", move.vm, decision.reason)
                self.replan_cancelled = decision.reason
                return self._cancel(flow, decision.reason)
            switch = decision.action is ReplanAction.SWITCH_TO_POSTCOPY and move.uses_postcopy
            if switch and not state.switch_requested:
                logger.info("migration.replan %s: %s", move.vm, decision.reason)
                state = replace(state, switch_requested=True)
                effects.append(StartPostcopy())
        hybrid_due = (
            move.strategy == "hybrid"
            and last is not None
            and last.status == MigrationStatus.ACTIVE
            and last.iterations >= move.timing.hybrid_switch_iteration
        )
        if hybrid_due and not state.switch_requested:
            state = replace(state, switch_requested=True)
            effects.append(StartPostcopy())
        return state, [*effects, self._poll(flow, False)]

    def _copying(
        self, state: Precopy | Cancelling | Postcopy | Winding, event: Event, now: Instant
    ) -> Step:
        flow = state.flow
        match state, event:
            case _, AgentLost(side="source", error=error):
                return self._source_lost(state, error, now)
            case Postcopy(asking_destination=True), IncomingStatus(status=status):
                return self._incoming_answer(state, status, now)
            case Precopy(checking=True), SidesChecked():
                return self._checked(state, event)
            case Precopy(handing_over=True), HandoverDone():
                state = replace(state, handing_over=False)
                return state, [self._poll(flow, False)]
            case Precopy(handing_over=True), HandoverFailed(error=error):
                logger.error("migration.handover_failed %s: %s", self.move.vm, error)
                return self._cancel(flow, f"disk handover failed: {error}")
            case _, Tick():
                return state, [self._poll(flow, isinstance(state, Postcopy))]
            case Winding(), Interrupted():
                return state, [self._poll(flow, state.postcopy)]
            case ((Precopy() | Cancelling() | Postcopy()), Interrupted()):
                return self._interrupt(state, now)
        raise self._unexpected(state, event)

    def _interrupt(self, state: Precopy | Cancelling | Postcopy, now: Instant) -> Step:
        flow, postcopy = state.flow, isinstance(state, Postcopy)
        if self.move.mode is Mode.FOLLOW:
            return self._done_unknown(flow, "interrupted before the migration ended", now)
        effects: list[Action] = []
        if isinstance(state, Precopy):
            effects.append(CancelSource())
        return Winding(flow, postcopy), [*effects, self._poll(flow, postcopy)]

    def _source_lost(
        self, state: Precopy | Cancelling | Postcopy | Winding, error: str, now: Instant
    ) -> Step:
        # The next answer may come from a restarted agent, which numbers samples anew.
        flow = replace(state.flow, since=0)
        timing = self.move.timing
        if isinstance(state, Postcopy):
            # Broken link, or only the source's agent gone? The destination's QEMU knows.
            state = replace(state, flow=flow, asking_destination=True)
            return state, [QueryIncoming(timing.recovery_call_timeout_s)]
        if isinstance(state, Winding):
            why = f"interrupted, and {self.move.source}'s agent stopped answering ({error})"
            return self._done_unknown(flow, why, now)
        # QEMU goes on without its agent; a restarted agent settles the migration and answers
        # with its outcome. Wait for it a while.
        away = state.away_since_s if state.away_since_s is not None else now.mono_s
        if now.mono_s - away > timing.agent_return_s:
            why = (
                f"{self.move.source}'s agent did not answer for {timing.agent_return_s:g} s "
                f"({error}): the migration's outcome is unknown. Restart the agent and run "
                "`vmferry reconcile`."
            )
            return self._done_unknown(flow, why, now)
        logger.warning("migration.source_unreachable %s: %s", self.move.vm, error)
        return replace(state, flow=flow, away_since_s=away), [Wait(timing.agent_retry_s)]

    def _incoming_answer(
        self, state: Postcopy, status: MigrationStatus | None, now: Instant
    ) -> Step:
        state = replace(state, asking_destination=False)
        flow = state.flow
        if status == MigrationStatus.COMPLETED:
            logger.warning("migration.completed_without_source_agent %s", self.move.vm)
            return self._outcome(state, SourceOutcome("completed", stats=flow.last), now)
        if status == MigrationStatus.POSTCOPY_ACTIVE:
            logger.warning("migration.source_agent_away %s: post-copy runs", self.move.vm)
            flow = replace(flow, progress_at_s=now.mono_s)
            return replace(state, flow=flow), [Wait(self.move.timing.agent_retry_s)]
        # The source is behind a broken link too: the stall check starts a recovery.
        return self._decide(state, now)

    def _begin_recovery(self, flow: Flow, now: Instant) -> Step:
        last = flow.last
        broke = last.status if last is not None and flow.is_postcopy_broken else "stalled"
        logger.warning("migration.postcopy_broken %s: %s", self.move.vm, broke)
        shown = None if last is None else replace(last, status=MigrationStatus.POSTCOPY_PAUSED)
        state = Recovering(flow, began_s=now.mono_s)
        return state, [Notify(flow.phase, shown), self._attempt(state)]

    def _attempt(self, state: Recovering) -> RecoverPostcopy:
        return RecoverPostcopy(state.flow.attempt, self.move.timing.recovery_call_timeout_s)

    def _recovering(self, state: Recovering, event: Event, now: Instant) -> Step:
        flow = state.flow
        match event:
            case RecoveryTried(ok=True):
                flow = replace(
                    flow,
                    attempt=flow.attempt + 1,
                    recoveries=flow.recoveries + 1,
                    progress_at_s=now.mono_s,
                )
                took_s = now.mono_s - state.began_s
                logger.info(
                    "migration.recovered %s in %.1f s (recovery %d)",
                    self.move.vm,
                    took_s,
                    flow.recoveries,
                )
                grace = now.mono_s + self.move.timing.recovery_grace_s
                return Postcopy(flow, grace_until_s=grace), [self._poll(flow, True)]
            case NotBroken(why=why) if flow.quiet_waits < _QUIET_WAITS:
                # Quiet, not broken: the allowance of a switch starts again from here.
                logger.warning(
                    "migration.postcopy_not_broken %s: %s; waiting (not paused)", self.move.vm, why
                )
                flow = replace(
                    flow,
                    progress_at_s=now.mono_s,
                    postcopy_from_bytes=flow.sent_bytes,
                    quiet_waits=flow.quiet_waits + 1,
                )
                return Postcopy(flow), [self._poll(flow, True)]
            case NotBroken():
                why = "the post-copy stayed quiet though nothing looked broken"
                return self._recovering(state, RecoveryTried(ok=False, error=why), now)
            case RecoveryTried(error=error):
                logger.info(
                    "migration.recover_attempt %s #%d: %s", self.move.vm, flow.attempt, error
                )
                flow = replace(flow, attempt=flow.attempt + 1)
                state = replace(state, flow=flow, checking=True)
                return state, [self._check()]
            case SidesChecked() if (dead := self._note_dead(event)) is not None:
                logger.error("migration.postcopy_lost %s: %s died", self.move.vm, dead)
                return self._done_failed(
                    flow,
                    lost_in_postcopy(self.move, dead),
                    now,
                    alive=False,
                    running_on_destination=True,
                )
            case SidesChecked():
                failed = state.failed + 1
                wait_s = self.move.recovery.next_wait_s(failed, now.mono_s - state.began_s)
                if wait_s is None:
                    logger.error("migration.unrecovered %s", self.move.vm)
                    why = self._report.unrecovered()
                    return self._done_failed(
                        flow, why, now, alive=False, running_on_destination=True
                    )
                return replace(state, failed=failed, checking=False), [Wait(wait_s)]
            case Tick():
                return state, [self._attempt(state)]
            case Interrupted():
                why = "interrupted while recovering the post-copy: run `vmferry reconcile`"
                return self._done_failed(flow, why, now, alive=False, running_on_destination=True)
        raise self._unexpected(state, event)

    def _outcome(
        self, state: Precopy | Cancelling | Postcopy | Winding, outcome: SourceOutcome, now: Instant
    ) -> Step:
        flow = state.flow
        postcopy = is_postcopy(state)
        if self.move.mode is Mode.FOLLOW:
            report = self._report.followed(flow, outcome, now)
            return Done(report), []
        if outcome.status != "completed":
            reason = state.reason if isinstance(state, Cancelling) else None
            shown = replace(flow, phase=Phase.FAILED)
            effects: list[Action] = [Notify(Phase.FAILED, flow.last)]
            if not postcopy:
                # Before post-copy the destination never ran the guest: remove it.
                effects.append(AbortDestination())
            logger.error("migration.failed %s: %s", self.move.vm, outcome.error)
            return Concluding(shown, outcome, postcopy, reason), [*effects, self._check()]
        final = outcome.stats or flow.last
        flow = replace(flow, phase=Phase.COMPLETED, last=final)
        # A switch asked for just before QEMU completed: the held destination was released
        # for it and runs the guest already, as after a post-copy (nothing left to compare).
        switched = isinstance(state, Precopy) and state.switch_requested
        arriving = Arriving(flow, outcome, final, now.wall_ms, postcopy or switched)
        return self._arrival.begin(arriving)

    def _ending(self, state: State, event: Event, now: Instant) -> Step:
        match state, event:
            case Concluding(), SidesChecked():
                return self._concluded(state, event, now)
            case Concluding(), Interrupted():
                # Nearly done: the check is asked again and the ending finished (shielded).
                return state, [self._check()]
            case ((Comparing() | Arriving() | Dropping() | Resuming() | HandingOff()), _):
                return self._arrival.step(state, event, now)
        raise self._unexpected(state, event)

    def _concluded(self, state: Concluding, event: SidesChecked, now: Instant) -> Step:
        move, flow = self.move, state.flow
        if state.postcopy:
            # The guest's state is split between both hosts: keep both QEMUs for inspection.
            dead = self._note_dead(event)
            why = (
                split_postcopy(move, state.outcome)
                if dead is None
                else lost_in_postcopy(move, dead)
            )
            return self._done_failed(flow, why, now, alive=False, running_on_destination=True)
        why = rolled_back(move, state, event.source_dead)
        return self._done_failed(flow, why, now, alive=not event.source_dead)

    def _poll(self, flow: Flow, postcopy: bool) -> Poll:
        timing = self.move.timing
        # Behind a broken post-copy link a poll must fail fast so recovery starts soon.
        timeout = timing.poll_wait_s + timing.recovery_call_timeout_s if postcopy else None
        return Poll(flow.since, timing.poll_wait_s, timeout)

    def _check(self) -> CheckSides:
        return CheckSides(self.move.timing.recovery_call_timeout_s)

    def _done_failed(
        self,
        flow: Flow,
        why: str,
        now: Instant,
        *,
        alive: bool,
        running_on_destination: bool = False,
    ) -> Step:
        report = self._report.failed(flow, why, now, alive, running_on_destination)
        return Done(report), [Notify(Phase.FAILED, flow.last)]

    def _done_unknown(self, flow: Flow, why: str, now: Instant) -> Step:
        """The outcome is not known (an agent away too long): the report says so."""
        logger.error("migration.unknown %s: %s", self.move.vm, why)
        return self._done_failed(flow, why, now, alive=True)

    def _cancel(self, flow: Flow, why: str) -> Step:
        """Cancel a pre-copy (or disk copy) while the guest still runs on the source."""
        return Cancelling(flow, why), [CancelSource(), self._poll(flow, False)]

    def _note_dead(self, event: SidesChecked) -> str | None:
        """The host whose QEMU died, if one did; kept as ``lost_host`` (in post-copy the guest
        is lost with it)."""
        dead = self.move.source if event.source_dead else None
        dead = dead or (self.move.destination if event.destination_dead else None)
        self.lost_host = self.lost_host or dead
        return dead


def _what(flow: Flow) -> str:
    last = flow.last
    return "the disk copy" if last and last.stage is Stage.DISK_COPY else "the migration"
