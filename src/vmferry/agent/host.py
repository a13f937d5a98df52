"""The host agent's model of its host: the VMs it owns and every operation on them.

HTTP lives in :mod:`vmferry.agent.server`; this module holds the rules. One :class:`HostAgent`
per host. It persists each VM's definition (``<state_dir>/vms/<name>/spec.json`` plus
``qemu.pid``) so a restarted agent reattaches to the VMs that kept running. Long operations
(outgoing migrations) run as tasks of the agent's task group; HTTP handlers only start and
observe them.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import shutil
import signal
from collections.abc import Coroutine
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from vmferry.agent.adopt import (
    INCOMING_MARKER,
    POSTCOPY_MARKER,
    Adopted,
    mark,
    settle,
    unmark,
)
from vmferry.agent.api import (
    CapacityError,
    GuestMeasurement,
    HostInfo,
    NotFound,
    OutgoingResult,
    VmInfo,
)
from vmferry.agent.bandwidth import BandwidthSink, ProbeResult, SinkResult, send_probe
from vmferry.agent.qemu_user import QemuArea, QemuUser
from vmferry.agent.vm import RunningVm, launch, reattach
from vmferry.core.errors import ConfigError, FerryError, MigrationFailed, QMPTimeout, StateError
from vmferry.core.heartbeat import HeartbeatGaps
from vmferry.core.model import (
    DISK_PHASE,
    DISK_SYNCED,
    IntegrityReport,
    MigrationOptions,
    MigrationStats,
    NbdTarget,
    VmSpec,
    spec_from_json,
    spec_to_json,
)
from vmferry.core.recovery import is_postcopy
from vmferry.guest.channel import now_ms
from vmferry.qemu.argv import Accel, BootFiles
from vmferry.qemu.binary import QemuBinary
from vmferry.qemu.block import (
    MirrorStatus,
    abort_mirror,
    export_disk,
    finish_mirror,
    make_write_blocking,
    mirror_status,
    start_mirror,
    unexport_disk,
)
from vmferry.qemu.measure import measure_disk_writes, measure_guest
from vmferry.qemu.migration import (
    cancel_migration,
    ensure_running,
    follow_postcopy,
    migration_status,
    pause_postcopy,
    recover_incoming,
    resume_completed_source,
    resume_postcopy,
    run_migration,
    start_incoming,
    start_postcopy,
    wait_running,
)
from vmferry.qemu.process import is_qemu_pid, process_uid
from vmferry.qemu.qcow2 import allocated_bytes, create_image, free_bytes, remove_image
from vmferry.qemu.tls import add_creds, migration_tls_creds
from vmferry.qemu.vcpu import vcpu_busy_fraction

__all__ = ["AgentConfig", "HostAgent", "VmState"]

logger = logging.getLogger(__name__)

_INCOMING_DONE_TIMEOUT_S = 60.0
_HEARTBEAT_TIMEOUT_S = 30.0
_MIRROR_POLL_S = 0.2
# A background mirror whose remainder has not shrunk for this long is losing to the guest's
# writes: switch it to write-blocking so it converges (guest writes then go at link speed).
_MIRROR_STALL_S = 3.0
# How long a source paused at the switchover waits for the controller's go-ahead before it
# gives up, cancels and resumes the guest (a controller that died must not leave it paused).
_HANDOVER_TIMEOUT_S = 10.0
# How long a failed migration's source QEMU may stay silent (e.g. its main loop held while a
# switchover crawls over a throttled link) before the agent stops waiting to judge it.
_BUSY_QEMU_WAIT_S = 900.0


async def _none() -> None:
    return None


class VmState(enum.Enum):
    RUNNING = "running"
    INCOMING = "incoming"  # destination of a migration, not yet finished
    MIGRATING = "migrating"  # source of a migration in flight
    MIGRATED = "migrated"  # source after completion: paused for good, awaiting handoff
    STOPPED = "stopped"  # its QEMU is gone (found dead on reattach)


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """What an agent needs to know about its host."""

    host: str
    state_dir: Path
    memory_bytes: int
    migration_address: str
    # Directory every host sees at the same path (VMs with storage "shared" keep their image
    # there); None: this host has no shared storage.
    shared_dir: Path | None = None
    # Space for local disk images (sum of their virtual sizes); None: the filesystem's free space.
    disk_bytes: int | None = None
    # QEMU's TLS credentials (ca-cert.pem, server-*.pem, client-*.pem) for migrations with
    # ``tls``; None: this host refuses them.
    qemu_tls_dir: Path | None = None
    # The user QEMU drops to after start-up; None: QEMU runs as the agent does.
    qemu_user: QemuUser | None = None


@dataclass(slots=True)
class Outgoing:
    """Progress of one outgoing migration, observed by HTTP long-polls."""

    samples: list[MigrationStats] = field(default_factory=list)
    result: OutgoingResult | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    cancel_requested: bool = False
    # Set by the controller once the destination released its disk export (or by a cancel).
    handover: asyncio.Event = field(default_factory=asyncio.Event)

    def push(self, stats: MigrationStats) -> None:
        self.samples.append(stats)
        self.changed.set()

    def finish(self, result: OutgoingResult) -> None:
        self.result = result
        self.changed.set()


@dataclass(slots=True)
class Slot:
    """One VM of this host."""

    spec: VmSpec
    state: VmState
    vm: RunningVm | None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    outgoing: Outgoing | None = None
    # Highest post-copy recovery attempt a controller sent for the current migration: requests
    # of older attempts, delivered late by TCP once a cut link is back, are refused.
    recovery_attempt: int = 0


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
        self._slots: dict[str, Slot] = {}
        self._tasks: asyncio.TaskGroup | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._sinks: dict[int, BandwidthSink] = {}
        self.area = QemuArea(config.state_dir, config.qemu_user)

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def vms_dir(self) -> Path:
        return self.config.state_dir / "vms"

    def _dir(self, name: str) -> Path:
        return self.vms_dir / name

    @property
    def disks_dir(self) -> Path:
        return self.config.state_dir / "disks"

    def _disk_path(self, spec: VmSpec) -> Path | None:
        """Where VM ``spec``'s image lives on this host (None: it has no disk).

        Raises:
            ConfigError: it is on shared storage and this host has none.
        """
        if spec.disk is None:
            return None
        if spec.disk.storage == "local":
            return self.disks_dir / f"{spec.name}.qcow2"
        if self.config.shared_dir is None:
            raise ConfigError(
                f"{self.config.host} has no shared storage for {spec.name} "
                "(start its agent with --shared-dir)"
            )
        return self.config.shared_dir / f"{spec.name}.qcow2"

    def _owned_disk(self, spec: VmSpec) -> Path | None:
        """The image this host removes together with the VM: a local one only."""
        if spec.disk is None or spec.disk.storage != "local":
            return None
        return self._disk_path(spec)

    async def start(self, tasks: asyncio.TaskGroup) -> None:
        """Adopt the VMs an earlier agent left running; ``tasks`` owns background work."""
        self._tasks = tasks
        self.vms_dir.mkdir(parents=True, exist_ok=True)
        self.area.prepare()
        for directory in sorted(p for p in self.vms_dir.iterdir() if p.is_dir()):
            if (directory / "spec.json").exists():
                await self._adopt(directory / "spec.json")
            else:
                await self._end_orphan(directory)

    async def _end_orphan(self, directory: Path) -> None:
        """End a QEMU whose start the previous agent never completed (it died between
        starting QEMU and recording the VM): no guest was created or received there yet."""
        try:
            pid = int((directory / "qemu.pid").read_text().strip())
        except (OSError, ValueError):
            pid = 0
        if pid and is_qemu_pid(pid):
            self.logger.warning("agent.orphan %s: ending QEMU pid %d", directory.name, pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            for _ in range(100):
                if not is_qemu_pid(pid):
                    break
                await asyncio.sleep(0.05)
        shutil.rmtree(directory, ignore_errors=True)

    async def _adopt(self, spec_file: Path) -> None:
        directory = spec_file.parent
        try:
            spec = spec_from_json(json.loads(spec_file.read_text()))
        except (OSError, ValueError, FerryError) as err:
            self.logger.error("agent.adopt: unreadable %s: %s", spec_file, err)
            return
        try:
            pid = int((directory / "qemu.pid").read_text().strip())
        except (OSError, ValueError):
            pid = 0
        if not pid or not is_qemu_pid(pid):
            self.logger.warning("agent.adopt: %s is no longer running", spec.name)
            self._slots[spec.name] = Slot(spec, VmState.STOPPED, None)
            return
        try:
            vm = await reattach(spec, directory, role=self.config.host, pid=pid)
        except FerryError as err:
            self.logger.error("agent.adopt: cannot reattach %s (pid %s): %s", spec.name, pid, err)
            self._slots[spec.name] = Slot(spec, VmState.STOPPED, None)
            return
        try:
            adopted = await settle(vm.qmp, directory)
        except FerryError as err:
            # Keep it attached (it may still be listed and deleted) but touch nothing more.
            self.logger.error("agent.adopt: cannot settle %s (pid %s): %s", spec.name, pid, err)
            adopted = Adopted("running", None)
        slot = Slot(spec, VmState(adopted.state), vm)
        self._slots[spec.name] = slot
        if adopted.outcome is not None or adopted.follow:
            slot.outgoing = Outgoing()
        if adopted.outcome is not None:
            assert slot.outgoing is not None
            slot.outgoing.finish(adopted.outcome)
        if adopted.follow:
            self._background_task(self._follow_postcopy(slot, vm), f"follow-{spec.name}")
        self.logger.info("agent.adopted %s pid=%s state=%s", spec.name, pid, slot.state.value)

    def _background_task(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        if self._tasks is None:
            raise StateError("agent", "not started", "started")
        task = self._tasks.create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _follow_postcopy(self, slot: Slot, vm: RunningVm) -> None:
        """Follow a post-copy an earlier agent started, to its end (see :mod:`.adopt`)."""
        outgoing = slot.outgoing
        assert outgoing is not None
        try:
            final = await follow_postcopy(vm.qmp, outgoing.push)
        except FerryError as err:
            # Never resumed here: the destination ran the guest.
            slot.state = VmState.MIGRATED
            last = outgoing.samples[-1] if outgoing.samples else None
            outgoing.finish(OutgoingResult("failed", str(err), last, None, None))
            return
        slot.state = VmState.MIGRATED
        try:
            used_tls = await migration_tls_creds(vm.qmp) is not None
        except FerryError:
            used_tls = False  # the report then understates it; the move itself completed
        outgoing.finish(OutgoingResult("completed", None, final, None, None, tls=used_tls))

    def cancel_background(self) -> None:
        """Cancel in-flight migrations (each cancels its QEMU migration; guests stay here)."""
        for task in self._background:
            task.cancel()

    async def close(self) -> None:
        """Let go of every VM without stopping it (the agent is exiting)."""
        for sink in self._sinks.values():
            await sink.close()
        self._sinks.clear()
        for slot in self._slots.values():
            if slot.vm is not None:
                await slot.vm.detach()
        self.area.remove()

    # -- queries -------------------------------------------------------------------------------

    def info(self) -> HostInfo:
        return HostInfo(
            host=self.config.host,
            memory_bytes=self.config.memory_bytes,
            memory_used_bytes=self._memory_used(),
            vms=len(self._slots),
            qemu_version=self.qemu.version_text,
            machine_types=tuple(sorted(self.qemu.machine_types)),
            cpu_models=tuple(sorted(self.qemu.cpu_models)),
            accel=self.accel,
            migration_address=self.config.migration_address,
            qemu_tls=self.config.qemu_tls_dir is not None,
            qemu_user=None if self.config.qemu_user is None else self.config.qemu_user.name,
        )

    def _memory_used(self) -> int:
        return sum(s.spec.memory_bytes for s in self._slots.values() if s.state != VmState.STOPPED)

    def _local_disk_used(self) -> int:
        return sum(
            s.spec.disk.size_bytes
            for s in self._slots.values()
            if s.spec.disk is not None and s.spec.disk.storage == "local"
        )

    def _check_disk_room(self, spec: VmSpec) -> None:
        """Raises: CapacityError when a new local image of ``spec`` would not fit."""
        if spec.disk is None or spec.disk.storage != "local":
            return
        need = spec.disk.size_bytes
        if self.config.disk_bytes is not None:
            free = self.config.disk_bytes - self._local_disk_used()
        else:
            free = free_bytes(self.disks_dir)
        if need > free:
            raise CapacityError(
                f"{self.config.host} has {free >> 20} MiB free for disks; "
                f"{spec.name} needs {need >> 20} MiB"
            )

    def _vm_info(self, slot: Slot) -> VmInfo:
        alive = slot.vm is not None and slot.vm.process.is_running
        state = slot.state if alive or slot.state == VmState.STOPPED else VmState.STOPPED
        pid = slot.vm.process.pid if slot.vm is not None and alive else None
        return VmInfo(
            name=slot.spec.name,
            host=self.config.host,
            state=state.value,
            memory_bytes=slot.spec.memory_bytes,
            vcpus=slot.spec.vcpus,
            workload=slot.spec.workload.to_spec(),
            pid=pid,
            machine_type=slot.spec.machine_type,
            cpu_model=slot.spec.cpu_model,
            disk=None if slot.spec.disk is None else slot.spec.disk.to_json(),
            qemu_uid=None if pid is None else process_uid(pid),
        )

    def list_vms(self) -> list[VmInfo]:
        return [self._vm_info(slot) for _, slot in sorted(self._slots.items())]

    def _slot(self, name: str) -> Slot:
        try:
            return self._slots[name]
        except KeyError:
            raise NotFound(f"no VM {name!r} on {self.config.host}") from None

    def get(self, name: str) -> VmInfo:
        """Raises: NotFound."""
        return self._vm_info(self._slot(name))

    async def qemu_state(self, name: str) -> tuple[str, str]:
        """What VM ``name``'s QEMU itself says: its run state (``query-status``: ``running``,
        ``paused``, ``inmigrate``, ``postmigrate``...) and its migration status
        (``query-migrate``; ``none`` when none), which can differ from this agent's state
        (e.g. a destination that completed without a controller still counts as ``incoming``
        here but runs the guest); ``("gone", "gone")`` when no QEMU runs it.

        Raises:
            NotFound: no such VM.
            QMPCommandError, QMPTimeout: QEMU did not answer.
        """
        slot = self._slot(name)
        if slot.vm is None or not slot.vm.process.is_running:
            return "gone", "gone"
        runstate = str((await slot.vm.qmp.execute("query-status"))["status"])
        return runstate, await migration_status(slot.vm.qmp)

    def _running(self, name: str, want: VmState = VmState.RUNNING) -> tuple[Slot, RunningVm]:
        slot = self._slot(name)
        if slot.state != want or slot.vm is None:
            raise StateError(f"VM {name}", slot.state.value, want.value)
        return slot, slot.vm

    # -- VM lifecycle --------------------------------------------------------------------------

    def _check_room(self, spec: VmSpec) -> None:
        if spec.name in self._slots:
            raise ConfigError(f"a VM named {spec.name!r} already exists on {self.config.host}")
        if spec.machine_type not in self.qemu.machine_types:
            raise ConfigError(f"{self.config.host} has no machine type {spec.machine_type}")
        if spec.cpu_model not in self.qemu.cpu_models:
            raise ConfigError(f"{self.config.host} has no CPU model {spec.cpu_model}")
        free = self.config.memory_bytes - self._memory_used()
        if spec.memory_bytes > free:
            raise CapacityError(
                f"{self.config.host} has {free >> 20} MiB free for VMs; "
                f"{spec.name} needs {spec.memory_bytes >> 20} MiB"
            )

    def _persist(self, spec: VmSpec) -> None:
        path = self._dir(spec.name) / "spec.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(spec_to_json(spec), indent=2) + "\n")
        tmp.replace(path)

    async def _retire(self, name: str, required: VmState) -> None:
        """End and forget VM ``name``'s QEMU, which must be in state ``required``, and remove
        its local disk image (a shared image belongs to whichever host runs the VM).

        Raises:
            NotFound: no such VM.
            StateError: it is in another state.
        """
        slot = self._slot(name)
        if slot.state != required:
            raise StateError(f"VM {name}", slot.state.value, required.value)
        if slot.vm is not None:
            await slot.vm.stop()
        self._forget(name, self._owned_disk(slot.spec))

    def _forget(self, name: str, disk: Path | None) -> None:
        """Drop the slot, its runtime directory and, if given, its disk image."""
        self._slots.pop(name, None)
        shutil.rmtree(self._dir(name), ignore_errors=True)
        if disk is not None:
            remove_image(disk)

    async def _launch(self, spec: VmSpec, *, incoming: bool, new_disk: bool) -> Slot:
        """Check room, reserve the name, create the disk image if ``new_disk``, start QEMU and
        persist the definition at once (so a successor agent, or `lab down`, finds it).
        Leaves nothing behind on failure (an image it did not create is never removed)."""
        self._check_room(spec)
        disk = self._disk_path(spec)
        if new_disk:
            self._check_disk_room(spec)
        elif disk is not None and not disk.exists():
            raise ConfigError(f"{self.config.host} cannot see {spec.name}'s disk image {disk}")
        slot = Slot(spec, VmState.INCOMING, None)  # reserves the name and memory meanwhile
        self._slots[spec.name] = slot
        created = None
        try:
            if new_disk and disk is not None and spec.disk is not None:
                await create_image(disk, spec.disk.size_bytes)
                created = disk
            slot.vm = await launch(
                self.qemu.path,
                spec,
                self.boot,
                self._dir(spec.name),
                role=self.config.host,
                accel=self.accel,
                heartbeats=HeartbeatGaps(),
                incoming=incoming,
                disk_image=disk,
                run_as=None if self.config.qemu_user is None else self.config.qemu_user.name,
            )
            self._persist(spec)
        except BaseException:
            if slot.vm is not None:
                await slot.vm.stop()
            self._forget(spec.name, created)
            raise
        return slot

    async def create(self, spec: VmSpec) -> VmInfo:
        """Boot a new VM on this host.

        Raises:
            ConfigError: duplicate name, unknown machine type/CPU model, a shared disk on a
                host without shared storage, an image of that name exists already.
            CapacityError: not enough memory or disk space left on the host.
            QEMULaunchError, GuestError: it did not boot (nothing is left behind).
        """
        slot = await self._launch(spec, incoming=False, new_disk=True)
        slot.state = VmState.RUNNING
        self.logger.info("vm.created %s", spec.name)
        return self._vm_info(slot)

    async def delete(self, name: str) -> None:
        """Stop a VM and forget it.

        Raises:
            NotFound: no such VM.
            StateError: it is migrating.
        """
        slot = self._slot(name)
        if slot.state not in (VmState.RUNNING, VmState.STOPPED):
            raise StateError(f"VM {name}", slot.state.value, "running or stopped")
        async with slot.lock:
            if slot.vm is not None:
                await slot.vm.stop()
            # Deleting a VM deletes its disk, wherever it lives.
            self._forget(name, self._disk_path(slot.spec))
        self.logger.info("vm.deleted %s", name)

    async def verify(self, name: str) -> IntegrityReport:
        """Ask the guest to check its working set.

        Raises:
            NotFound, StateError, GuestError.
        """
        slot, vm = self._running(name)
        async with slot.lock:
            return await vm.verify()

    # -- pre-flight measurements ---------------------------------------------------------------

    async def measure(self, name: str) -> GuestMeasurement:
        """Profile VM ``name`` for a migration plan (about a second; the guest keeps running).

        Raises:
            NotFound, StateError: no running VM of that name.
            MeasurementError: QEMU's answers could not be used.
        """
        slot, vm = self._running(name)
        async with slot.lock:
            pid = vm.process.pid
            busy_task = vcpu_busy_fraction(pid, slot.spec.vcpus) if pid is not None else _none()
            profile, busy, disk = await asyncio.gather(
                measure_guest(vm.qmp, self._scratch_dir(name)),
                busy_task,
                self._measure_disk(slot.spec, vm),
            )
        allocated, write_bps = disk
        return GuestMeasurement(
            ram_bytes=profile.ram_bytes,
            dirty_rate_bps=profile.dirty_rate_bps,
            zero_fraction=profile.memory.zero_fraction,
            compress_ratio=profile.memory.compress_ratio,
            vcpu_busy=busy,
            elapsed_ms=profile.elapsed_ms,
            disk_allocated_bytes=allocated,
            disk_write_bps=write_bps,
            disk_shared=slot.spec.disk is not None and slot.spec.disk.storage == "shared",
        )

    def _scratch_dir(self, name: str) -> Path:
        """Where QEMU may write memory samples: the VM's directory, unless QEMU dropped root
        (then the area its group can write)."""
        return self._dir(name) if self.config.qemu_user is None else self.area.scratch_dir

    def _tls_dir(self, options: MigrationOptions) -> Path | None:
        """The credentials QEMU loads for ``options`` (None: in clear).

        Raises:
            ConfigError: TLS asked for and this host has no QEMU credentials, or they are
                incomplete.
        """
        if not options.tls:
            return None
        if self.config.qemu_tls_dir is None:
            raise ConfigError(
                f"{self.config.host} has no QEMU TLS credentials for a --tls migration "
                "(start its agent with --qemu-tls-dir)"
            )
        return self.area.stage_tls(self.config.qemu_tls_dir)

    async def _measure_disk(self, spec: VmSpec, vm: RunningVm) -> tuple[int, int]:
        """Allocated bytes of the VM's image and its guest's write rate (0, 0 without a disk)."""
        disk = self._disk_path(spec)
        if disk is None:
            return 0, 0
        write_bps = await measure_disk_writes(vm.qmp, window_s=1.0)
        return await allocated_bytes(disk), write_bps

    async def open_sink(self) -> int:
        """Listen for a bandwidth probe on the migration address; returns the port."""
        sink = BandwidthSink(self.config.migration_address)
        port = await sink.start()
        self._sinks[port] = sink
        return port

    async def sink_result(self, port: int, timeout_s: float) -> SinkResult:
        """What the sink on ``port`` received (then it is closed).

        Raises:
            NotFound: no such sink.
            BandwidthProbeError: no complete probe arrived.
        """
        sink = self._sinks.pop(port, None)
        if sink is None:
            raise NotFound(f"no bandwidth sink on port {port}")
        try:
            return await sink.result(timeout_s)
        finally:
            await sink.close()

    async def probe(self, address: str, port: int, duration_ms: int) -> ProbeResult:
        """Stream incompressible bytes to another host's sink (from this host's network)."""
        return await send_probe(address, port, duration_ms=duration_ms)

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
        local = spec.disk is not None and spec.disk.storage == "local"
        tls_dir = self._tls_dir(options)  # refused before anything starts
        slot = await self._launch(spec, incoming=True, new_disk=local)
        assert slot.vm is not None
        mark(self._dir(spec.name), INCOMING_MARKER)  # a restarted agent keeps it incoming
        try:
            creds = None if tls_dir is None else await add_creds(slot.vm.qmp, tls_dir, "server")
            address = self.config.migration_address
            uri = await start_incoming(slot.vm.qmp, address, options, tls_creds=creds)
            nbd = await export_disk(slot.vm.qmp, address, tls_creds=creds) if local else None
        except BaseException:
            await slot.vm.stop()
            self._forget(spec.name, self._owned_disk(spec))
            raise
        self.logger.info("migration.incoming %s at %s (disk %s)", spec.name, uri, nbd)
        return uri, nbd

    async def finish_incoming(self, name: str) -> tuple[float, IntegrityReport]:
        """After the source reported completion: make sure the guest runs here and is intact.

        Returns:
            Wall-clock time (ms) of the first heartbeat seen from here, and the verify result.

        Raises:
            StateError: not an incoming VM, or it did not start running.
            GuestError: the guest stays silent or does not answer verify.
        """
        slot, vm = self._running(name, VmState.INCOMING)
        async with slot.lock:
            # A local disk's export is gone already: the switchover waited for release_disk.
            async with asyncio.timeout(_INCOMING_DONE_TIMEOUT_S):
                while True:
                    status = str((await vm.qmp.execute("query-status"))["status"])
                    if status != "inmigrate":
                        break
                    await asyncio.sleep(0.02)
            if status == "paused":
                # A cold move: the source was stopped before sending, so QEMU does not
                # autostart here. The source is in 'postmigrate' and will never run again.
                await vm.qmp.execute("cont")
            await wait_running(vm.qmp, _HEARTBEAT_TIMEOUT_S)
            await vm.channel.wait_heartbeat_after(0.0, _HEARTBEAT_TIMEOUT_S)
            first_ms = vm.channel.heartbeats.first_arrival_ms
            assert first_ms is not None
            slot.state = VmState.RUNNING
            unmark(self._dir(name), INCOMING_MARKER)
            integrity = await vm.verify()
        self.logger.info("migration.arrived %s ok=%s", name, integrity.ok)
        return first_ms, integrity

    async def abort_incoming(self, name: str) -> None:
        """Drop a destination that will not receive the guest (and the image it created for
        a local disk; a shared image is left alone: the source still runs from it).

        Raises:
            NotFound: no such VM.
            StateError: it is not an unfinished incoming VM, or its QEMU has received the
                guest already (left QEMU's ``inmigrate``): that copy is never ended here.
        """
        slot = self._slot(name)
        if slot.state == VmState.INCOMING and slot.vm is not None and slot.vm.process.is_running:
            status = str((await slot.vm.qmp.execute("query-status"))["status"])
            if status != "inmigrate":
                raise StateError(f"incoming VM {name}", f"{status} (received)", "inmigrate")
        await self._retire(name, VmState.INCOMING)
        self.logger.info("migration.incoming_aborted %s", name)

    # -- outgoing migration (this host is the source) -------------------------------------------

    def start_outgoing(
        self, name: str, uri: str, options: MigrationOptions, nbd: NbdTarget | None = None
    ) -> None:
        """Start migrating VM ``name`` to ``uri`` in the background; a disk on local storage is
        mirrored to ``nbd`` first.

        Raises:
            NotFound: no such VM.
            StateError: it is not running (e.g. already migrating: one migration per VM).
            ConfigError: a local disk without an NBD target, or a target without a local disk;
                ``options.tls`` on a host without QEMU credentials.
        """
        slot, vm = self._running(name)
        if self._tasks is None:
            raise StateError("agent", "not started", "started")
        tls_dir = self._tls_dir(options)
        local = self._owned_disk(slot.spec) is not None
        if local and nbd is None:
            raise ConfigError(f"{name}'s disk is on local storage: an NBD target is needed")
        if not local and nbd is not None:
            raise ConfigError(f"{name} has no disk on local storage to mirror")
        slot.state = VmState.MIGRATING
        slot.outgoing = Outgoing()
        slot.recovery_attempt = 0
        unmark(self._dir(name), POSTCOPY_MARKER)
        self._background_task(
            self._run_outgoing(slot, vm, uri, options, nbd, tls_dir), f"migrate-{name}"
        )

    async def _run_outgoing(
        self,
        slot: Slot,
        vm: RunningVm,
        uri: str,
        options: MigrationOptions,
        nbd: NbdTarget | None,
        tls_dir: Path | None = None,
    ) -> None:
        assert slot.outgoing is not None
        outgoing = slot.outgoing
        heartbeats = vm.channel.heartbeats
        heartbeats.open_window(now_ms())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + options.timeout_s
        mirrored = False
        try:
            creds = None if tls_dir is None else await add_creds(vm.qmp, tls_dir, "client")
            hook = None
            disk = MirrorStatus(0, 0, False, "none")
            if nbd is not None:
                if options.mechanism == "cold":
                    await vm.qmp.execute("stop")  # the disk is copied with the guest paused
                mirrored = True
                image = self._owned_disk(slot.spec)
                assert image is not None
                assert slot.spec.disk is not None
                allocated = await allocated_bytes(image)
                await start_mirror(
                    vm.qmp, nbd, speed_bps=options.max_bandwidth_bps, tls_creds=creds
                )
                synced = await self._mirror_until_ready(slot, vm, deadline)
                # QEMU's progress counts the whole virtual disk, zero areas included (they
                # travel as write-zeroes commands); what carried data is the allocation plus
                # what the guest re-dirtied during the copy.
                moved = min(
                    synced.copied_bytes,
                    allocated + max(0, synced.total_bytes - slot.spec.disk.size_bytes),
                )
                disk = replace(synced, copied_bytes=moved, total_bytes=moved)

                async def hook() -> None:
                    await self._hand_over_disk(slot, vm)

            def push(stats: MigrationStats) -> None:
                if is_postcopy(stats.status):
                    mark(vm.paths.directory, POSTCOPY_MARKER)  # never resume this source
                outgoing.push(
                    replace(
                        stats,
                        disk_copied_bytes=disk.copied_bytes,
                        disk_total_bytes=disk.total_bytes,
                    )
                )

            ram_options = replace(options, timeout_s=max(1.0, deadline - loop.time()))
            final = await run_migration(
                vm.qmp, uri, ram_options, push, before_switchover=hook, tls_creds=creds
            )
            used_tls = await migration_tls_creds(vm.qmp) is not None
            final = replace(
                final, disk_copied_bytes=disk.copied_bytes, disk_total_bytes=disk.total_bytes
            )
        except Exception as err:  # the task's boundary: whatever failed, put the guest back
            if not isinstance(err, FerryError | OSError):
                self.logger.exception("migration.crashed %s", vm.label)
            heartbeats.close_window()
            last = outgoing.samples[-1] if outgoing.samples else None
            # Judged from QEMU's own state, once it answers again: a QMP timeout at the
            # switchover (QEMU holds its main loop while it sends the device state over a
            # slow link) does not mean the migration failed — it may complete meanwhile.
            settled = await self._settle(vm, str(err))
            slot.state = VmState(settled.state)
            result = settled.outcome or OutgoingResult("failed", str(err), None, None, None)
            if result.status == "failed" and result.stats is None:
                result = replace(result, stats=last)
            if settled.follow:
                self._background_task(self._follow_postcopy(slot, vm), f"follow-{vm.label}")
            else:
                outgoing.finish(result)
            return
        except BaseException:
            # Agent shutting down mid-migration: leave the guest running here.
            with contextlib.suppress(FerryError):
                await asyncio.shield(cancel_migration(vm.qmp))
            if mirrored:
                with contextlib.suppress(FerryError):
                    await asyncio.shield(abort_mirror(vm.qmp))
            with contextlib.suppress(FerryError):
                await asyncio.shield(ensure_running(vm.qmp))
            raise
        max_gap = heartbeats.close_window()
        slot.state = VmState.MIGRATED
        outgoing.finish(
            OutgoingResult(
                "completed", None, final, heartbeats.last_arrival_ms, max_gap, tls=used_tls
            )
        )

    async def _hand_over_disk(self, slot: Slot, vm: RunningVm) -> None:
        """At the switchover pause: complete the mirror, tell the controller (status
        DISK_SYNCED), and wait until it has released the destination's export — the
        destination can only take over the disk once nothing else holds it writable.

        Raises:
            MigrationFailed: the mirror did not complete, the migration was cancelled, or no
                go-ahead came in time (the caller then cancels and resumes the guest here).
        """
        outgoing = slot.outgoing
        assert outgoing is not None
        await finish_mirror(vm.qmp)
        last = outgoing.samples[-1] if outgoing.samples else None
        if last is not None:
            outgoing.push(replace(last, status=DISK_SYNCED))
        try:
            async with asyncio.timeout(_HANDOVER_TIMEOUT_S):
                await outgoing.handover.wait()
        except TimeoutError:
            raise MigrationFailed(
                vm.label, "disk", f"no go-ahead for the switchover within {_HANDOVER_TIMEOUT_S:g} s"
            ) from None
        if outgoing.cancel_requested:
            raise MigrationFailed(vm.label, "disk", "cancelled at the switchover")

    def continue_outgoing(self, name: str) -> None:
        """Let VM ``name``'s migration, paused at the switchover with its disk synced, go on.

        Raises:
            NotFound, StateError: no migration in flight.
        """
        slot, _ = self._running(name, VmState.MIGRATING)
        assert slot.outgoing is not None
        slot.outgoing.handover.set()

    async def release_disk(self, name: str) -> None:
        """Drop the NBD export of incoming VM ``name``'s disk (the source's mirror is done).

        Raises:
            NotFound, StateError: not an incoming VM.
        """
        slot, vm = self._running(name, VmState.INCOMING)
        if self._owned_disk(slot.spec) is not None:
            await unexport_disk(vm.qmp)

    async def _mirror_until_ready(self, slot: Slot, vm: RunningVm, deadline: float) -> MirrorStatus:
        """Follow the disk mirror until source and target are in sync, then make it
        write-blocking; report each sample as progress (status DISK_PHASE).

        Raises:
            MigrationFailed: the mirror failed, the migration was cancelled or ran out of time.
        """
        assert slot.outgoing is not None
        loop = asyncio.get_running_loop()
        started = last_time = loop.time()
        last_copied = 0
        best_remaining: int | None = None
        best_at = started
        blocking = False
        while True:
            status = await mirror_status(vm.qmp)
            now = loop.time()
            if status.status in ("gone", "concluded", "aborting", "null") or status.error:
                raise MigrationFailed(
                    vm.label, "disk", f"disk mirror failed: {status.error or status.status}"
                )
            rate = (status.copied_bytes - last_copied) / max(now - last_time, 1e-3)
            last_copied, last_time = status.copied_bytes, now
            slot.outgoing.push(
                MigrationStats(
                    status=DISK_PHASE,
                    total_ms=round((now - started) * 1000),
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
            )
            if status.ready:
                if not blocking:
                    await make_write_blocking(vm.qmp)
                return status
            if slot.outgoing.cancel_requested:
                raise MigrationFailed(vm.label, "disk", "cancelled during the disk copy")
            if now > deadline:
                raise MigrationFailed(vm.label, "disk", "the disk copy ran out of time")
            if best_remaining is None or status.remaining_bytes < best_remaining:
                best_remaining, best_at = status.remaining_bytes, now
            elif not blocking and now - best_at > _MIRROR_STALL_S:
                blocking = True
                await make_write_blocking(vm.qmp)
                self.logger.info("disk.mirror_stalled %s: write-blocking now", vm.label)
            await asyncio.sleep(_MIRROR_POLL_S)

    async def _settle(self, vm: RunningVm, why: str) -> Adopted:
        """Settle a source whose migration task failed (see :func:`.adopt.settle`), waiting
        as long as its QEMU lives but does not answer."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + _BUSY_QEMU_WAIT_S
        while True:
            try:
                return await settle(vm.qmp, vm.paths.directory, why)
            except QMPTimeout as err:
                if not vm.process.is_running or loop.time() > give_up:
                    self.logger.error("migration.unsettled %s: %s", vm.label, err)
                    break
                self.logger.warning("migration.qemu_busy %s: %s; waiting", vm.label, err)
                await asyncio.sleep(1.0)
            except FerryError as err:
                self.logger.error("migration.unsettled %s: %s", vm.label, err)
                break
        for _ in range(40):  # a QMP connection lost with its QEMU: let the exit be reaped
            if not vm.process.is_running:
                break
            await asyncio.sleep(0.05)
        if not vm.process.is_running:
            return Adopted(
                "stopped", OutgoingResult("failed", f"{why}; QEMU died", None, None, None)
            )
        # Alive but silent for many minutes: leave it to a human, claim nothing.
        return Adopted(
            "migrating", OutgoingResult("failed", f"{why}; QEMU does not answer", None, None, None)
        )

    async def outgoing_progress(
        self, name: str, since: int, wait_s: float
    ) -> tuple[list[MigrationStats], OutgoingResult | None]:
        """Samples after index ``since`` and the result once there is one (long-poll).

        Raises:
            NotFound: no such VM.
            StateError: no migration was started for it.
        """
        slot = self._slot(name)
        outgoing = slot.outgoing
        if outgoing is None:
            raise StateError(f"VM {name}", slot.state.value, "an outgoing migration")
        if len(outgoing.samples) <= since and outgoing.result is None:
            outgoing.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(outgoing.changed.wait(), wait_s)
        return outgoing.samples[since:], outgoing.result

    async def start_postcopy(self, name: str) -> None:
        """Switch VM ``name``'s outgoing migration to post-copy (it must have been started with
        post-copy enabled).

        Raises:
            NotFound, StateError: no migration in flight.
            QMPCommandError: QEMU refused (e.g. post-copy not enabled).
        """
        _, vm = self._running(name, VmState.MIGRATING)
        await start_postcopy(vm.qmp)

    # -- post-copy recovery ----------------------------------------------------------------------

    def _recovering(self, name: str, attempt: int, *states: VmState) -> RunningVm:
        """VM ``name``'s QEMU for recovery ``attempt``, if it is in one of ``states``.

        Raises:
            NotFound: no such VM.
            StateError: in another state, or ``attempt`` is older than one already seen.
        """
        slot = self._slot(name)
        if slot.state not in states or slot.vm is None:
            raise StateError(f"VM {name}", slot.state.value, " or ".join(x.value for x in states))
        if attempt < slot.recovery_attempt:
            raise StateError(
                f"recovery attempt {attempt} of {name}",
                "stale",
                f"attempt >= {slot.recovery_attempt}",
            )
        slot.recovery_attempt = attempt
        return slot.vm

    async def pause_postcopy(self, name: str, attempt: int = 0) -> str:
        """Pause VM ``name``'s broken post-copy on this side (source or destination); a
        migration QEMU already paused is left as it is.

        Args:
            name: the VM.
            attempt: the controller's recovery attempt number (older ones are refused).

        Returns:
            ``postcopy-paused``, or ``completed`` if it finished meanwhile.

        Raises:
            NotFound: no such VM.
            StateError: it is not migrating in post-copy here; a stale attempt.
            QMPCommandError, QMPTimeout: QEMU failed.
        """
        vm = self._recovering(name, attempt, VmState.MIGRATING, VmState.INCOMING)
        return await pause_postcopy(vm.qmp)

    async def recover_incoming(self, name: str, attempt: int = 0) -> str:
        """Have incoming VM ``name``, whose post-copy is paused, listen for the source again.

        Returns:
            The URI the source resumes to.

        Raises:
            NotFound: no such VM.
            StateError: not an incoming VM with a paused post-copy; a stale attempt.
            QMPCommandError, QMPTimeout: QEMU failed.
        """
        vm = self._recovering(name, attempt, VmState.INCOMING)
        return await recover_incoming(vm.qmp, self.config.migration_address)

    async def resume_outgoing(self, name: str, uri: str, attempt: int = 0) -> str:
        """Resume VM ``name``'s paused outgoing post-copy towards ``uri`` (the migration task
        keeps following it).

        Returns:
            The status reached: ``postcopy-active``/``completed`` (recovered),
            ``postcopy-paused`` (this attempt failed), or still ``postcopy-recover*``.

        Raises:
            NotFound: no such VM.
            StateError: no outgoing post-copy is paused; a stale attempt.
            QMPCommandError, QMPTimeout: QEMU failed.
        """
        vm = self._recovering(name, attempt, VmState.MIGRATING)
        return await resume_postcopy(vm.qmp, uri)

    async def cancel_outgoing(self, name: str) -> None:
        """Ask QEMU to cancel VM ``name``'s outgoing migration (the result tells how it ended).

        Raises:
            NotFound, StateError: no migration in flight.
        """
        slot, vm = self._running(name, VmState.MIGRATING)
        if slot.outgoing is not None:
            slot.outgoing.cancel_requested = True  # seen by the disk phase and the handover
            slot.outgoing.handover.set()
        await vm.qmp.execute("migrate_cancel")

    async def forget(self, name: str) -> None:
        """Drop the record of VM ``name`` whose QEMU died here while the guest runs elsewhere
        (or is lost), with this host's local image of it; a shared image is left alone.

        Raises:
            NotFound: no such VM.
            StateError: its QEMU still runs.
        """
        slot = self._slot(name)
        if slot.vm is not None and slot.vm.process.is_running:
            raise StateError(f"VM {name}", slot.state.value, "stopped (its QEMU dead)")
        async with slot.lock:
            if slot.vm is not None:
                await slot.vm.stop()  # reaps it and closes our connections
            self._forget(name, self._owned_disk(slot.spec))
        self.logger.info("vm.forgotten %s", name)

    async def resume_source(self, name: str) -> None:
        """Run VM ``name`` here again after a completed pre-copy whose destination copy is
        gone (its QEMU died before the guest ran there): this host's memory is the guest's
        only current state. The caller must have made sure no destination QEMU is left.

        Raises:
            NotFound: no such VM.
            StateError: it has not migrated, or its migration entered post-copy (the
                destination ran the guest: resuming here would run an older copy).
        """
        slot, vm = self._running(name, VmState.MIGRATED)
        if (self._dir(name) / POSTCOPY_MARKER).exists():
            raise StateError(f"VM {name}", "migrated in post-copy", "migrated in pre-copy")
        async with slot.lock:
            await resume_completed_source(vm.qmp)
            slot.state = VmState.RUNNING
            slot.outgoing = None
        self.logger.warning("migration.source_resumed %s", name)

    async def handoff(self, name: str) -> None:
        """End the source QEMU after a completed migration; the guest lives elsewhere now.

        Raises:
            NotFound: no such VM.
            StateError: the migration has not completed.
        """
        await self._retire(name, VmState.MIGRATED)
        self.logger.info("migration.handed_off %s", name)
