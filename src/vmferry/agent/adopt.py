"""What an agent does with a migration it finds half done: the I/O around
:func:`vmferry.core.adoption.decide`.

An agent killed mid-migration leaves its QEMUs running (they live in their own session). Its
successor reattaches to them (:meth:`HostAgent.start`) and settles each one from what QEMU
itself reports; a migration task that failed in a way that leaves QEMU's state unknown is
settled the same way. The decision is pure; this module reads the facts and carries it out:

- a destination stays incoming: the controller, or ``vmferry reconcile``, finishes or drops it;
- a source with a pre-copy in flight, or a disk mirror before it: the mirror aborted, the
  migration cancelled and the guest resumed here (outcome ``failed``; ``completed`` if the
  cancel lost the race to completion);
- a source in post-copy: the destination runs the guest; the migration is followed again to
  its end, and can be recovered if its link breaks;
- a source after completion (``postmigrate``): migrated, outcome ``completed``.

A controller still following the migration finds the outcome at the same route as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmferry.agent.api import OutgoingResult
from vmferry.agent.slots import Outgoing, Slot, Slots, VmState
from vmferry.agent.store import Marker, VmStore
from vmferry.agent.vm import RunningVm, reattach
from vmferry.core.adoption import AdoptionFacts, Decision, Settle, after_cancel, decide
from vmferry.core.errors import FerryError, QMPTimeout
from vmferry.core.outgoing import OutgoingState
from vmferry.qemu.block import abort_mirror, mirror_status
from vmferry.qemu.migration import (
    cancel_migration,
    ensure_running,
    follow_postcopy,
    migration_status,
    query_stats,
    run_state,
)
from vmferry.qemu.process import is_qemu_pid
from vmferry.qemu.session import QmpSession
from vmferry.qemu.tls import migration_tls_creds

__all__ = ["Adopted", "adopt", "end_orphan", "follow", "settle", "settle_failed"]

logger = logging.getLogger(__name__)

RESTARTED = "the source agent restarted during the migration"
# How long a failed migration's source QEMU may stay silent (e.g. its main loop held while a
# switchover crawls over a throttled link) before the agent stops waiting to judge it.
_BUSY_QEMU_WAIT_S = 900.0

Spawn = Callable[[Coroutine[Any, Any, None], str], None]


@dataclass(frozen=True, slots=True)
class Adopted:
    """How a VM was settled: the decision carried out and, for a source, how its migration
    ended (None: still on, or nothing was in flight)."""

    decision: Decision
    outcome: OutgoingResult | None = None


async def read_facts(qmp: QmpSession, directory: Path) -> AdoptionFacts:
    """Raises: QMPCommandError, QMPTimeout: QEMU does not answer."""
    state = await run_state(qmp)
    migration = await migration_status(qmp)
    mirror = await mirror_status(qmp)
    return AdoptionFacts(
        run_state=state,
        migration=migration,
        mirror_active=mirror.status != "gone",
        incoming_marker=VmStore.is_marked(directory, Marker.INCOMING),
        postcopy_marker=VmStore.is_marked(directory, Marker.POSTCOPY),
    )


async def settle(qmp: QmpSession, directory: Path, why: str = RESTARTED) -> Adopted:
    """Settle the VM whose QEMU ``qmp`` talks to (``why`` goes into a failed outcome).

    Raises:
        QMPCommandError, QMPTimeout: QEMU does not answer (the caller retries or gives up).
    """
    facts = await read_facts(qmp, directory)
    decision = decide(facts)
    if decision.step is Settle.CANCEL:
        logger.warning(
            "adopt.orphaned %s: migration %s, mirror %s: cancelling",
            qmp.name,
            facts.migration,
            "active" if facts.mirror_active else "gone",
        )
        final = facts.migration
        if decision.cancel_migration:
            if facts.mirror_active:
                # The mirror goes first: QEMU 10.0 cancelling a migration paused at
                # pre-switchover with a write-blocking mirror still attached segfaulted the
                # source in 1 of ~7 such cancels here, losing the only running copy.
                await abort_mirror(qmp)
            final = (await cancel_migration(qmp)).status
        decision = after_cancel(decision, final)
        if decision.step is Settle.RESUME:
            with contextlib.suppress(FerryError):
                await abort_mirror(qmp)
            error = f"{why}: cancelled, the guest runs on here"
            return Adopted(decision, await _resumed(qmp, decision, error))
    match decision.step:
        case Settle.FOLLOW:
            VmStore.mark(directory, Marker.POSTCOPY)
            logger.warning("adopt.postcopy %s: %s, following it", qmp.name, facts.migration)
            return Adopted(decision)
        case Settle.COMPLETED:
            stats = await query_stats(qmp)
            return Adopted(decision, OutgoingResult("completed", None, stats, None, None))
        case Settle.HANDED_OVER:
            error = f"{why}: {facts.migration}"
            return Adopted(decision, OutgoingResult("failed", error, None, None, None))
        case Settle.RESUME:
            error = f"{why}: {facts.migration}, the guest runs on here"
            return Adopted(decision, await _resumed(qmp, decision, error))
    return Adopted(decision)  # INCOMING, KEEP: nothing to do (a failed task's caller says why)


async def _resumed(qmp: QmpSession, decision: Decision, error: str) -> OutgoingResult:
    if decision.resume:
        await ensure_running(qmp)
    return OutgoingResult("failed", error, None, None, None)


async def settle_failed(vm: RunningVm, why: str) -> Adopted:
    """Settle a source whose migration task failed, waiting as long as its QEMU lives but
    does not answer."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + _BUSY_QEMU_WAIT_S
    while True:
        try:
            return await settle(vm.qmp, vm.paths.directory, why)
        except QMPTimeout as err:
            if not vm.process.is_running or loop.time() > give_up:
                logger.error("migration.unsettled %s: %s", vm.label, err)
                break
            logger.warning("migration.qemu_busy %s: %s; waiting", vm.label, err)
            await asyncio.sleep(1.0)
        except FerryError as err:
            logger.error("migration.unsettled %s: %s", vm.label, err)
            break
    for _ in range(40):  # a QMP connection lost with its QEMU: let the exit be reaped
        if not vm.process.is_running:
            break
        await asyncio.sleep(0.05)
    if not vm.process.is_running:
        failed = OutgoingResult("failed", f"{why}; QEMU died", None, None, None)
        return Adopted(Decision(Settle.KEEP, OutgoingState.LOST), failed)
    # Alive but silent for many minutes: leave it to a human, claim nothing.
    silent = OutgoingResult("failed", f"{why}; QEMU does not answer", None, None, None)
    return Adopted(Decision(Settle.KEEP, OutgoingState.UNANSWERED), silent)


async def follow(slot: Slot, vm: RunningVm) -> None:
    """Follow a post-copy found under way (adopted, or after its task failed) to its end."""
    outgoing = slot.outgoing
    assert outgoing is not None
    try:
        final = await follow_postcopy(vm.qmp, outgoing.push)
    except FerryError as err:
        # Never resumed here: the destination ran the guest.
        failed = OutgoingResult("failed", str(err), outgoing.last, None, None)
        outgoing.finish(failed, OutgoingState.HANDED_OVER)
        return
    try:
        used_tls = await migration_tls_creds(vm.qmp) is not None
    except FerryError:
        used_tls = False  # the report then understates it; the move itself completed
    done = OutgoingResult("completed", None, final, None, None, tls=used_tls)
    outgoing.finish(done, OutgoingState.COMPLETED)


async def end_orphan(store: VmStore, directory: Path) -> None:
    """End a QEMU whose start the previous agent never completed (it died between starting
    QEMU and recording the VM): no guest was created or received there yet."""
    pid = store.pid(directory)
    if pid and is_qemu_pid(pid):
        logger.warning("agent.orphan %s: ending QEMU pid %d", directory.name, pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        for _ in range(100):
            if not is_qemu_pid(pid):
                break
            await asyncio.sleep(0.05)
    shutil.rmtree(directory, ignore_errors=True)


async def adopt(store: VmStore, slots: Slots, directory: Path, host: str, spawn: Spawn) -> None:
    """Reattach to the VM recorded in ``directory`` and settle it."""
    try:
        spec = store.load_spec(directory)
    except (OSError, ValueError, FerryError) as err:
        logger.error("agent.adopt: unreadable %s: %s", directory, err)
        return
    pid = store.pid(directory)
    if not pid or not is_qemu_pid(pid):
        logger.warning("agent.adopt: %s is no longer running", spec.name)
        slots.add(Slot(spec, VmState.STOPPED, None))
        return
    try:
        vm = await reattach(spec, directory, role=host, pid=pid)
    except FerryError as err:
        logger.error("agent.adopt: cannot reattach %s (pid %s): %s", spec.name, pid, err)
        slots.add(Slot(spec, VmState.STOPPED, None))
        return
    try:
        adopted = await settle(vm.qmp, directory)
    except FerryError as err:
        # Keep it attached (it may still be listed and deleted) but touch nothing more.
        logger.error("agent.adopt: cannot settle %s (pid %s): %s", spec.name, pid, err)
        adopted = Adopted(Decision(Settle.KEEP, None))
    base = VmState.INCOMING if adopted.decision.step is Settle.INCOMING else VmState.RUNNING
    slot = Slot(spec, base, vm)
    slots.add(slot)
    if adopted.decision.outgoing is not None:
        slot.outgoing = Outgoing(adopted.decision.outgoing, result=adopted.outcome)
    if adopted.decision.step is Settle.FOLLOW:
        spawn(follow(slot, vm), f"follow-{spec.name}")
    logger.info("agent.adopted %s pid=%s state=%s", spec.name, pid, slot.state.value)
