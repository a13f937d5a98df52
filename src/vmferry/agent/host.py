"""The host agent's model of its host: the VMs it owns and every operation on them.

HTTP lives in :mod:`vmferry.agent.server`; this module is the one facade both it and an
in-process caller use. Each concern lives in its own module, and :class:`HostAgent` composes
them: the state directory (:mod:`.store`), the VM table and room on the host (:mod:`.slots`),
starting and ending QEMUs (:mod:`.launch`), pre-flight measurements (:mod:`.preflight`), this
host as a destination (:mod:`.incoming`) or as a source (:mod:`.outgoing`), post-copy recovery
(:mod:`.recovery`) and adoption after a restart (:mod:`.adopt`). Long operations (outgoing
migrations) run as tasks of the agent's task group; HTTP handlers only start and observe them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any

from vmferry.agent.adopt import adopt, end_orphan
from vmferry.agent.api import (
    Arrival,
    GuestMeasurement,
    HandoffDigests,
    HostInfo,
    OutgoingResult,
    Profile,
    VmInfo,
)
from vmferry.agent.bandwidth import ProbeResult, SinkResult
from vmferry.agent.config import AgentConfig
from vmferry.agent.handoff import handoff_digests, release_hold
from vmferry.agent.incoming import Incoming
from vmferry.agent.launch import Launcher
from vmferry.agent.outgoing import Outgoings
from vmferry.agent.preflight import Preflight
from vmferry.agent.profile import Profiler
from vmferry.agent.qemu_user import QemuArea
from vmferry.agent.recovery import Recovery
from vmferry.agent.slots import Slots, VmState
from vmferry.agent.store import VmStore
from vmferry.core.errors import ConfigError, StateError
from vmferry.core.handoff import VerifyMode
from vmferry.core.model import (
    IntegrityReport,
    MigrationOptions,
    MigrationStats,
    NbdTarget,
    VmSpec,
)
from vmferry.core.status import MigrationStatus, RunState
from vmferry.qemu.argv import Accel, BootFiles
from vmferry.qemu.binary import QemuBinary
from vmferry.qemu.guest_agent import ExecResult
from vmferry.qemu.migration import migration_status, run_state
from vmferry.qemu.qcow2 import probe_image

__all__ = ["AgentConfig", "HostAgent", "VmState"]

logger = logging.getLogger(__name__)


class HostAgent:
    """Owns the VMs of one host."""

    def __init__(
        self, config: AgentConfig, qemu: QemuBinary, boot: BootFiles, accel: Accel
    ) -> None:
        self.config = config
        self.qemu = qemu
        self.boot = boot
        self.accel = accel
        self.logger = logger.getChild(config.host)
        self.area = QemuArea(config.state_dir, config.qemu_user)
        self._tasks: asyncio.TaskGroup | None = None
        self._background: set[asyncio.Task[None]] = set()
        self.store = VmStore(config)
        self.slots = Slots(config, qemu)
        self._launcher = Launcher(config, qemu, boot, accel, self.slots, self.store, self.area)
        scratch = None if config.qemu_user is None else self.area.scratch_dir
        self._preflight = Preflight(self.slots, self.store, scratch)
        self._profiler = Profiler(self._preflight, self.slots, config.profile_interval_s)
        self._incoming = Incoming(self.slots, self.store, self._launcher, self._spawn)
        self._outgoing = Outgoings(
            self.slots, self.store, self._launcher, self._spawn, self._profiler.record_transfer
        )
        self._recovery = Recovery(self.slots, config.migration_address)

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self, tasks: asyncio.TaskGroup) -> None:
        """Adopt the VMs an earlier agent left running; ``tasks`` owns background work."""
        self._tasks = tasks
        self.area.prepare()
        self._spawn(self._profiler.run(), "profiler")
        for directory in self.store.directories():
            if self.store.has_spec(directory):
                await adopt(self.store, self.slots, directory, self.config.host, self._spawn)
            else:
                await end_orphan(self.store, directory)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        if self._tasks is None:
            coro.close()
            raise StateError("agent", "not started", "started")
        task = self._tasks.create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def cancel_background(self) -> None:
        """Cancel in-flight migrations (each cancels its QEMU migration; guests stay here)."""
        for task in self._background:
            task.cancel()

    async def close(self) -> None:
        """Let go of every VM without stopping it (the agent is exiting)."""
        await self._preflight.close()
        for slot in self.slots:
            if slot.vm is not None:
                await slot.vm.detach()
        self.area.remove()

    # -- queries -------------------------------------------------------------------------------

    def info(self) -> HostInfo:
        return self.slots.host_info(self.accel)

    def list_vms(self) -> list[VmInfo]:
        return [self.slots.vm_info(slot) for slot in self.slots]

    def get(self, name: str) -> VmInfo:
        """Raises: NotFound."""
        return self.slots.vm_info(self.slots.get(name))

    async def qemu_state(self, name: str) -> tuple[RunState, MigrationStatus]:
        """What VM ``name``'s QEMU itself says: its run state (``query-status``) and its
        migration status (``query-migrate``; ``NONE`` when none), which can differ from this
        agent's state (e.g. a destination that completed without a controller still counts as
        ``incoming`` here but runs the guest); ``(GONE, GONE)`` when no QEMU runs it.

        Raises:
            NotFound: no such VM.
            QMPCommandError, QMPTimeout: QEMU did not answer.
        """
        slot = self.slots.get(name)
        if slot.vm is None or not slot.vm.process.is_running:
            return RunState.GONE, MigrationStatus.GONE
        return await run_state(slot.vm.qmp), await migration_status(slot.vm.qmp)

    # -- VM lifecycle --------------------------------------------------------------------------

    async def create(self, spec: VmSpec, image: Path | None = None) -> VmInfo:
        """Boot a new VM on this host. With ``image`` (a user's qcow2 or raw image on this
        host) the VM's disk is a copy of it, of the image's size; the image is only read.

        Raises:
            ConfigError: duplicate name, unknown machine type/CPU model, a shared disk on a
                host without shared storage, an image of that name exists already.
            UnusableImage: ``image`` is missing, unreadable, not a disk image, of another
                format, or in use by another QEMU.
            CapacityError: not enough memory or disk space left on the host.
            QEMULaunchError, GuestError: it did not boot (nothing is left behind).
        """
        info = None
        if image is not None:
            if spec.disk is None:
                raise ConfigError(f"VM {spec.name}: an image needs a disk in the spec")
            info = await probe_image(image)
            spec = replace(spec, disk=replace(spec.disk, size_bytes=info.virtual_size_bytes))
        slot = await self._launcher.launch(spec, incoming=False, new_disk=True, image=info)
        slot.base = VmState.RUNNING
        self.logger.info("vm.created %s", spec.name)
        return self.slots.vm_info(slot)

    async def delete(self, name: str) -> None:
        """Stop a VM and forget it.

        Raises:
            NotFound: no such VM.
            StateError: it is migrating.
        """
        slot = self.slots.get(name)
        if slot.state not in (VmState.RUNNING, VmState.STOPPED):
            raise StateError(f"VM {name}", slot.state.value, "running or stopped")
        self._profiler.stop(name)
        async with slot.lock:
            if slot.vm is not None:
                await slot.vm.stop()
            # Deleting a VM deletes its disk, wherever it lives.
            self._launcher.drop(name, self.store.disk_path(slot.spec))
        self.logger.info("vm.deleted %s", name)

    async def verify(self, name: str) -> IntegrityReport:
        """Ask the guest to check its working set.

        Raises:
            NotFound, StateError, GuestError.
        """
        slot, vm = self.slots.running(name)
        async with slot.lock:
            return await vm.verify()

    async def forget(self, name: str) -> None:
        """Drop the record of VM ``name`` whose QEMU died here while the guest runs elsewhere
        (or is lost), with this host's local image of it; a shared image is left alone.

        Raises:
            NotFound: no such VM.
            StateError: its QEMU still runs, or is being started (a controller that died
                while preparing it leaves the launch going: dropping the record now would let
                its end remove whatever holds the name then).
        """
        slot = self.slots.get(name)
        if slot.is_launching:
            raise StateError(f"VM {name}", "starting", "stopped (its QEMU dead)")
        if slot.vm is not None and slot.vm.process.is_running:
            raise StateError(f"VM {name}", slot.state.value, "stopped (its QEMU dead)")
        self._profiler.stop(name)
        async with slot.lock:
            if slot.vm is not None:
                await slot.vm.stop()  # reaps it and closes our connections
            self._launcher.drop(name, self.store.owned_disk(slot.spec))
        self.logger.info("vm.forgotten %s", name)

    # -- pre-flight measurements ---------------------------------------------------------------

    async def measure(self, name: str) -> GuestMeasurement:
        """Profile VM ``name`` for a migration plan (about a second; the guest keeps running);
        the result becomes its rolling profile.

        Raises:
            NotFound, StateError: no running VM of that name.
            MeasurementError: QEMU's answers could not be used.
        """
        return await self._profiler.measure(name)

    def profile(self, name: str, address: str | None) -> Profile:
        """VM ``name``'s rolling profile and the path to migration address ``address``, as
        last measured (nothing is measured now; see :mod:`vmferry.agent.profile`).

        Raises:
            NotFound: no such VM.
        """
        return self._profiler.profile(name, address)

    def record_bandwidth(self, address: str, bandwidth_bps: float) -> None:
        """Remember a probe's figure for the path from here to ``address``."""
        self._profiler.paths.record_probe(address, bandwidth_bps)

    async def open_sink(self) -> int:
        """Listen for a bandwidth probe on the migration address; returns the port."""
        return await self._preflight.open_sink(self.config.migration_address)

    async def sink_result(self, port: int, timeout_s: float) -> SinkResult:
        """What the sink on ``port`` received (then it is closed).

        Raises:
            NotFound: no such sink.
            BandwidthProbeError: no complete probe arrived.
        """
        return await self._preflight.sink_result(port, timeout_s)

    async def probe(self, address: str, port: int, duration_ms: int) -> ProbeResult:
        """Stream incompressible bytes to another host's sink (from this host's network)."""
        return await self._preflight.probe(address, port, duration_ms)

    # -- incoming migration (this host is the destination) --------------------------------------

    async def prepare_incoming(
        self, spec: VmSpec, options: MigrationOptions
    ) -> tuple[str, NbdTarget | None]:
        """Start an empty QEMU for ``spec`` waiting for its state.

        A disk on local storage gets a new empty image here, exported over NBD for the
        source's mirror; a disk on shared storage is opened where it is (QEMU keeps it inactive,
        without the write lock, until the switchover).

        Returns:
            The URI to send RAM to and, for a local disk, the NBD export to mirror into.

        Raises:
            ConfigError, CapacityError: as for :meth:`create`; a shared image this host cannot
                see; ``options.tls`` on a host without QEMU credentials (nothing started).
            QEMULaunchError: QEMU would not start.
            QMPCommandError: QEMU refused the credentials or the listener (QEMU removed).
        """
        return await self._incoming.prepare(spec, options)

    async def finish_incoming(self, name: str) -> Arrival:
        """After the source reported completion: make sure the guest runs here and is intact.

        Returns:
            For the lab guest its first heartbeat seen from here (wall clock, ms) and its page
            check; for a user's guest what its guest agent said.

        Raises:
            StateError: not an incoming VM, or it did not start running.
            GuestError: the guest stays silent or does not answer verify.
        """
        return await self._incoming.finish(name)

    async def abort_incoming(self, name: str) -> None:
        """Drop a destination that will not receive the guest (and the image it created for
        a local disk; a shared image is left alone: the source still runs from it).

        Raises:
            NotFound: no such VM.
            StateError: it is not an unfinished incoming VM, its QEMU is still being
                started, or it has received the guest already (left QEMU's ``inmigrate``):
                that copy is never ended here.
        """
        await self._incoming.abort(name)

    async def release_disk(self, name: str) -> None:
        """Drop the NBD export of incoming VM ``name``'s disk (the source's mirror is done).

        Raises:
            NotFound, StateError: not an incoming VM.
        """
        await self._incoming.release_disk(name)

    # -- outgoing migration (this host is the source) -------------------------------------------

    def start_outgoing(
        self, name: str, uri: str, options: MigrationOptions, nbd: NbdTarget | None = None
    ) -> None:
        """Start migrating VM ``name`` to ``uri`` in the background; a disk on local storage is
        mirrored to ``nbd`` first.

        Raises:
            NotFound: no such VM.
            StateError: it is not running (e.g. already migrating: one migration per VM), or
                the agent is not started.
            ConfigError: a local disk without an NBD target, or a target without a local disk;
                ``options.tls`` on a host without QEMU credentials.
        """
        if self._tasks is None:
            raise StateError("agent", "not started", "started")
        self._outgoing.start(name, uri, options, nbd)
        self._profiler.stop(name)  # it runs elsewhere soon; its profile goes with no QEMU here

    async def outgoing_progress(
        self, name: str, since: int, wait_s: float
    ) -> tuple[list[MigrationStats], OutgoingResult | None]:
        """Samples after index ``since`` and the result once there is one (long-poll).

        Raises:
            NotFound: no such VM.
            StateError: no migration was started for it.
        """
        return await self._outgoing.progress(name, since, wait_s)

    def continue_outgoing(self, name: str) -> None:
        """Let VM ``name``'s migration, paused at the switchover with its disk synced, go on.

        Raises:
            NotFound, StateError: no migration in flight.
        """
        self._outgoing.go_on(name)

    async def start_postcopy(self, name: str) -> None:
        """Switch VM ``name``'s outgoing migration to post-copy (it must have been started with
        post-copy enabled).

        Raises:
            NotFound, StateError: no migration in flight.
            QMPCommandError: QEMU refused (e.g. post-copy not enabled).
        """
        await self._outgoing.start_postcopy(name)

    async def set_outgoing_cap(self, name: str, bandwidth_bps: int) -> None:
        """Change the bandwidth cap of VM ``name``'s outgoing migration while it sends (the
        disk copy's, then RAM's in pre-copy and post-copy).

        Raises:
            NotFound, StateError: no migration sending.
            ConfigError: ``bandwidth_bps`` not positive.
            QMPCommandError: QEMU refused.
        """
        if bandwidth_bps <= 0:
            raise ConfigError(f"a bandwidth cap must be positive, not {bandwidth_bps}")
        await self._outgoing.set_cap(name, bandwidth_bps)

    async def cancel_outgoing(self, name: str) -> None:
        """Ask QEMU to cancel VM ``name``'s outgoing migration (the result tells how it ended).

        Raises:
            NotFound, StateError: no migration in flight.
        """
        await self._outgoing.cancel(name)

    async def resume_source(self, name: str) -> None:
        """Run VM ``name`` here again after a completed pre-copy whose destination copy is
        gone (its QEMU died before the guest ran there): this host's memory is the guest's
        only current state. The caller must have made sure no destination QEMU is left.

        Raises:
            NotFound: no such VM.
            StateError: it has not migrated, or its migration entered post-copy (the
                destination ran the guest: resuming here would run an older copy).
        """
        await self._outgoing.resume_source(name)

    async def handoff_digests(
        self, name: str, mode: VerifyMode, seed: int, timeout_s: float
    ) -> HandoffDigests:
        """Digests of this host's stopped copy of VM ``name`` (a completed source, or a held
        destination that has received the whole guest), over the plan ``mode`` and ``seed``
        give. See :mod:`vmferry.agent.handoff`.

        Raises:
            NotFound: no such VM.
            StateError: its copy is not stopped.
            DigestError: its RAM or disk could not be read in time.
        """
        slot = self.slots.get(name)
        async with slot.lock:
            return await handoff_digests(slot, self.store, mode, seed, timeout_s)

    async def guest_exec(
        self, name: str, argv: list[str], timeout_s: float, input_bytes: bytes | None = None
    ) -> ExecResult:
        """Run ``argv`` in VM ``name``'s guest through its guest agent and wait for its end.

        Raises:
            NotFound: no such VM.
            StateError: it does not run here.
            GuestAgentError: no agent answers in the guest, or it refused the command.
        """
        _, vm = self.slots.running(name, VmState.RUNNING)
        return await vm.guest_agent.exec(argv, timeout_s=timeout_s, input_bytes=input_bytes)

    async def release_hold(self, name: str) -> None:
        """Let held incoming VM ``name`` run as soon as it arrives (a post-copy is starting).

        Raises:
            NotFound: no such VM.
            StateError: not an incoming VM still receiving.
        """
        slot = self.slots.get(name)
        async with slot.lock:
            await release_hold(slot, self.store)

    async def handoff(self, name: str) -> None:
        """End the source QEMU after a completed migration; the guest lives elsewhere now.

        Raises:
            NotFound: no such VM.
            StateError: the migration has not completed.
        """
        await self._outgoing.handoff(name)

    # -- post-copy recovery ----------------------------------------------------------------------

    async def pause_postcopy(self, name: str, attempt: int = 0) -> MigrationStatus:
        """Pause VM ``name``'s broken post-copy on this side (source or destination); a
        migration QEMU already paused is left as it is. Only OOB commands reach a destination
        QEMU (its main loop may wait for a page that will not come).

        Args:
            name: the VM.
            attempt: the controller's recovery attempt number (older ones are refused).

        Returns:
            ``POSTCOPY_PAUSED``, or ``COMPLETED`` if it finished meanwhile; a source whose
            link to the destination still works (the kernel's view of QEMU's connections:
            nothing unacknowledged, or acknowledgements coming) is not paused and answers
            ``POSTCOPY_ACTIVE`` (a pause then would fail the migration inside QEMU).

        Raises:
            NotFound: no such VM.
            StateError: it is not migrating in post-copy here; a stale attempt.
            QMPCommandError, QMPTimeout: QEMU failed.
        """
        return await self._recovery.pause(name, attempt)

    async def recover_incoming(self, name: str, attempt: int = 0) -> str:
        """Have incoming VM ``name``, whose post-copy is paused, listen for the source again.

        Returns:
            The URI the source resumes to.

        Raises:
            NotFound: no such VM.
            StateError: not an incoming VM with a paused post-copy; a stale attempt.
            QMPCommandError, QMPTimeout: QEMU failed.
        """
        return await self._recovery.listen(name, attempt)

    async def resume_outgoing(self, name: str, uri: str, attempt: int = 0) -> MigrationStatus:
        """Resume VM ``name``'s paused outgoing post-copy towards ``uri`` (the migration task
        keeps following it).

        Returns:
            The status reached: ``POSTCOPY_ACTIVE``/``COMPLETED`` (recovered),
            ``POSTCOPY_PAUSED`` (this attempt failed), or still ``POSTCOPY_RECOVER*``.

        Raises:
            NotFound: no such VM.
            StateError: no outgoing post-copy is paused; a stale attempt.
            QMPCommandError, QMPTimeout: QEMU failed.
        """
        return await self._recovery.resume(name, uri, attempt)
