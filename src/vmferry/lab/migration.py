"""One live migration between two QEMU instances on this machine, guest verified afterwards.

The rule that governs every branch here: at every moment exactly one intact copy of the guest
runs. The source is torn down only after QEMU reported ``completed`` *and* the destination runs;
on any failure before that, the migration is cancelled, the source resumed, and the destination
ended.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vmferry.agent.vm import RunningVm, launch
from vmferry.core.errors import FerryError
from vmferry.core.model import (
    IntegrityReport,
    MigrationOptions,
    MigrationReport,
    MigrationStats,
    ReportStatus,
)
from vmferry.core.phases import DestinationReady, Phase, QemuStatus, Verified, transition
from vmferry.core.status import MigrationStatus
from vmferry.guest.channel import now_ms
from vmferry.qemu.argv import Accel, BootFiles
from vmferry.qemu.migration import (
    cancel_migration,
    ensure_running,
    run_migration,
    start_incoming,
    wait_running,
)

__all__ = ["MigrationOutcome", "ProgressCallback", "migrate_between"]

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[Phase, MigrationStats | None], None]
_SWITCHOVER_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class MigrationOutcome:
    """The report and the instance that now holds the guest."""

    report: MigrationReport
    vm: RunningVm


async def migrate_between(
    source: RunningVm,
    destination_host: str,
    directory: Path,
    *,
    qemu: str,
    boot: BootFiles,
    accel: Accel,
    options: MigrationOptions,
    listen_host: str = "127.0.0.1",
    on_progress: ProgressCallback | None = None,
) -> MigrationOutcome:
    """Live-migrate (pre-copy) ``source`` to a new QEMU named ``destination_host``.

    Never raises for a failed migration: the report says ``failed`` and ``vm`` is the source,
    still running. Raises only when it cannot even tell where the guest is (both sides gone).
    """
    loop = asyncio.get_running_loop()
    heartbeats = source.channel.heartbeats
    phase = Phase.PREPARING
    last: MigrationStats | None = None
    started_s = loop.time()

    def notify(stats: MigrationStats | None) -> None:
        if on_progress is not None:
            on_progress(phase, stats)

    def follow(stats: MigrationStats) -> None:
        nonlocal phase, last
        last = stats
        if stats.status not in (MigrationStatus.FAILED, MigrationStatus.CANCELLED):
            phase = transition(phase, QemuStatus(stats.status))
        notify(stats)

    notify(None)
    destination: RunningVm | None = None
    try:
        destination = await launch(
            qemu,
            source.spec,
            boot,
            directory,
            role=destination_host,
            accel=accel,
            heartbeats=heartbeats,
            incoming=True,
        )
        uri = await start_incoming(destination.qmp, listen_host, options)
        phase = transition(phase, DestinationReady())
        notify(None)
        heartbeats.open_window(now_ms())
        final = await run_migration(source.qmp, uri, options, follow)
        follow(final)
        completed_ms = now_ms()
    except (FerryError, OSError) as err:
        phase = Phase.FAILED
        notify(last)
        heartbeats.close_window()
        return await _roll_back(source, destination, last, str(err), started_s)
    except asyncio.CancelledError:
        # Interrupted (Ctrl-C, deadline of a caller): put the guest back before giving up.
        heartbeats.close_window()
        await asyncio.shield(_roll_back(source, destination, last, "interrupted", started_s))
        raise

    # Past completion the destination holds the only current copy of the guest: the source is
    # in 'postmigrate' and is never resumed from here on.
    guest_alive = True
    error: str | None = None
    integrity: IntegrityReport | None = None
    try:
        await wait_running(destination.qmp, _SWITCHOVER_TIMEOUT_S)
        await destination.channel.wait_heartbeat_after(completed_ms, _SWITCHOVER_TIMEOUT_S)
    except FerryError as err:
        guest_alive = False
        error = f"guest not alive on {destination_host} after switchover: {err}"
    guest_downtime_ms = heartbeats.close_window() if guest_alive else None
    total_ms = round((loop.time() - started_s) * 1000)
    await source.stop()
    if guest_alive:
        try:
            integrity = await destination.verify()
            phase = transition(phase, Verified())
        except FerryError as err:
            error = f"verify failed: {err}"
    notify(last)
    report = MigrationReport(
        vm=source.spec.name,
        source=source.role,
        destination=destination_host,
        running_on=destination_host,
        strategy="precopy",
        status="completed",
        error=error,
        total_ms=total_ms,
        downtime_ms=final.downtime_ms,
        guest_downtime_ms=guest_downtime_ms,
        transferred_bytes=final.transferred_bytes,
        iterations=final.iterations,
        predicted=None,
        integrity=integrity,
        guest_alive=guest_alive,
    )
    logger.info(
        "migration.done %s %s -> %s total=%dms downtime=%sms guest_downtime=%sms ok=%s",
        report.vm,
        report.source,
        report.destination,
        report.total_ms,
        report.downtime_ms,
        report.guest_downtime_ms,
        report.is_success,
    )
    return MigrationOutcome(report, destination)


async def _roll_back(
    source: RunningVm,
    destination: RunningVm | None,
    last: MigrationStats | None,
    reason: str,
    started_s: float,
) -> MigrationOutcome:
    """Make sure the guest runs on the source again and the destination is gone."""
    logger.error("migration.failed %s: %s", source.spec.name, reason)
    status: ReportStatus = "failed"
    try:
        if source.process.is_running:
            final = await cancel_migration(source.qmp)
            if final.status is MigrationStatus.COMPLETED and destination is not None:
                # The switchover won the race against our cancel: the guest lives there now.
                await source.stop()
                return await _completed_late(source, destination, final, started_s)
            await ensure_running(source.qmp)
    except FerryError as err:
        logger.debug("rollback on %s: %s", source.label, err, exc_info=True)
    if destination is not None:
        await destination.stop()
    alive = source.process.is_running
    report = MigrationReport(
        vm=source.spec.name,
        source=source.role,
        destination=destination.role if destination is not None else "?",
        running_on=source.role if alive else "",
        strategy="precopy",
        status=status,
        error=reason,
        total_ms=round((asyncio.get_running_loop().time() - started_s) * 1000),
        downtime_ms=None,
        guest_downtime_ms=None,
        transferred_bytes=last.transferred_bytes if last is not None else 0,
        iterations=last.iterations if last is not None else 0,
        predicted=None,
        integrity=None,
        guest_alive=alive,
    )
    return MigrationOutcome(report, source)


async def _completed_late(
    source: RunningVm, destination: RunningVm, final: MigrationStats, started_s: float
) -> MigrationOutcome:
    integrity: IntegrityReport | None = None
    error: str | None = "completed while being cancelled"
    try:
        await wait_running(destination.qmp, _SWITCHOVER_TIMEOUT_S)
        integrity = await destination.verify()
    except FerryError as err:
        error = f"{error}; {err}"
    report = MigrationReport(
        vm=source.spec.name,
        source=source.role,
        destination=destination.role,
        running_on=destination.role,
        strategy="precopy",
        status="completed",
        error=error,
        total_ms=round((asyncio.get_running_loop().time() - started_s) * 1000),
        downtime_ms=final.downtime_ms,
        guest_downtime_ms=None,
        transferred_bytes=final.transferred_bytes,
        iterations=final.iterations,
        predicted=None,
        integrity=integrity,
        guest_alive=integrity is not None,
    )
    return MigrationOutcome(report, destination)
