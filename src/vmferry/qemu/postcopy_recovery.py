"""Post-copy recovery over QMP: pause a broken post-copy on either side, have the destination
listen again, resume the source towards it (see :mod:`vmferry.agent.recovery`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

from vmferry.core.errors import QMPCommandError, QMPTimeout, StateError
from vmferry.core.status import MigrationStatus
from vmferry.qemu.migration import migration_status, parse_migration_status, query_stats
from vmferry.qemu.session import QmpSession

__all__ = ["pause_postcopy", "recover_incoming", "resume_postcopy"]

logger = logging.getLogger("vmferry.qemu.migration")

_POLL_S = 0.1

# A destination in post-copy whose link broke may have its main loop held by a thread waiting
# for a page that will not come (device emulation touching guest memory). Commands other than
# OOB ones then queue behind it unanswered, and a handful of those fill QEMU's request queue,
# which stops the monitor reading at all, OOB commands included. So until the post-copy is
# paused and the destination listens again, recovery sends only OOB commands (``migrate-pause``,
# ``migrate-recover``), each with a deadline, and learns the status from MIGRATION events.

_PAUSE_TIMEOUT_S = 10.0
_PAUSED_OR_DONE = frozenset({MigrationStatus.POSTCOPY_PAUSED, MigrationStatus.COMPLETED})


def _event_status(session: QmpSession) -> MigrationStatus | None:
    """The status of the last MIGRATION event on ``session`` (None: none, or unknown)."""
    try:
        return MigrationStatus(session.last_migration_event or "")
    except ValueError:
        return None


async def pause_postcopy(
    session: QmpSession, timeout_s: float = _PAUSE_TIMEOUT_S, *, may_query: bool = True
) -> MigrationStatus:
    """Pause a broken post-copy on either side and wait until it is ``postcopy-paused``.

    Sends only the OOB ``migrate-pause`` (it runs even when the main loop is held by a missing
    page) and follows MIGRATION events; no other command reaches QEMU before the pause.
    Tolerant: a migration QEMU already paused itself is left alone; one that completed
    meanwhile is reported as such.

    Args:
        session: either side's QMP session.
        timeout_s: deadline of the command and of the wait for the pause.
        may_query: when QEMU refuses the pause and no event told its status, ask it with
            ``query-migrate`` (a source: its main loop never waits for pages). False (a
            destination): take it as paused; ``migrate-recover`` refuses if it was not.

    Returns:
        The status reached: ``POSTCOPY_PAUSED``, or ``COMPLETED``.

    Raises:
        StateError: not in post-copy (nothing to pause), or it did not pause in time.
        QMPCommandError, QMPTimeout, QMPConnectError: QMP failed.
    """
    with session.listener("MIGRATION") as listener:
        try:
            await session.execute("migrate-pause", oob=True, timeout_s=timeout_s)
        except QMPCommandError as err:
            # Neither postcopy-active nor postcopy-recover: paused already (QEMU does that
            # itself once a socket errors), completed, in recovery setup, or no post-copy.
            logger.debug("migrate-pause %s: %s", session.name, err)
            return await _unpausable(session, timeout_s, may_query)
        logger.info("migration.pause %s", session.name)
        loop = asyncio.get_running_loop()
        until = loop.time() + timeout_s
        status = "pausing"  # only events after the command count
        while (left_s := until - loop.time()) > 0:
            try:
                event = await session.next_event(listener, left_s)
            except QMPTimeout:
                break
            status = parse_migration_status(event.get("data", {}).get("status"))
            if status in _PAUSED_OR_DONE:
                return status
        raise StateError(f"migration of {session.name}", status, "postcopy-paused")


async def _unpausable(session: QmpSession, timeout_s: float, may_query: bool) -> MigrationStatus:
    """The status of a migration QEMU refused to pause (see :func:`pause_postcopy`)."""
    status = _event_status(session)
    if status is None and may_query:
        status = await migration_status(session, timeout_s)
    if status is None:
        # No event seen on this connection (an agent restarted since the post-copy began).
        logger.warning("migration.pause %s: status unknown, taking it as paused", session.name)
        return MigrationStatus.POSTCOPY_PAUSED
    if status in _PAUSED_OR_DONE:
        return status
    raise StateError(f"migration of {session.name}", status, "post-copy")


def _free_port(host: str) -> int:
    """A TCP port free on ``host`` now (the kernel's choice for port 0)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


async def recover_incoming(dst: QmpSession, listen_host: str, timeout_s: float = 5.0) -> str:
    """Make a destination whose post-copy is paused listen for the source again
    (``migrate-recover``, OOB); return the URI the source resumes to.

    The port is picked here (free a moment ago) rather than read back from ``query-migrate``,
    which is not OOB and may wait forever behind a held main loop (see above). Should another
    process take it meanwhile, QEMU refuses and the caller's next attempt picks another.

    Raises:
        StateError: QEMU refused (the incoming post-copy is not paused, or the port was taken).
        QMPTimeout, QMPConnectError: QMP failed.
    """
    uri = f"tcp:{listen_host}:{_free_port(listen_host)}"
    try:
        await dst.execute("migrate-recover", {"uri": uri}, oob=True, timeout_s=timeout_s)
    except QMPCommandError as err:
        status = dst.last_migration_event or "unknown"
        raise StateError(
            f"incoming migration of {dst.name} ({err.desc})", status, "postcopy-paused"
        ) from err
    logger.info("migration.recover_listen %s at %s", dst.name, uri)
    return uri


async def resume_postcopy(src: QmpSession, uri: str, timeout_s: float = 10.0) -> MigrationStatus:
    """Resume a paused outgoing post-copy towards ``uri`` (``migrate`` with ``resume``) and
    wait until it is running again or paused again.

    Returns:
        ``POSTCOPY_ACTIVE`` or ``COMPLETED`` (recovered), ``POSTCOPY_PAUSED`` (the attempt
        failed; retry), or a ``POSTCOPY_RECOVER*`` status still in progress when
        ``timeout_s`` passed.

    Raises:
        StateError: the migration is not paused in post-copy.
        QMPCommandError, QMPTimeout, QMPConnectError: QMP failed.
    """
    paused = MigrationStatus.POSTCOPY_PAUSED
    status = (await query_stats(src)).status
    if status is not paused:
        raise StateError(f"migration of {src.name}", status, paused)
    with src.listener("MIGRATION") as listener:
        await src.execute("migrate", {"uri": uri, "resume": True})
        logger.info("migration.resume %s -> %s", src.name, uri)
        left_paused = False
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while True:
                    # Events catch a quick recover-setup -> paused round trip polling misses.
                    with contextlib.suppress(QMPTimeout):
                        event = await src.next_event(listener, _POLL_S)
                        if str(event.get("data", {}).get("status")) != paused:
                            left_paused = True
                        elif left_paused:
                            return paused
                    status = (await query_stats(src)).status
                    if status in _RESUMED:
                        return status
                    if status is not paused:
                        left_paused = True
                    elif left_paused:
                        return status  # fell back: this attempt failed
    return status


_RESUMED = frozenset(
    {MigrationStatus.POSTCOPY_ACTIVE, MigrationStatus.COMPLETED, MigrationStatus.FAILED}
)
