"""This host as a migration's source: the migration task (disk mirror, RAM, the hand-over
of the disk at the switchover), what the controller observes and asks of it, and the end
(handoff, or the guest taken back).

The task's state is an :class:`~vmferry.core.outgoing.OutgoingState` kept in the VM's
:class:`~vmferry.agent.slots.Outgoing` record; every change goes through its table.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

from vmferry.agent.adopt import Spawn, follow, settle_failed
from vmferry.agent.api import OutgoingResult
from vmferry.agent.handoff import premap_disk
from vmferry.agent.launch import Launcher
from vmferry.agent.slots import Outgoing, Slot, Slots, VmState
from vmferry.agent.store import Marker, VmStore
from vmferry.agent.switch_priority import SwitchPriority
from vmferry.agent.vm import RunningVm
from vmferry.core.adoption import Settle
from vmferry.core.errors import ConfigError, FerryError, MigrationFailed, StateError
from vmferry.core.model import MigrationOptions, MigrationStats, NbdTarget
from vmferry.core.outgoing import OutgoingState
from vmferry.core.status import MigrationStatus, Stage
from vmferry.guest.channel import now_ms
from vmferry.qemu.block import (
    MirrorStatus,
    abort_mirror,
    finish_mirror,
    make_write_blocking,
    mirror_status,
    set_mirror_speed,
    start_mirror,
)
from vmferry.qemu.migration import (
    cancel_migration,
    ensure_running,
    resume_completed_source,
    run_migration,
    set_bandwidth,
    start_postcopy,
)
from vmferry.qemu.qcow2 import allocated_bytes
from vmferry.qemu.sockets import UnsentLimiter, unsent_limit_bytes, uri_host
from vmferry.qemu.tls import add_creds, migration_tls_creds

__all__ = ["Outgoings"]

logger = logging.getLogger(__name__)

# (name, uri, capped, samples) of a completed outgoing migration.
Completed = Callable[[str, str, bool, list[MigrationStats]], None]

_MIRROR_POLL_S = 0.2
# A background mirror whose remainder has not shrunk for this long is losing to the guest's
# writes: switch it to write-blocking so it converges (guest writes then go at link speed).
_MIRROR_STALL_S = 3.0
# How long a source paused at the switchover waits for the controller's go-ahead before it
# gives up, cancels and resumes the guest (a controller that died must not leave it paused).
_HANDOVER_TIMEOUT_S = 10.0
_MIRROR_ENDED = ("gone", "concluded", "aborting", "null")


class Outgoings:
    """Outgoing migrations of this host."""

    def __init__(
        self,
        slots: Slots,
        store: VmStore,
        launcher: Launcher,
        spawn: Spawn,
        on_completed: Completed | None = None,
    ) -> None:
        """``on_completed(name, uri, capped, samples)``: a migration completed (the rolling
        profile records its throughput for the path)."""
        self.slots = slots
        self.store = store
        self.launcher = launcher
        self.spawn = spawn
        self.on_completed = on_completed
        self.priority = SwitchPriority(slots)

    def start(self, name: str, uri: str, options: MigrationOptions, nbd: NbdTarget | None) -> None:
        """See :meth:`HostAgent.start_outgoing`."""
        slot, vm = self.slots.running(name)
        tls_dir = self.launcher.tls_dir(options)
        local = self.store.owned_disk(slot.spec) is not None
        if local and nbd is None:
            raise ConfigError(f"{name}'s disk is on local storage: an NBD target is needed")
        if not local and nbd is not None:
            raise ConfigError(f"{name} has no disk on local storage to mirror")
        self.store.unmark(self.store.directory(name), Marker.POSTCOPY)
        first = OutgoingState.RAM if nbd is None else OutgoingState.DISK_COPY
        slot.outgoing = Outgoing(first)
        slot.recovery_attempt = 0
        slot.disk_map = None
        self.spawn(self._run(slot, vm, uri, options, nbd, tls_dir), f"migrate-{name}")

    async def _run(
        self,
        slot: Slot,
        vm: RunningVm,
        uri: str,
        options: MigrationOptions,
        nbd: NbdTarget | None,
        tls_dir: Path | None,
    ) -> None:
        outgoing = slot.outgoing
        assert outgoing is not None
        heartbeats = vm.heartbeats
        await vm.heartbeat_for(measuring=True)  # its stalls are measured from here on
        heartbeats.open_window(now_ms())
        try:
            final, used_tls = await self._migrate(slot, vm, uri, options, nbd, tls_dir)
        except Exception as err:  # the task's boundary: whatever failed, put the guest back
            if not isinstance(err, FerryError | OSError):
                logger.exception("migration.crashed %s", vm.label)
            heartbeats.close_window()
            await self._settle(slot, vm, str(err))
            return
        except BaseException:
            # Agent shutting down mid-migration: leave the guest running here (the mirror
            # ends before the migration is cancelled, as on adoption).
            if nbd is not None:
                with contextlib.suppress(FerryError):
                    await asyncio.shield(abort_mirror(vm.qmp))
            with contextlib.suppress(FerryError):
                await asyncio.shield(cancel_migration(vm.qmp))
            with contextlib.suppress(FerryError):
                await asyncio.shield(ensure_running(vm.qmp))
            raise
        max_gap = heartbeats.close_window()
        result = OutgoingResult(
            "completed", None, final, heartbeats.last_arrival_ms, max_gap, tls=used_tls
        )
        outgoing.finish(result, OutgoingState.COMPLETED)
        if self.on_completed is not None:
            capped = options.max_bandwidth_bps is not None
            self.on_completed(vm.spec.name, uri, capped, outgoing.samples)

    async def _migrate(
        self,
        slot: Slot,
        vm: RunningVm,
        uri: str,
        options: MigrationOptions,
        nbd: NbdTarget | None,
        tls_dir: Path | None,
    ) -> tuple[MigrationStats, bool]:
        """The disk copy (if any), then QEMU's migration; returns its final sample and
        whether it ran over TLS."""
        outgoing = slot.outgoing
        assert outgoing is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + options.timeout_s
        creds = None if tls_dir is None else await add_creds(vm.qmp, tls_dir, "client")
        disk = MirrorStatus(0, 0, False, "none")
        if nbd is not None:
            disk = await self._copy_disk(slot, vm, nbd, options, creds, deadline)
            outgoing.move(OutgoingState.RAM)
        hook = self._switchover_hook(slot, vm, nbd is not None, options.switch_priority)
        outgoing.peer_address = uri_host(uri)
        pid, lowat_bytes = vm.process.pid, unsent_limit_bytes()
        limiter = None
        if pid is not None and lowat_bytes is not None:
            limiter = UnsentLimiter(pid, outgoing.peer_address, lowat_bytes)

        def push(stats: MigrationStats) -> None:
            if limiter is not None:  # multifd and post-copy open channels as they go
                limiter.apply()
            if stats.status.is_postcopy and outgoing.state is not OutgoingState.POSTCOPY:
                self.store.mark(vm.paths.directory, Marker.POSTCOPY)  # never resume here
                outgoing.move(OutgoingState.POSTCOPY)
                if options.switch_priority:  # the guest runs there: its switchover is over
                    name = vm.spec.name
                    self.spawn(self.priority.give_back(name), f"release-{name}")
            outgoing.push(
                replace(
                    stats, disk_copied_bytes=disk.copied_bytes, disk_total_bytes=disk.total_bytes
                )
            )

        ram_options = replace(options, timeout_s=max(1.0, deadline - loop.time()))
        if outgoing.cap_bps is not None:  # changed during the disk copy
            ram_options = replace(ram_options, max_bandwidth_bps=outgoing.cap_bps)
        try:
            final = await run_migration(
                vm.qmp, uri, ram_options, push, before_switchover=hook, tls_creds=creds
            )
        finally:
            if options.switch_priority:
                await asyncio.shield(self.priority.give_back(slot.spec.name))
        used_tls = await migration_tls_creds(vm.qmp) is not None
        final = replace(
            final, disk_copied_bytes=disk.copied_bytes, disk_total_bytes=disk.total_bytes
        )
        return final, used_tls

    def _switchover_hook(
        self, slot: Slot, vm: RunningVm, disk: bool, exclusive: bool
    ) -> Callable[[], Awaitable[None]] | None:
        """What runs with the guest paused at the switchover (None: QEMU need not pause
        there): the others' pre-copies held back, the disk handed over."""
        if not disk and not exclusive:
            return None

        async def hook() -> None:
            if exclusive:
                await self.priority.take(slot.spec.name)
            if disk:
                await self._hand_over_disk(slot, vm)

        return hook

    async def _copy_disk(
        self,
        slot: Slot,
        vm: RunningVm,
        nbd: NbdTarget,
        options: MigrationOptions,
        creds: str | None,
        deadline: float,
    ) -> MirrorStatus:
        """Mirror the local disk to ``nbd`` until in sync; returns what carried data."""
        if options.mechanism == "cold":
            await vm.qmp.execute("stop")  # the disk is copied with the guest paused
        image = self.store.owned_disk(slot.spec)
        assert image is not None
        assert slot.spec.disk is not None
        allocated = await allocated_bytes(image)
        await start_mirror(vm.qmp, nbd, speed_bps=options.max_bandwidth_bps, tls_creds=creds)
        synced = await self._mirror_until_ready(slot, vm, deadline)
        # QEMU's progress counts the whole virtual disk, zero areas included (they travel as
        # write-zeroes commands); what carried data is the allocation plus what the guest
        # re-dirtied during the copy.
        moved = min(
            synced.copied_bytes,
            allocated + max(0, synced.total_bytes - slot.spec.disk.size_bytes),
        )
        return replace(synced, copied_bytes=moved, total_bytes=moved)

    async def _settle(self, slot: Slot, vm: RunningVm, why: str) -> None:
        """After the task failed: judge the migration from QEMU's own state, once it
        answers again (a QMP timeout at the switchover, QEMU holding its main loop while it
        sends the device state over a slow link, does not mean the migration failed)."""
        outgoing = slot.outgoing
        assert outgoing is not None
        settled = await settle_failed(vm, why)
        result = settled.outcome or OutgoingResult("failed", why, None, None, None)
        if result.status == "failed" and result.stats is None:
            result = replace(result, stats=outgoing.last)
        if settled.decision.step is Settle.FOLLOW:
            if outgoing.state is not OutgoingState.POSTCOPY:
                outgoing.move(OutgoingState.POSTCOPY)
            self.spawn(follow(slot, vm), f"follow-{vm.label}")
            return
        target = settled.decision.outgoing or OutgoingState.RETURNED
        try:
            outgoing.finish(result, target)
        except StateError as err:
            # A post-copy that ended without completing: the guest left, never resume it.
            logger.error("migration.settle %s: %s", vm.label, err)
            outgoing.finish(result, OutgoingState.HANDED_OVER)
            return
        if target is OutgoingState.RETURNED:
            await vm.heartbeat_for(measuring=False)  # it runs on here, unmeasured

    async def _hand_over_disk(self, slot: Slot, vm: RunningVm) -> None:
        """At the switchover pause: complete the mirror, tell the controller (stage
        DISK_SYNCED), and wait until it has released the destination's export — the
        destination can only take over the disk once nothing else holds it writable.

        Raises:
            MigrationFailed: the mirror did not complete, the migration was cancelled, or no
                go-ahead came in time (the caller then cancels and resumes the guest here).
        """
        outgoing = slot.outgoing
        assert outgoing is not None
        await finish_mirror(vm.qmp)
        premap_disk(slot, self.store, self.spawn)  # final now: the handoff compares it
        outgoing.move(OutgoingState.SYNCED)
        if outgoing.last is not None:
            outgoing.push(replace(outgoing.last, stage=Stage.DISK_SYNCED))
        try:
            async with asyncio.timeout(_HANDOVER_TIMEOUT_S):
                while outgoing.state is OutgoingState.SYNCED:
                    await outgoing.wait_change(_HANDOVER_TIMEOUT_S)
        except TimeoutError:
            raise MigrationFailed(
                vm.label, "disk", f"no go-ahead for the switchover within {_HANDOVER_TIMEOUT_S:g} s"
            ) from None
        if outgoing.state.is_cancelled:
            raise MigrationFailed(vm.label, "disk", "cancelled at the switchover")

    async def _mirror_until_ready(self, slot: Slot, vm: RunningVm, deadline: float) -> MirrorStatus:
        """Follow the disk mirror until source and target are in sync, then make it
        write-blocking; report each sample as progress (stage DISK_COPY).

        Raises:
            MigrationFailed: the mirror failed, the migration was cancelled or ran out of time.
        """
        outgoing = slot.outgoing
        assert outgoing is not None
        loop = asyncio.get_running_loop()
        started = last_time = best_at = loop.time()
        last_copied = 0
        best_remaining: int | None = None
        blocking = False
        while True:
            status = await mirror_status(vm.qmp)
            now = loop.time()
            if status.status in _MIRROR_ENDED or status.error:
                raise MigrationFailed(
                    vm.label, "disk", f"disk mirror failed: {status.error or status.status}"
                )
            rate = (status.copied_bytes - last_copied) / max(now - last_time, 1e-3)
            last_copied, last_time = status.copied_bytes, now
            outgoing.push(_disk_sample(slot, status, round((now - started) * 1000), rate))
            if status.ready:
                if not blocking:
                    await make_write_blocking(vm.qmp)
                return status
            if outgoing.state.is_cancelled:
                raise MigrationFailed(vm.label, "disk", "cancelled during the disk copy")
            if now > deadline:
                raise MigrationFailed(vm.label, "disk", "the disk copy ran out of time")
            if best_remaining is None or status.remaining_bytes < best_remaining:
                best_remaining, best_at = status.remaining_bytes, now
            elif not blocking and now - best_at > _MIRROR_STALL_S:
                blocking = True
                await make_write_blocking(vm.qmp)
                logger.info("disk.mirror_stalled %s: write-blocking now", vm.label)
            await asyncio.sleep(_MIRROR_POLL_S)

    async def progress(
        self, name: str, since: int, wait_s: float
    ) -> tuple[list[MigrationStats], OutgoingResult | None]:
        """See :meth:`HostAgent.outgoing_progress`."""
        slot = self.slots.get(name)
        outgoing = slot.outgoing
        if outgoing is None:
            raise StateError(f"VM {name}", slot.state.value, "an outgoing migration")
        if len(outgoing.samples) <= since and outgoing.result is None:
            await outgoing.wait_change(wait_s)
        return outgoing.samples[since:], outgoing.result

    def go_on(self, name: str) -> None:
        """See :meth:`HostAgent.continue_outgoing`."""
        slot, _ = self.slots.running(name, VmState.MIGRATING)
        assert slot.outgoing is not None
        if slot.outgoing.state is OutgoingState.SYNCED:
            slot.outgoing.move(OutgoingState.RAM)

    async def start_postcopy(self, name: str) -> None:
        """See :meth:`HostAgent.start_postcopy`."""
        _, vm = self.slots.running(name, VmState.MIGRATING)
        await start_postcopy(vm.qmp)

    async def set_cap(self, name: str, bandwidth_bps: int) -> None:
        """See :meth:`HostAgent.set_outgoing_cap`."""
        slot, vm = self.slots.running(name, VmState.MIGRATING)
        outgoing = slot.outgoing
        if outgoing is None or outgoing.state not in _CAPPABLE:
            state = slot.state.value if outgoing is None else outgoing.state.value
            raise StateError(f"migration of {name}", state, "sending")
        outgoing.cap_bps = bandwidth_bps
        if self.priority.defer_cap(name, bandwidth_bps):
            return  # held back by another's switchover: the cap applies when it is over
        if outgoing.state is OutgoingState.DISK_COPY:
            await set_mirror_speed(vm.qmp, bandwidth_bps)
        else:
            await set_bandwidth(vm.qmp, bandwidth_bps)

    async def cancel(self, name: str) -> None:
        """See :meth:`HostAgent.cancel_outgoing`."""
        slot, vm = self.slots.running(name, VmState.MIGRATING)
        outgoing = slot.outgoing
        if outgoing is not None and outgoing.state in _CANCELLABLE:
            outgoing.move(OutgoingState.CANCELLING)  # seen by the disk copy and the hand-over
        await vm.qmp.execute("migrate_cancel")

    async def resume_source(self, name: str) -> None:
        """See :meth:`HostAgent.resume_source`."""
        slot, vm = self.slots.running(name, VmState.MIGRATED)
        if self.store.is_marked(self.store.directory(name), Marker.POSTCOPY):
            raise StateError(f"VM {name}", "migrated in post-copy", "migrated in pre-copy")
        async with slot.lock:
            await resume_completed_source(vm.qmp)
            slot.base = VmState.RUNNING
            slot.outgoing = None
        logger.warning("migration.source_resumed %s", name)

    async def handoff(self, name: str) -> None:
        """See :meth:`HostAgent.handoff`."""
        await self.launcher.retire(name, VmState.MIGRATED)
        logger.info("migration.handed_off %s", name)


_CANCELLABLE = frozenset({OutgoingState.DISK_COPY, OutgoingState.RAM, OutgoingState.SYNCED})
_CAPPABLE = frozenset({OutgoingState.DISK_COPY, OutgoingState.RAM, OutgoingState.POSTCOPY})


def _disk_sample(slot: Slot, status: MirrorStatus, total_ms: int, rate: float) -> MigrationStats:
    """A progress sample of the disk copy (QEMU's RAM migration has not started)."""
    return MigrationStats(
        status=MigrationStatus.NONE,
        stage=Stage.DISK_COPY,
        total_ms=total_ms,
        transferred_bytes=0,
        remaining_bytes=slot.spec.memory_bytes,
        total_bytes=slot.spec.memory_bytes,
        dirty_pages_rate=0,
        page_size=4096,
        iterations=0,
        throughput_bps=max(0, round(rate)),
        expected_downtime_ms=None,
        downtime_ms=None,
        disk_copied_bytes=status.copied_bytes,
        disk_total_bytes=status.total_bytes,
    )
