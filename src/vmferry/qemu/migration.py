"""Driving one QEMU-to-QEMU migration over QMP: prepare the destination, set capabilities and
parameters, start, follow progress (events plus ``query-migrate``), complete or cancel.

The driver never tears anything down: the caller decides what to stop once it knows which side
holds the guest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from qemu.qmp import EventListener

from vmferry.core.errors import (
    FerryError,
    MigrationFailed,
    QMPCommandError,
    QMPTimeout,
    StateError,
)
from vmferry.core.model import MigrationOptions, MigrationStats
from vmferry.core.recovery import POSTCOPY_RECOVERING, is_postcopy
from vmferry.qemu.session import QmpSession
from vmferry.qemu.tls import migration_tls_parameters, tls_hostname

__all__ = [
    "PRECOPY_IN_FLIGHT",
    "MigrationOptions",
    "cancel_migration",
    "capabilities_for",
    "ensure_running",
    "follow_postcopy",
    "migration_status",
    "pause_postcopy",
    "query_stats",
    "recover_incoming",
    "resume_completed_source",
    "resume_postcopy",
    "run_migration",
    "source_parameters_for",
    "start_incoming",
    "start_postcopy",
    "stats_from_reply",
    "wait_running",
]

logger = logging.getLogger(__name__)

# QEMU's default cap (128 MiB/s) is meant to protect a production network; on a lab loopback we
# want the link to be the limit. 0 is not "unlimited" in QMP, so use a very large figure.
UNLIMITED_BPS = 100 * 1000**3
_POLL_S = 0.1


def capabilities_for(options: MigrationOptions) -> dict[str, bool]:
    """QEMU migration capabilities for ``options`` (the same set goes to both sides)."""
    # Every capability we manage is set explicitly, on or off: a QEMU that arrived by an
    # earlier migration keeps the capabilities it was received with.
    return {
        "events": True,
        "multifd": options.mechanism == "multifd",
        "xbzrle": options.mechanism == "xbzrle",
        "auto-converge": options.mechanism == "auto-converge",
        "postcopy-ram": options.uses_postcopy,
        # Pages the guest faults on travel on their own channel, not behind the bulk copy.
        "postcopy-preempt": options.uses_postcopy,
    }


def source_parameters_for(options: MigrationOptions) -> dict[str, object]:
    """``migrate-set-parameters`` arguments for the source."""
    params: dict[str, object] = {
        "max-bandwidth": options.max_bandwidth_bps or UNLIMITED_BPS,
        "downtime-limit": options.downtime_limit_ms,
    }
    if options.uses_postcopy:
        # Post-copy pulls pages over the same link: cap it alike.
        params["max-postcopy-bandwidth"] = options.max_bandwidth_bps or 0
    params.update(_shared_parameters(options))
    if options.mechanism == "xbzrle":
        params["xbzrle-cache-size"] = options.xbzrle_cache_bytes
    if options.mechanism == "auto-converge":
        params["cpu-throttle-initial"] = 20
        params["cpu-throttle-increment"] = 10
    return params


def _shared_parameters(options: MigrationOptions) -> dict[str, object]:
    """Parameters both QEMUs must agree on."""
    if options.mechanism == "multifd":
        return {"multifd-channels": options.multifd_channels, "multifd-compression": "zstd"}
    return {}


def _caps_arg(capabilities: Mapping[str, bool]) -> list[dict[str, object]]:
    return [{"capability": name, "state": state} for name, state in capabilities.items()]


def stats_from_reply(reply: Mapping[str, Any]) -> MigrationStats:
    """Validate a ``query-migrate`` reply into :class:`MigrationStats`."""
    ram = reply.get("ram") or {}
    return MigrationStats(
        status=str(reply.get("status", "none")),
        total_ms=int(reply.get("total-time", 0)),
        transferred_bytes=int(ram.get("transferred", 0)),
        remaining_bytes=int(ram.get("remaining", 0)),
        total_bytes=int(ram.get("total", 0)),
        dirty_pages_rate=int(ram.get("dirty-pages-rate", 0)),
        page_size=int(ram.get("page-size", 4096)),
        iterations=int(ram.get("dirty-sync-count", 0)),
        throughput_bps=int(float(ram.get("mbps", 0.0)) * 1_000_000 / 8),
        expected_downtime_ms=(
            int(reply["expected-downtime"]) if "expected-downtime" in reply else None
        ),
        downtime_ms=int(reply["downtime"]) if "downtime" in reply else None,
    )


async def query_stats(session: QmpSession) -> MigrationStats:
    """One ``query-migrate`` sample."""
    return stats_from_reply(await session.execute("query-migrate"))


async def _next_sample(
    src: QmpSession,
    listener: EventListener,
    on_progress: Callable[[MigrationStats], None] | None,
) -> MigrationStats:
    """The next progress sample: after a status change, or the poll interval at the latest."""
    with contextlib.suppress(QMPTimeout):
        await src.next_event(listener, _POLL_S)
    stats = await query_stats(src)
    if on_progress is not None:
        on_progress(stats)
    return stats


async def start_incoming(
    dst: QmpSession,
    listen_host: str,
    options: MigrationOptions,
    *,
    tls_creds: str | None = None,
) -> str:
    """Make the destination (started with ``-incoming defer``) listen; return the URI to use.

    The port is chosen by the kernel (port 0) and read back from ``query-migrate``, so there is
    no race for a free port. With ``tls_creds`` (an endpoint=server ``tls-creds-x509`` object)
    the destination accepts only TLS connections from a source with a certificate its CA
    signed — also for a post-copy recovery's new connection.
    """
    await dst.execute(
        "migrate-set-capabilities", {"capabilities": _caps_arg(capabilities_for(options))}
    )
    await dst.execute(
        "migrate-set-parameters",
        {**_shared_parameters(options), **migration_tls_parameters(tls_creds, None)},
    )
    await dst.execute("migrate-incoming", {"uri": f"tcp:{listen_host}:0"})
    reply = await dst.execute("query-migrate")
    for address in reply.get("socket-address", []):
        if address.get("type") == "inet":
            return f"tcp:{listen_host}:{address['port']}"
    raise FerryError(f"destination did not report its listening address: {reply!r}")


async def run_migration(
    src: QmpSession,
    uri: str,
    options: MigrationOptions,
    on_progress: Callable[[MigrationStats], None] | None = None,
    *,
    before_switchover: Callable[[], Awaitable[None]] | None = None,
    tls_creds: str | None = None,
) -> MigrationStats:
    """Start the migration on the source and follow it to the end.

    Args:
        src: the source VM's session.
        uri: where the destination listens.
        options: mechanism and knobs.
        on_progress: called with every progress sample.
        before_switchover: run with the guest paused just before its device state is sent
            (QEMU's ``pause-before-switchover``), e.g. to complete a disk mirror; the
            migration continues when it returns and is cancelled when it raises.
        tls_creds: an endpoint=client ``tls-creds-x509`` object: the stream (every channel,
            multifd and post-copy preempt included) runs over TLS, and the destination's
            certificate must name the URI's host. None: in clear.

    Returns:
        The final statistics (status ``completed``; ``downtime_ms`` set).

    A post-copy that QEMU pauses after a network fault (``postcopy-paused``) is followed on
    through its recovery (``postcopy-recover-setup``, ``postcopy-recover``, back to
    ``postcopy-active``), without time limit: someone else (the controller) recovers it, and
    the source must never take the guest back.

    Raises:
        MigrationFailed: QEMU reported failure or cancellation, or ``options.timeout_s``
            passed before post-copy started (the migration is then cancelled first).
        FerryError: whatever ``before_switchover`` raised (the migration is cancelled first).
    """
    capabilities = capabilities_for(options)
    capabilities["pause-before-switchover"] = before_switchover is not None
    await src.execute("migrate-set-capabilities", {"capabilities": _caps_arg(capabilities)})
    await src.execute(
        "migrate-set-parameters",
        {
            **source_parameters_for(options),
            **migration_tls_parameters(tls_creds, tls_hostname(uri) if tls_creds else None),
        },
    )
    if options.mechanism == "cold":
        await src.execute("stop")
    with src.listener("MIGRATION") as listener:
        await src.execute("migrate", {"uri": uri})
        logger.info("migration.started %s -> %s (%s)", src.name, uri, options.mechanism)
        if options.mechanism == "postcopy":
            await start_postcopy(src)
        try:
            previous = "setup"
            # QEMU may still say pre-switchover for a moment after migrate-continue (seen
            # with multifd over TLS): the hook runs once per migration, never twice.
            switched_over = False
            async with asyncio.timeout(options.timeout_s) as deadline:
                while True:
                    stats = await _next_sample(src, listener, on_progress)
                    if is_postcopy(stats.status) and deadline.when() is not None:
                        # The destination owns the guest now: a post-copy cannot be
                        # cancelled, only completed (or paused and recovered), however long.
                        deadline.reschedule(None)
                    if stats.status != previous and stats.status in POSTCOPY_RECOVERING:
                        reply = await src.execute("query-migrate")
                        logger.warning(
                            "migration.%s %s: %s",
                            stats.status,
                            src.name,
                            reply.get("error-desc", "-"),
                        )
                    previous = stats.status
                    if stats.status == "pre-switchover" and before_switchover is not None:
                        if not switched_over:
                            switched_over = True
                            await _switch_over(src, before_switchover)
                        continue
                    if stats.status == "completed":
                        logger.info(
                            "migration.complete %s total=%dms downtime=%sms",
                            src.name,
                            stats.total_ms,
                            stats.downtime_ms,
                        )
                        return stats
                    if stats.status in ("failed", "cancelled"):
                        reply = await src.execute("query-migrate")
                        reason = str(reply.get("error-desc", stats.status))
                        raise MigrationFailed(src.name, stats.status, reason)
        except TimeoutError:
            final = await cancel_migration(src)
            if final.status == "completed":
                return final
            raise MigrationFailed(
                src.name, "active", f"did not finish within {options.timeout_s:g} s; cancelled"
            ) from None


async def _switch_over(src: QmpSession, hook: Callable[[], Awaitable[None]]) -> None:
    """Run ``hook`` at ``pre-switchover``, then let QEMU send the device state."""
    try:
        await hook()
    except BaseException:
        with contextlib.suppress(FerryError):
            await asyncio.shield(cancel_migration(src))
        raise
    await src.execute("migrate-continue", {"state": "pre-switchover"})


async def start_postcopy(src: QmpSession) -> None:
    """Switch a running migration to post-copy: the destination runs the guest from now on
    and pulls the pages it still lacks. Needs ``postcopy-ram`` enabled on both sides."""
    await src.execute("migrate-start-postcopy")
    logger.info("migration.postcopy %s", src.name)


async def cancel_migration(src: QmpSession, timeout_s: float = 30.0) -> MigrationStats:
    """Cancel an outgoing migration and wait until QEMU has settled.

    Returns the final sample: ``cancelled``/``failed`` (guest stays on the source) or
    ``completed`` when the switchover won the race (guest is on the destination).
    """
    await src.execute("migrate_cancel")
    async with asyncio.timeout(timeout_s):
        while True:
            stats = await query_stats(src)
            if stats.status in ("cancelled", "failed", "completed", "none"):
                return stats
            await asyncio.sleep(_POLL_S)


async def wait_running(session: QmpSession, timeout_s: float) -> None:
    """Wait until the guest's vCPUs run (the destination after switchover).

    Raises:
        StateError: if it does not reach ``running`` in time.
    """
    status = "unknown"
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                reply = await session.execute("query-status")
                status = str(reply["status"])
                if status == "running":
                    return
                await asyncio.sleep(_POLL_S / 5)
    except TimeoutError:
        raise StateError(f"VM {session.name}", status, "running") from None


async def ensure_running(session: QmpSession) -> str:
    """Resume a source left paused by a failed switchover; return its final run state.

    Only for a migration known to have failed or been cancelled. A source in ``postmigrate``
    has handed the guest over and is never resumed: that would run the guest twice. Nor is a
    source whose migration entered post-copy (even paused): the destination runs the guest.
    """
    migration = str((await session.execute("query-migrate")).get("status", "none"))
    if is_postcopy(migration):
        logger.warning("migration.no_resume %s: post-copy %s", session.name, migration)
        return str((await session.execute("query-status"))["status"])
    reply = await session.execute("query-status")
    status = str(reply["status"])
    if status == "paused":
        await session.execute("cont")
        status = str((await session.execute("query-status"))["status"])
    return status


# -- post-copy recovery ---------------------------------------------------------------------------

_PAUSE_TIMEOUT_S = 10.0


async def migration_status(session: QmpSession, timeout_s: float = 5.0) -> str:
    """This QEMU's (outgoing or incoming) migration status (``none`` when there is none)."""
    reply = await session.execute("query-migrate", timeout_s=timeout_s)
    return str(reply.get("status", "none"))


async def pause_postcopy(session: QmpSession, timeout_s: float = _PAUSE_TIMEOUT_S) -> str:
    """Pause a broken post-copy on either side (OOB ``migrate-pause``: it runs even when the
    main loop is stuck on a missing page), and wait until QEMU reports ``postcopy-paused``.

    Tolerant: a migration QEMU already paused itself, or that is being recovered, is left
    alone; one that completed meanwhile is reported as such.

    Returns:
        The status reached: ``postcopy-paused``, or ``completed``.

    Raises:
        StateError: not in post-copy (nothing to pause), or it did not pause in time.
        QMPCommandError, QMPTimeout, QMPConnectError: QMP failed.
    """
    status = await migration_status(session, timeout_s)
    if status not in ("postcopy-active", "postcopy-paused", "completed", *POSTCOPY_RECOVERING):
        raise StateError(f"migration of {session.name}", status, "post-copy")
    if status != "postcopy-paused" and status != "completed":
        # Also a recovery stuck connecting over a link that went down again.
        try:
            await session.execute("migrate-pause", oob=True, timeout_s=timeout_s)
        except QMPCommandError as err:
            # QEMU paused it itself between our query and the command.
            logger.debug("migrate-pause %s: %s", session.name, err)
        logger.info("migration.pause %s (was %s)", session.name, status)
    try:
        async with asyncio.timeout(timeout_s):
            while status not in ("postcopy-paused", "completed"):
                await asyncio.sleep(_POLL_S)
                status = await migration_status(session, timeout_s)
    except TimeoutError:
        raise StateError(f"migration of {session.name}", status, "postcopy-paused") from None
    return status


def _inet_ports(reply: Mapping[str, Any]) -> list[int]:
    return [
        int(address["port"])
        for address in reply.get("socket-address", [])
        if address.get("type") == "inet" and "port" in address
    ]


async def recover_incoming(dst: QmpSession, listen_host: str, timeout_s: float = 5.0) -> str:
    """Make a destination whose post-copy is paused listen for the source again
    (``migrate-recover``, OOB); return the URI the source resumes to.

    The port is chosen by the kernel (``tcp:<host>:0``) and read back from ``query-migrate``'s
    ``socket-address``, as for the first connection: the new listener is the one whose port
    was not there before (QEMU drops the old listeners first in current versions).

    Raises:
        StateError: the incoming post-copy is not paused (QEMU refused), or no new port shows.
        QMPCommandError, QMPTimeout, QMPConnectError: QMP failed.
    """
    before = set(_inet_ports(await dst.execute("query-migrate", timeout_s=timeout_s)))
    try:
        await dst.execute(
            "migrate-recover", {"uri": f"tcp:{listen_host}:0"}, oob=True, timeout_s=timeout_s
        )
    except QMPCommandError as err:
        status = await migration_status(dst, timeout_s)
        raise StateError(
            f"incoming migration of {dst.name} ({err.desc})", status, "postcopy-paused"
        ) from err
    ports = _inet_ports(await dst.execute("query-migrate", timeout_s=timeout_s))
    fresh = [port for port in ports if port not in before] or ports
    if not fresh:
        raise StateError(f"recovery listener of {dst.name}", "no socket-address", "listening")
    uri = f"tcp:{listen_host}:{fresh[0]}"
    logger.info("migration.recover_listen %s at %s", dst.name, uri)
    return uri


async def resume_postcopy(src: QmpSession, uri: str, timeout_s: float = 10.0) -> str:
    """Resume a paused outgoing post-copy towards ``uri`` (``migrate`` with ``resume``) and
    wait until it is running again or paused again.

    Returns:
        ``postcopy-active`` or ``completed`` (recovered), ``postcopy-paused`` (the attempt
        failed; retry), or a ``postcopy-recover*`` status still in progress when
        ``timeout_s`` passed.

    Raises:
        StateError: the migration is not paused in post-copy.
        QMPCommandError, QMPTimeout, QMPConnectError: QMP failed.
    """
    status = (await query_stats(src)).status
    if status != "postcopy-paused":
        raise StateError(f"migration of {src.name}", status, "postcopy-paused")
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
                        if str(event.get("data", {}).get("status")) != "postcopy-paused":
                            left_paused = True
                        elif left_paused:
                            return "postcopy-paused"
                    status = (await query_stats(src)).status
                    if status in ("postcopy-active", "completed", "failed"):
                        return status
                    if status != "postcopy-paused":
                        left_paused = True
                    elif left_paused:
                        return status  # fell back: this attempt failed
    return status


# -- a migration found in flight by a restarted agent ---------------------------------------------

# Pre-copy statuses in which the source still owns the guest and the migration can be cancelled.
PRECOPY_IN_FLIGHT = frozenset(
    {"setup", "active", "pre-switchover", "device", "wait-unplug", "cancelling"}
)


async def follow_postcopy(
    src: QmpSession, on_progress: Callable[[MigrationStats], None] | None = None
) -> MigrationStats:
    """Follow an outgoing post-copy that is already under way (found by a restarted agent) to
    its end, without time limit: the destination owns the guest, only completion ends it.

    Raises:
        MigrationFailed: QEMU reported failure or cancellation.
    """
    with src.listener("MIGRATION") as listener:
        while True:
            stats = await _next_sample(src, listener, on_progress)
            if stats.status == "completed":
                return stats
            if stats.status in ("failed", "cancelled"):
                reply = await src.execute("query-migrate")
                raise MigrationFailed(src.name, stats.status, str(reply.get("error-desc", "-")))


async def resume_completed_source(src: QmpSession) -> str:
    """Run the guest again on a source whose pre-copy migration completed but whose
    destination copy is gone (its QEMU died before the guest ran there). The caller must know
    that post-copy never started and that no destination QEMU exists any more: the source's
    memory is then the guest's only and current state.

    Returns:
        The run state reached (``running``).

    Raises:
        StateError: the source is not in ``postmigrate`` after a completed migration.
    """
    migration = await migration_status(src)
    status = str((await src.execute("query-status"))["status"])
    if migration != "completed" or status != "postmigrate":
        raise StateError(f"VM {src.name}", f"{status}/{migration}", "postmigrate/completed")
    await src.execute("cont")
    logger.warning("migration.source_resumed %s: destination copy gone", src.name)
    return str((await src.execute("query-status"))["status"])
