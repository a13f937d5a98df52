"""The two agents of one move: the machine's actions carried out on them, answers as events.

Each request becomes agent calls; each answer (or error) becomes the event the machine expects.
Errors that no event stands for (a refusal of bad input) are raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable

from vmferry.agent.api import OutgoingResult
from vmferry.agent.client import AgentUnreachable
from vmferry.agent.port import AgentPort
from vmferry.core import migration as m
from vmferry.core.errors import ConfigError, FerryError
from vmferry.core.handoff import VerifyMode, compare, handoff_verdict
from vmferry.core.model import MigrationOptions, NbdTarget, VmSpec
from vmferry.core.status import MigrationStatus, RunState

__all__ = ["Sides", "Sleep", "drop_unstarted", "incoming_status", "is_dead"]

Sleep = Callable[[float], Awaitable[None]]

logger = logging.getLogger(__name__)


class Sides:
    """The two agents of one move, and what the destination told the source to connect to."""

    def __init__(
        self,
        source: AgentPort,
        destination: AgentPort | None,
        spec: VmSpec | None = None,
        options: MigrationOptions | None = None,
    ) -> None:
        self.source, self.destination = source, destination
        self.spec, self.options = spec, options
        self.uri = ""
        self.nbd: NbdTarget | None = None

    async def apply(self, effect: m.Effect, name: str) -> None:
        """Carry out an effect (best effort: a failure shows in the next answer)."""
        with contextlib.suppress(FerryError):
            match effect:
                case m.StartPostcopy():
                    if self.destination is not None and self.options and self.options.hold:
                        await self._release_hold(self.destination, name)
                    await self.source.start_postcopy(name)
                case m.CancelSource():
                    await self.source.cancel_migration(name)
                case m.AbortDestination() if self.destination is not None:
                    await self.destination.abort_incoming(name)

    async def answer(self, request: m.Request, name: str, sleep: Sleep) -> m.Event:
        """Carry out one request; its answer as an event."""
        try:
            match request:
                case m.Poll(since=since, wait_s=wait_s, timeout_s=timeout_s):
                    samples, next_since, result = await self.source.migration_progress(
                        name, since, wait_s, timeout_s=timeout_s
                    )
                    return m.Progressed(tuple(samples), next_since, _outcome(result))
                case m.Wait(seconds=seconds):
                    await sleep(seconds)
                    return m.Tick()
            if self.destination is None:
                return _without_destination(request)
            return await self._answer_both(request, name, self.destination)
        except FerryError as err:
            return _failure(request, err)

    async def _answer_both(self, request: m.Request, name: str, destination: AgentPort) -> m.Event:
        source = self.source
        match request:
            case m.PrepareDestination():
                assert self.spec is not None
                assert self.options is not None
                self.uri, self.nbd = await destination.prepare_incoming(self.spec, self.options)
                return m.DestinationPrepared()
            case m.StartSource():
                assert self.options is not None
                await source.start_migration(name, self.uri, self.options, self.nbd)
                return m.SourceStarted()
            case m.HandOverDisk():
                await destination.release_disk(name)
                await source.continue_switchover(name)
                return m.HandoverDone()
            case m.RecoverPostcopy(attempt=attempt, timeout_s=timeout_s):
                if await still_switching(destination, name, timeout_s):
                    return m.NotBroken("the destination has not started the guest yet")
                return await self._recover_once(name, attempt, timeout_s)
            case m.CheckSides(timeout_s=timeout_s):
                dead = await asyncio.gather(
                    is_dead(source, name, timeout_s), is_dead(destination, name, timeout_s)
                )
                return m.SidesChecked(*dead)
            case m.QueryIncoming(timeout_s=timeout_s):
                return m.IncomingStatus(await incoming_status(destination, name, timeout_s))
            case m.CompareCopies(mode=mode, timeout_s=timeout_s):
                return await compare_copies(source, destination, name, mode, timeout_s)
            case m.FinishDestination():
                arrival = await destination.finish_incoming(name)
                return m.Arrived(arrival.first_heartbeat_ms, arrival.integrity, arrival.guest_agent)
            case m.DropDestination():
                return m.DestinationDropped(await drop_unstarted(destination, name))
            case m.ResumeSource():
                await source.resume_source(name)
                lab = self.spec is None or self.spec.is_lab_guest
                return m.SourceResumed(await source.verify(name) if lab else None)
            case m.Handoff():
                await source.handoff(name)
                return m.HandedOff()
        raise AssertionError(f"not a request the agents carry out: {request}")

    @staticmethod
    async def _release_hold(destination: AgentPort, name: str) -> None:
        """Before post-copy starts: a held destination must run the guest once it switches
        over. If it cannot be told, the post-copy still completes (the guest waits, paused
        there, until it is started at the end): slower, never lost."""
        try:
            await destination.release_hold(name)
        except FerryError as err:
            logger.warning("migration.hold_kept %s: %s", name, err)

    async def _recover_once(
        self, name: str, attempt: int, timeout_s: float
    ) -> m.RecoveryTried | m.NotBroken:
        """One post-copy recovery attempt: ok when the post-copy runs (or completed) again;
        NotBroken when the source agent found its link working and paused nothing.

        Raises:
            FerryError: a step failed (an agent behind the broken link, QEMU not paused yet...).
        """
        source, destination = self.source, self.destination
        assert destination is not None
        paused = await source.pause_postcopy(name, attempt, timeout_s=timeout_s + 2)
        if paused is MigrationStatus.COMPLETED:
            return m.RecoveryTried(True)
        if paused is MigrationStatus.POSTCOPY_ACTIVE:
            return m.NotBroken("the source's link to the destination works")
        await destination.pause_postcopy(name, attempt, timeout_s=timeout_s)
        uri = await destination.recover_postcopy(name, attempt, timeout_s=timeout_s)
        status = await source.resume_postcopy(name, uri, attempt)
        logger.info("migration.resume_attempt %s #%d -> %s: %s", name, attempt, uri, status)
        return m.RecoveryTried(
            status in (MigrationStatus.POSTCOPY_ACTIVE, MigrationStatus.COMPLETED)
        )


def _without_destination(request: m.Request) -> m.Event:
    """Answers when no host holds the destination copy (a followed post-copy whose
    destination is gone): nothing there can be asked, and its QEMU counts as dead."""
    match request:
        case m.CheckSides():
            return m.SidesChecked(source_dead=False, destination_dead=True)
        case m.QueryIncoming():
            return m.IncomingStatus(None)
        case m.RecoverPostcopy():
            return m.RecoveryTried(False, "no host holds the destination copy")
    raise AssertionError(f"{request} needs a destination")


def _failure(request: m.Request, err: FerryError) -> m.Event:
    """The event a failed request answers with; errors no event stands for are raised."""
    text = str(err)
    match request:
        case m.PrepareDestination() if not isinstance(err, ConfigError):
            return m.DestinationFailed(text)  # (bad input, no room: refused, nothing changed)
        case m.StartSource():
            return m.SourceStartFailed(text)
        case m.Poll() if isinstance(err, AgentUnreachable):
            return m.AgentLost("source", text)
        case m.HandOverDisk():
            return m.HandoverFailed(text)
        case m.RecoverPostcopy():
            return m.RecoveryTried(False, text)
        case m.FinishDestination() if isinstance(err, AgentUnreachable):
            return m.AgentLost("destination", text)
        case m.FinishDestination():
            return m.ArrivalFailed(text)
        case m.ResumeSource():
            return m.SourceResumeFailed(text)
        case m.CompareCopies():
            return m.CompareFailed(text)
        case m.Handoff():
            return m.HandedOff(text)
    raise err


def _outcome(result: OutgoingResult | None) -> m.SourceOutcome | None:
    if result is None:
        return None
    status = result.status if result.status in ("completed", "cancelled") else "failed"
    return m.SourceOutcome(
        status,  # type: ignore[arg-type]
        result.error,
        result.stats,
        result.last_heartbeat_ms,
        result.max_gap_ms,
        result.tls,
    )


async def compare_copies(
    source: AgentPort, destination: AgentPort, name: str, mode: VerifyMode, timeout_s: float
) -> m.Event:
    """Hash both stopped copies at once over one seeded plan and compare them.

    Raises:
        FerryError: an agent could not hash its copy (answered as CompareFailed).
    """
    seed = secrets.randbits(64)  # unknown to both sides until now
    # Both calls are awaited to their end (each has its deadline), then the first error wins.
    answers = await asyncio.gather(
        source.handoff_digests(name, mode, seed, timeout_s),
        destination.handoff_digests(name, mode, seed, timeout_s),
        return_exceptions=True,
    )
    for answer in answers:
        if isinstance(answer, BaseException):
            raise answer
    src, dst = answers
    assert not isinstance(src, BaseException)
    assert not isinstance(dst, BaseException)
    if (src.disk is None) != (dst.disk is None):
        return m.CompareFailed("only one side hashed a disk")
    disk = None if src.disk is None or dst.disk is None else compare(src.disk, dst.disk)
    verdict = handoff_verdict(mode, ram=compare(src.ram, dst.ram), disk=disk)
    logger.info("migration.handoff %s: %s", name, verdict.status)
    return m.CopiesCompared(verdict)


async def is_dead(agent: AgentPort, name: str, timeout_s: float) -> bool:
    """Whether VM ``name``'s QEMU died on ``agent`` (it reports the VM stopped)."""
    try:
        return (await agent.get_vm(name, timeout_s=timeout_s)).state == "stopped"
    except FerryError:
        return False


async def still_switching(destination: AgentPort, name: str, timeout_s: float) -> bool:
    """Whether the destination QEMU is still waiting to start the guest (run state
    ``inmigrate``): a post-copy quiet then is QEMU inside its switch, not a broken link, and
    pausing it would fail the migration. False when its agent does not answer (behind a
    broken link, a recovery is what is needed)."""
    try:
        runstate, _ = await destination.qemu_state(name, timeout_s=timeout_s)
    except FerryError:
        return False
    return runstate is RunState.INMIGRATE


async def incoming_status(
    destination: AgentPort, name: str, timeout_s: float
) -> MigrationStatus | None:
    """The destination QEMU's migration status; None if its agent does not answer."""
    try:
        _, migration = await destination.qemu_state(name, timeout_s=timeout_s)
    except FerryError:
        return None
    return migration


async def drop_unstarted(destination: AgentPort, name: str) -> bool:
    """Remove a destination copy that never ran the guest: its QEMU died, or is still waiting
    for the state (the agent refuses one that received it). True when it is gone."""
    try:
        if await is_dead(destination, name, 3.0):
            await destination.forget(name)
        else:
            await destination.abort_incoming(name)
    except FerryError as err:
        logger.warning("migration.destination_kept %s: %s", name, err)
        return False
    return True
