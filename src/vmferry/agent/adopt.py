"""What a restarted agent does with a migration it finds half done.

An agent killed mid-migration leaves its QEMUs running (they live in their own session). Its
successor reattaches to them (:meth:`HostAgent.start`) and settles each one from what QEMU
itself reports, so that no guest stays paused with no one to steer it:

- a destination (marker file ``incoming`` in the VM's directory) stays incoming: the
  controller, or ``vmferry reconcile``, finishes or drops it;
- a source with a pre-copy in flight, or a disk mirror before it: no one follows it any more,
  so it is cancelled, the mirror aborted and the guest resumed here (outcome ``failed``; if the
  cancel lost the race to completion, outcome ``completed``);
- a source in post-copy (marker ``postcopy``, or QEMU's status): the destination runs the guest;
  the migration is followed again to its end, and can be recovered if its link breaks;
- a source after completion (``postmigrate``): migrated, outcome ``completed``.

A controller still following the migration finds the outcome at the same route as before.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

from vmferry.agent.api import OutgoingResult
from vmferry.core.errors import FerryError
from vmferry.core.model import MigrationStats
from vmferry.core.recovery import is_postcopy
from vmferry.qemu.block import abort_mirror, mirror_status
from vmferry.qemu.migration import (
    PRECOPY_IN_FLIGHT,
    cancel_migration,
    ensure_running,
    migration_status,
    query_stats,
)
from vmferry.qemu.session import QmpSession

__all__ = ["INCOMING_MARKER", "POSTCOPY_MARKER", "Adopted", "mark", "settle", "unmark"]

logger = logging.getLogger(__name__)

# Files in a VM's runtime directory that survive an agent restart.
INCOMING_MARKER = "incoming"  # this host is the destination of an unfinished migration
POSTCOPY_MARKER = "postcopy"  # this source's migration entered post-copy: never resume it

RESTARTED = "the source agent restarted during the migration"


@dataclass(frozen=True, slots=True)
class Adopted:
    """How an adopted VM was settled."""

    state: str  # a VmState value: running | incoming | migrating | migrated
    outcome: OutgoingResult | None  # for a source: how its migration ended (None: still on)
    follow: bool = False  # a post-copy in flight: follow it to its end


def mark(directory: Path, marker: str) -> None:
    (directory / marker).touch()


def unmark(directory: Path, marker: str) -> None:
    (directory / marker).unlink(missing_ok=True)


async def settle(qmp: QmpSession, directory: Path, why: str = RESTARTED) -> Adopted:
    """Settle the VM whose QEMU ``qmp`` talks to: found running by a restarted agent, or
    after its migration task failed in a way that leaves QEMU's state unknown (``why`` says
    which, for the outcome's error).

    Raises:
        QMPCommandError, QMPTimeout: QEMU does not answer (the caller retries or gives up).
    """
    status = str((await qmp.execute("query-status"))["status"])
    migration = await migration_status(qmp)
    if (directory / INCOMING_MARKER).exists() or status == "inmigrate":
        return Adopted("incoming", None)
    if is_postcopy(migration):
        mark(directory, POSTCOPY_MARKER)
        logger.warning("adopt.postcopy %s: %s, following it", qmp.name, migration)
        return Adopted("migrating", None, follow=True)
    if migration == "completed" and status == "postmigrate":
        return Adopted("migrated", _completed(await query_stats(qmp)))
    mirror = await mirror_status(qmp)
    if migration in PRECOPY_IN_FLIGHT or mirror.status != "gone":
        logger.warning(
            "adopt.orphaned %s: migration %s, mirror %s: cancelling",
            qmp.name,
            migration,
            mirror.status,
        )
        final = migration
        if migration in PRECOPY_IN_FLIGHT:
            final = (await cancel_migration(qmp)).status
        if final == "completed":
            return Adopted("migrated", _completed(await query_stats(qmp)))
        with contextlib.suppress(FerryError):
            await abort_mirror(qmp)
        error = f"{why}: cancelled, the guest runs on here"
        return Adopted("running", await _resumed(qmp, directory, error))
    if status == "postmigrate" or (directory / POSTCOPY_MARKER).exists():
        # Handed over (a post-copy that failed in QEMU, or an unknown end): never resumed here.
        return Adopted(
            "migrated", OutgoingResult("failed", f"{why}: {migration}", None, None, None)
        )
    if status != "running":
        # Paused by a migration that failed or was cancelled while no agent watched.
        error = f"{why}: {migration}, the guest runs on here"
        return Adopted("running", await _resumed(qmp, directory, error))
    return Adopted("running", None)  # nothing was in flight (a failed task's caller says why)


async def _resumed(qmp: QmpSession, directory: Path, error: str) -> OutgoingResult:
    if not (directory / POSTCOPY_MARKER).exists():
        await ensure_running(qmp)
    return OutgoingResult("failed", error, None, None, None)


def _completed(stats: MigrationStats) -> OutgoingResult:
    return OutgoingResult("completed", None, stats, None, None)
