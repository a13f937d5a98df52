"""Driving one QEMU-to-QEMU migration over QMP: prepare the destination, set capabilities and
parameters, start, follow progress (events plus ``query-migrate``), complete or cancel.

The driver never tears anything down: the caller decides what to stop once it knows which side
holds the guest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from qemu.qmp import EventListener

from vmferry.core.blind import ZeroPricing
from vmferry.core.errors import (
    FerryError,
    MigrationFailed,
    QMPTimeout,
    StateError,
)
from vmferry.core.model import MigrationOptions, MigrationStats
from vmferry.core.status import MigrationStatus, RunState
from vmferry.qemu.session import DEFAULT_TIMEOUT_S, QmpSession
from vmferry.qemu.tls import migration_tls_parameters, tls_hostname

__all__ = [
    "MigrationOptions",
    "cancel_migration",
    "capabilities_for",
    "ensure_running",
    "follow_postcopy",
    "migration_status",
    "parse_migration_status",
    "precopy_bandwidth",
    "query_stats",
    "resume_completed_source",
    "run_migration",
    "run_state",
    "set_bandwidth",
    "set_precopy_bandwidth",
    "set_switchover_bandwidth",
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
_ON_THE_WAY = frozenset({RunState.INMIGRATE, RunState.FINISH_MIGRATE})


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
        # Held: disks stay inactive until it runs (the source may take the guest back).
        "late-block-activate": options.hold,
    }


def source_parameters_for(options: MigrationOptions) -> dict[str, object]:
    """``migrate-set-parameters`` arguments for the source."""
    params: dict[str, object] = {
        "max-bandwidth": options.max_bandwidth_bps or UNLIMITED_BPS,
        "downtime-limit": options.downtime_limit_ms,
        # QEMU's own estimate until the pre-copy shows otherwise (ZeroPricing); reset, since
        # a source whose earlier attempt was told another keeps it.
        "avail-switchover-bandwidth": 0,
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


def parse_migration_status(value: object) -> MigrationStatus:
    """QEMU's migration status string as a :class:`MigrationStatus`.

    Raises:
        FerryError: a value this QEMU should not send.
    """
    try:
        return MigrationStatus(str(value))
    except ValueError:
        raise FerryError(f"QEMU reported an unknown migration status {value!r}") from None


def stats_from_reply(reply: Mapping[str, Any]) -> MigrationStats:
    """Validate a ``query-migrate`` reply into :class:`MigrationStats`.

    Raises:
        FerryError: an unknown status.
    """
    ram = reply.get("ram") or {}
    return MigrationStats(
        status=parse_migration_status(reply.get("status", "none")),
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
        normal_pages=int(ram.get("normal", 0)),
        zero_pages=int(ram.get("duplicate", 0)),
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
    await _configure_source(src, uri, options, before_switchover is not None, tls_creds)
    if options.mechanism == "cold":
        await src.execute("stop")
    with src.listener("MIGRATION") as listener:
        await src.execute("migrate", {"uri": uri})
        logger.info("migration.started %s -> %s (%s)", src.name, uri, options.mechanism)
        if options.mechanism == "postcopy":
            await start_postcopy(src)
        pricing = _zero_pricing(options)
        try:
            previous = MigrationStatus.SETUP
            # QEMU may still say pre-switchover for a moment after migrate-continue (seen
            # with multifd over TLS): the hook runs once per migration, never twice.
            switched_over = False
            async with asyncio.timeout(options.timeout_s) as deadline:
                while True:
                    stats = await _next_sample(src, listener, on_progress)
                    if pricing is not None and (told := pricing.feed(stats)) is not None:
                        pricing = await _tell_switchover(src, pricing, told)
                    if stats.status.is_postcopy and deadline.when() is not None:
                        # The destination owns the guest now: a post-copy cannot be
                        # cancelled, only completed (or paused and recovered), however long.
                        deadline.reschedule(None)
                    if stats.status != previous and stats.status.is_postcopy_broken:
                        await _log_broken(src, stats.status)
                    previous = stats.status
                    if (
                        stats.status is MigrationStatus.PRE_SWITCHOVER
                        and before_switchover is not None
                    ):
                        if not switched_over:
                            switched_over = True
                            await _switch_over(src, before_switchover)
                        continue
                    if stats.status is MigrationStatus.COMPLETED:
                        logger.info("migration.complete %s %s", src.name, _summary(stats))
                        return stats
                    if stats.status in (MigrationStatus.FAILED, MigrationStatus.CANCELLED):
                        raise await _failure(src, stats.status)
        except TimeoutError:
            final = await cancel_migration(src)
            if final.status is MigrationStatus.COMPLETED:
                return final
            raise MigrationFailed(
                src.name, "active", f"did not finish within {options.timeout_s:g} s; cancelled"
            ) from None


def _zero_pricing(options: MigrationOptions) -> ZeroPricing | None:
    """The switchover bandwidth's keeper for a single-stream pre-copy (multifd's channels find
    zero pages themselves and count them apart; post-copy has no switchover threshold).
    ``VMFERRY_ZERO_PRICING=0`` in the agent's environment leaves QEMU's estimate alone."""
    if options.mechanism not in ("precopy", "xbzrle", "auto-converge"):
        return None
    if os.environ.get("VMFERRY_ZERO_PRICING", "").strip() == "0":  # bench/zero_pricing.sh
        return None
    cap_bps = options.max_bandwidth_bps
    return ZeroPricing(options.downtime_limit_ms, float(cap_bps or 0), capped=cap_bps is not None)


async def _tell_switchover(
    src: QmpSession, pricing: ZeroPricing, bandwidth_bps: int
) -> ZeroPricing | None:
    """Tell QEMU; a QEMU that refuses is left to its own estimate (the move goes on)."""
    try:
        await set_switchover_bandwidth(src, bandwidth_bps)
    except FerryError as err:
        logger.warning("migration.switchover_bandwidth %s not set: %s", src.name, err)
        return None
    return pricing


async def set_switchover_bandwidth(src: QmpSession, bandwidth_bps: int) -> None:
    """Tell QEMU the bandwidth its switchover threshold is to use (``avail-switchover-bandwidth``,
    bytes/s) instead of what its stream carried lately (see :class:`ZeroPricing`)."""
    await src.execute("migrate-set-parameters", {"avail-switchover-bandwidth": bandwidth_bps})
    logger.info("migration.switchover_bandwidth %s %d B/s", src.name, bandwidth_bps)


async def _failure(src: QmpSession, status: MigrationStatus) -> MigrationFailed:
    """QEMU's reason for a failed or cancelled migration."""
    reply = await src.execute("query-migrate")
    return MigrationFailed(src.name, status, str(reply.get("error-desc", status)))


async def _configure_source(
    src: QmpSession, uri: str, options: MigrationOptions, pause: bool, tls_creds: str | None
) -> None:
    """Set the source's capabilities (``pause``: pause before the switchover) and parameters."""
    capabilities = capabilities_for(options)
    capabilities["pause-before-switchover"] = pause
    await src.execute("migrate-set-capabilities", {"capabilities": _caps_arg(capabilities)})
    await src.execute(
        "migrate-set-parameters",
        {
            **source_parameters_for(options),
            **migration_tls_parameters(tls_creds, tls_hostname(uri) if tls_creds else None),
        },
    )


async def _log_broken(src: QmpSession, status: MigrationStatus) -> None:
    reply = await src.execute("query-migrate")
    logger.warning("migration.%s %s: %s", status, src.name, reply.get("error-desc", "-"))


def _summary(stats: MigrationStats) -> str:
    return f"total={stats.total_ms}ms downtime={stats.downtime_ms}ms"


async def _switch_over(src: QmpSession, hook: Callable[[], Awaitable[None]]) -> None:
    """Run ``hook`` at ``pre-switchover``, then let QEMU send the device state."""
    try:
        await hook()
    except BaseException:
        with contextlib.suppress(FerryError):
            await asyncio.shield(cancel_migration(src))
        raise
    await src.execute("migrate-continue", {"state": "pre-switchover"})


async def set_bandwidth(src: QmpSession, bandwidth_bps: int) -> None:
    """Change a running migration's bandwidth cap: pre-copy's (``max-bandwidth``) and, for a
    move that is or will be in post-copy, the background copy's (``max-postcopy-bandwidth``);
    QEMU applies both to the stream in flight."""
    await src.execute(
        "migrate-set-parameters",
        {"max-bandwidth": bandwidth_bps, "max-postcopy-bandwidth": bandwidth_bps},
    )
    logger.info("migration.cap %s %d B/s", src.name, bandwidth_bps)


async def precopy_bandwidth(src: QmpSession, timeout_s: float = DEFAULT_TIMEOUT_S) -> int:
    """The pre-copy bandwidth cap in force (``max-bandwidth``), bytes/s."""
    reply = await src.execute("query-migrate-parameters", timeout_s=timeout_s)
    return int(reply["max-bandwidth"])


async def set_precopy_bandwidth(
    src: QmpSession, bandwidth_bps: int, timeout_s: float = DEFAULT_TIMEOUT_S
) -> None:
    """Change only pre-copy's cap (``max-bandwidth``) of a running migration."""
    await src.execute(
        "migrate-set-parameters", {"max-bandwidth": bandwidth_bps}, timeout_s=timeout_s
    )
    logger.debug("migration.precopy_cap %s %d B/s", src.name, bandwidth_bps)


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
            if stats.status.is_terminal or stats.status is MigrationStatus.NONE:
                return stats
            await asyncio.sleep(_POLL_S)


async def run_state(session: QmpSession, timeout_s: float = DEFAULT_TIMEOUT_S) -> RunState:
    """QEMU's run state (``query-status``)."""
    reply = await session.execute("query-status", timeout_s=timeout_s)
    return RunState.parse(str(reply["status"]))


async def wait_running(session: QmpSession, timeout_s: float) -> None:
    """Wait until the guest's vCPUs run (the destination after switchover).

    Raises:
        StateError: if it does not reach ``running`` in time.
    """
    status = RunState.OTHER
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                status = await run_state(session)
                if status is RunState.RUNNING:
                    return
                await asyncio.sleep(_POLL_S / 5)
    except TimeoutError:
        raise StateError(f"VM {session.name}", status, RunState.RUNNING) from None


async def wait_arrived(session: QmpSession, timeout_s: float) -> RunState:
    """The run state a migration's QEMU settles in: a destination done loading the guest (a
    source reports completion a moment before), a source out of ``finish-migrate``. Raises
    TimeoutError when still on its way after ``timeout_s``."""
    async with asyncio.timeout(timeout_s):
        while True:
            status = await run_state(session)
            if status not in _ON_THE_WAY:
                return status
            await asyncio.sleep(0.002)


async def ensure_running(session: QmpSession) -> RunState:
    """Resume a source left paused by a failed switchover; return its final run state.

    Only for a migration known to have failed or been cancelled. A source in ``postmigrate``
    has handed the guest over and is never resumed: that would run the guest twice. Nor is a
    source whose migration entered post-copy (even paused): the destination runs the guest.
    """
    migration = await migration_status(session)
    if migration.is_postcopy:
        logger.warning("migration.no_resume %s: post-copy %s", session.name, migration)
        return await run_state(session)
    status = await run_state(session)
    if status is RunState.PAUSED:
        await session.execute("cont")
        status = await run_state(session)
    return status


# -- post-copy recovery ---------------------------------------------------------------------------
#
async def migration_status(session: QmpSession, timeout_s: float = 5.0) -> MigrationStatus:
    """This QEMU's (outgoing or incoming) migration status (``NONE`` when there is none).

    Not OOB: never for a destination whose post-copy may be broken (see above).
    """
    reply = await session.execute("query-migrate", timeout_s=timeout_s)
    return parse_migration_status(reply.get("status", "none"))


# -- a migration found in flight by a restarted agent ---------------------------------------------


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
            if stats.status is MigrationStatus.COMPLETED:
                return stats
            if stats.status in (MigrationStatus.FAILED, MigrationStatus.CANCELLED):
                reply = await src.execute("query-migrate")
                raise MigrationFailed(src.name, stats.status, str(reply.get("error-desc", "-")))


async def resume_completed_source(src: QmpSession) -> RunState:
    """Run the guest again on a source whose pre-copy migration completed but whose
    destination copy is gone (its QEMU died before the guest ran there). The caller must know
    that post-copy never started and that no destination QEMU exists any more: the source's
    memory is then the guest's only and current state.

    Returns:
        The run state reached (``RUNNING``).

    Raises:
        StateError: the source is not in ``postmigrate`` after a completed migration.
    """
    migration = await migration_status(src)
    status = await run_state(src)
    if migration is not MigrationStatus.COMPLETED or status is not RunState.POSTMIGRATE:
        raise StateError(f"VM {src.name}", f"{status}/{migration}", "postmigrate/completed")
    await src.execute("cont")
    logger.warning("migration.source_resumed %s: destination copy gone", src.name)
    return await run_state(src)
