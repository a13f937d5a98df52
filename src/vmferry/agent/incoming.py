"""This host as a migration's destination: an empty QEMU waiting for the guest, the disk
export a source mirrors into, and the end of it (the guest runs here, or the copy is dropped)."""

from __future__ import annotations

import logging

from vmferry.agent.adopt import Spawn
from vmferry.agent.api import Arrival
from vmferry.agent.handoff import premap_disk
from vmferry.agent.launch import Launcher
from vmferry.agent.slots import Slots, VmState
from vmferry.agent.store import Marker, VmStore
from vmferry.agent.vm import RunningVm, check_guest_agent
from vmferry.core.errors import GuestError, QMPConnectError, StateError
from vmferry.core.model import MigrationOptions, NbdTarget, VmSpec
from vmferry.core.status import RunState
from vmferry.qemu.block import export_disk, unexport_disk
from vmferry.qemu.migration import run_state, start_incoming, wait_arrived, wait_running
from vmferry.qemu.tls import add_creds

__all__ = ["Incoming"]

logger = logging.getLogger(__name__)

_INCOMING_DONE_TIMEOUT_S = 60.0
_HEARTBEAT_TIMEOUT_S = 30.0
# An own guest that asked for heartbeats may not run the program (yet): wait less for it.
_OWN_HEARTBEAT_TIMEOUT_S = 10.0
_QUIT_WAIT_S = 5.0


class Incoming:
    """Incoming migrations of this host."""

    def __init__(self, slots: Slots, store: VmStore, launcher: Launcher, spawn: Spawn) -> None:
        self.spawn = spawn
        self.slots = slots
        self.store = store
        self.launcher = launcher
        self.address = launcher.config.migration_address

    async def prepare(
        self, spec: VmSpec, options: MigrationOptions
    ) -> tuple[str, NbdTarget | None]:
        """See :meth:`HostAgent.prepare_incoming`."""
        local = spec.disk is not None and spec.disk.storage == "local"
        tls_dir = self.launcher.tls_dir(options)  # refused before anything starts
        slot = await self.launcher.launch(spec, incoming=True, new_disk=local, hold=options.hold)
        assert slot.vm is not None
        directory = self.store.directory(spec.name)
        self.store.mark(directory, Marker.INCOMING)  # a restarted agent keeps it incoming
        if options.hold:
            self.store.mark(directory, Marker.HELD)
        try:
            creds = None if tls_dir is None else await add_creds(slot.vm.qmp, tls_dir, "server")
            uri = await start_incoming(slot.vm.qmp, self.address, options, tls_creds=creds)
            nbd = await export_disk(slot.vm.qmp, self.address, tls_creds=creds) if local else None
        except BaseException:
            await slot.vm.stop()
            self.launcher.drop(spec.name, self.store.owned_disk(spec))
            raise
        logger.info("migration.incoming %s at %s (disk %s)", spec.name, uri, nbd)
        return uri, nbd

    async def finish(self, name: str) -> Arrival:
        """See :meth:`HostAgent.finish_incoming`."""
        slot, vm = self.slots.running(name, VmState.INCOMING)
        async with slot.lock:
            # A local disk's export is gone already: the switchover waited for release_disk.
            status = await wait_arrived(vm.qmp, _INCOMING_DONE_TIMEOUT_S)
            if status is RunState.PAUSED:
                # Held for the comparison of both copies, or a cold move (the source was
                # stopped before sending, so QEMU does not autostart). The source is in
                # 'postmigrate' and will never run again.
                await vm.qmp.execute("cont")
            self.store.unmark(self.store.directory(name), Marker.HELD)
            await wait_running(vm.qmp, _HEARTBEAT_TIMEOUT_S)
            slot.base = VmState.RUNNING
            self.store.unmark(self.store.directory(name), Marker.INCOMING)
            arrival = await self._arrived(vm)
        logger.info("migration.arrived %s %s", name, arrival)
        return arrival

    async def _arrived(self, vm: RunningVm) -> Arrival:
        """The lab guest's first heartbeat and page check; a user's guest's first heartbeat
        (if it sends them) and its agent."""
        if not vm.spec.is_lab_guest:
            first_ms = None
            if vm.channel is not None:
                try:
                    await vm.channel.wait_heartbeat_after(0.0, _OWN_HEARTBEAT_TIMEOUT_S)
                    first_ms = vm.heartbeats.first_arrival_ms
                except GuestError as err:
                    logger.warning("migration.no_heartbeat %s: %s", vm.spec.name, err)
            return Arrival(first_ms, None, await check_guest_agent(vm))
        assert vm.channel is not None
        await vm.channel.wait_heartbeat_after(0.0, _HEARTBEAT_TIMEOUT_S)
        first_ms = vm.heartbeats.first_arrival_ms
        assert first_ms is not None
        integrity = await vm.verify()
        await vm.heartbeat_for(measuring=False)  # the move's stalls are measured
        return Arrival(first_ms, integrity, None)

    async def abort(self, name: str) -> None:
        """See :meth:`HostAgent.abort_incoming`."""
        slot = self.slots.get(name)
        if slot.is_launching:
            # Its controller died while preparing it (the launch goes on): retiring the
            # record now would let the launch's end remove whatever holds the name then.
            raise StateError(f"incoming VM {name}", "starting", "started (ask again)")
        if slot.state == VmState.INCOMING and slot.vm is not None and slot.vm.process.is_running:
            try:
                status: RunState | None = await run_state(slot.vm.qmp)
            except QMPConnectError:
                # QEMU quits when its incoming stream breaks (the source cancelled) and may
                # be on its way out: once gone it holds nothing to keep.
                if await slot.vm.process.wait(_QUIT_WAIT_S) is None:
                    raise
                status = None
            # A held copy that arrived is paused and never ran: it may go too.
            held = self.store.is_marked(self.store.directory(name), Marker.HELD)
            unstarted = status in (None, RunState.INMIGRATE) or (held and status is RunState.PAUSED)
            if not unstarted:
                raise StateError(f"incoming VM {name}", f"{status} (received)", RunState.INMIGRATE)
        await self.launcher.retire(name, VmState.INCOMING)
        logger.info("migration.incoming_aborted %s", name)

    async def release_disk(self, name: str) -> None:
        """See :meth:`HostAgent.release_disk`."""
        slot, vm = self.slots.running(name, VmState.INCOMING)
        if self.store.owned_disk(slot.spec) is not None:
            await unexport_disk(vm.qmp)
            # The source's mirror completed (its last write flushed here): the disk is final.
            premap_disk(slot, self.store, self.spawn)
