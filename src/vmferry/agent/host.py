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
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from vmferry.agent.api import (
    CapacityError,
    GuestMeasurement,
    HostInfo,
    NotFound,
    OutgoingResult,
    VmInfo,
)
from vmferry.agent.bandwidth import BandwidthSink, ProbeResult, SinkResult, send_probe
from vmferry.agent.vm import RunningVm, launch, reattach
from vmferry.core.errors import ConfigError, FerryError, StateError
from vmferry.core.heartbeat import HeartbeatGaps
from vmferry.core.model import (
    IntegrityReport,
    MigrationOptions,
    MigrationStats,
    VmSpec,
    spec_from_json,
    spec_to_json,
)
from vmferry.guest.channel import now_ms
from vmferry.qemu.argv import Accel, BootFiles
from vmferry.qemu.binary import QemuBinary
from vmferry.qemu.measure import measure_guest
from vmferry.qemu.migration import (
    cancel_migration,
    ensure_running,
    run_migration,
    start_incoming,
    start_postcopy,
    wait_running,
)
from vmferry.qemu.process import is_qemu_pid
from vmferry.qemu.vcpu import vcpu_busy_fraction

__all__ = ["AgentConfig", "HostAgent", "VmState"]

logger = logging.getLogger(__name__)

_INCOMING_DONE_TIMEOUT_S = 60.0
_HEARTBEAT_TIMEOUT_S = 30.0


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


@dataclass(slots=True)
class Outgoing:
    """Progress of one outgoing migration, observed by HTTP long-polls."""

    samples: list[MigrationStats] = field(default_factory=list)
    result: OutgoingResult | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

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

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def vms_dir(self) -> Path:
        return self.config.state_dir / "vms"

    def _dir(self, name: str) -> Path:
        return self.vms_dir / name

    async def start(self, tasks: asyncio.TaskGroup) -> None:
        """Adopt the VMs an earlier agent left running; ``tasks`` owns background work."""
        self._tasks = tasks
        self.vms_dir.mkdir(parents=True, exist_ok=True)
        for spec_file in sorted(self.vms_dir.glob("*/spec.json")):
            await self._adopt(spec_file)

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
            status = str((await vm.qmp.execute("query-status"))["status"])
        except FerryError as err:
            self.logger.error("agent.adopt: cannot reattach %s (pid %s): %s", spec.name, pid, err)
            self._slots[spec.name] = Slot(spec, VmState.STOPPED, None)
            return
        state = {
            "running": VmState.RUNNING,
            "inmigrate": VmState.INCOMING,
            "postmigrate": VmState.MIGRATED,
        }.get(status, VmState.RUNNING)
        self._slots[spec.name] = Slot(spec, state, vm)
        self.logger.info("agent.adopted %s pid=%s state=%s", spec.name, pid, state.value)

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
        )

    def _memory_used(self) -> int:
        return sum(s.spec.memory_bytes for s in self._slots.values() if s.state != VmState.STOPPED)

    def _vm_info(self, slot: Slot) -> VmInfo:
        alive = slot.vm is not None and slot.vm.process.is_running
        state = slot.state if alive or slot.state == VmState.STOPPED else VmState.STOPPED
        return VmInfo(
            name=slot.spec.name,
            host=self.config.host,
            state=state.value,
            memory_bytes=slot.spec.memory_bytes,
            vcpus=slot.spec.vcpus,
            workload=slot.spec.workload.to_spec(),
            pid=slot.vm.process.pid if slot.vm is not None and alive else None,
            machine_type=slot.spec.machine_type,
            cpu_model=slot.spec.cpu_model,
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
        """End and forget VM ``name``'s QEMU, which must be in state ``required``.

        Raises:
            NotFound: no such VM.
            StateError: it is in another state.
        """
        slot = self._slot(name)
        if slot.state != required:
            raise StateError(f"VM {name}", slot.state.value, required.value)
        if slot.vm is not None:
            await slot.vm.stop()
        self._forget(name)

    def _forget(self, name: str) -> None:
        self._slots.pop(name, None)
        shutil.rmtree(self._dir(name), ignore_errors=True)

    async def _launch(self, spec: VmSpec, *, incoming: bool) -> Slot:
        """Check room, reserve the name, start QEMU and persist the definition at once (so a
        successor agent, or `lab down`, finds it). Leaves nothing behind on failure."""
        self._check_room(spec)
        slot = Slot(spec, VmState.INCOMING, None)  # reserves the name and memory meanwhile
        self._slots[spec.name] = slot
        try:
            slot.vm = await launch(
                self.qemu.path,
                spec,
                self.boot,
                self._dir(spec.name),
                role=self.config.host,
                accel=self.accel,
                heartbeats=HeartbeatGaps(),
                incoming=incoming,
            )
            self._persist(spec)
        except BaseException:
            if slot.vm is not None:
                await slot.vm.stop()
            self._forget(spec.name)
            raise
        return slot

    async def create(self, spec: VmSpec) -> VmInfo:
        """Boot a new VM on this host.

        Raises:
            ConfigError: duplicate name, unknown machine type/CPU model.
            CapacityError: not enough memory left on the host.
            QEMULaunchError, GuestError: it did not boot (nothing is left behind).
        """
        slot = await self._launch(spec, incoming=False)
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
            self._forget(name)
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
            profile, busy = await asyncio.gather(measure_guest(vm.qmp, self._dir(name)), busy_task)
        return GuestMeasurement(
            ram_bytes=profile.ram_bytes,
            dirty_rate_bps=profile.dirty_rate_bps,
            zero_fraction=profile.memory.zero_fraction,
            compress_ratio=profile.memory.compress_ratio,
            vcpu_busy=busy,
            elapsed_ms=profile.elapsed_ms,
        )

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

    async def prepare_incoming(self, spec: VmSpec, options: MigrationOptions) -> str:
        """Start an empty QEMU for ``spec`` waiting for its state; return the URI to send to.

        Raises:
            ConfigError, CapacityError: as for :meth:`create`.
            QEMULaunchError: QEMU would not start.
        """
        slot = await self._launch(spec, incoming=True)
        assert slot.vm is not None
        try:
            uri = await start_incoming(slot.vm.qmp, self.config.migration_address, options)
        except BaseException:
            await slot.vm.stop()
            self._forget(spec.name)
            raise
        self.logger.info("migration.incoming %s at %s", spec.name, uri)
        return uri

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
            integrity = await vm.verify()
        self.logger.info("migration.arrived %s ok=%s", name, integrity.ok)
        return first_ms, integrity

    async def abort_incoming(self, name: str) -> None:
        """Drop a destination that will not receive the guest.

        Raises:
            NotFound: no such VM.
            StateError: it is not an unfinished incoming VM.
        """
        await self._retire(name, VmState.INCOMING)
        self.logger.info("migration.incoming_aborted %s", name)

    # -- outgoing migration (this host is the source) -------------------------------------------

    def start_outgoing(self, name: str, uri: str, options: MigrationOptions) -> None:
        """Start migrating VM ``name`` to ``uri`` in the background.

        Raises:
            NotFound: no such VM.
            StateError: it is not running (e.g. already migrating: one migration per VM).
        """
        slot, vm = self._running(name)
        if self._tasks is None:
            raise StateError("agent", "not started", "started")
        slot.state = VmState.MIGRATING
        slot.outgoing = Outgoing()
        task = self._tasks.create_task(
            self._run_outgoing(slot, vm, uri, options), name=f"migrate-{name}"
        )
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _run_outgoing(
        self, slot: Slot, vm: RunningVm, uri: str, options: MigrationOptions
    ) -> None:
        assert slot.outgoing is not None
        outgoing = slot.outgoing
        heartbeats = vm.channel.heartbeats
        heartbeats.open_window(now_ms())
        try:
            final = await run_migration(vm.qmp, uri, options, outgoing.push)
        except Exception as err:  # the task's boundary: whatever failed, put the guest back
            if not isinstance(err, FerryError | OSError):
                self.logger.exception("migration.crashed %s", vm.label)
            heartbeats.close_window()
            slot.state = await self._resume_source(vm)
            last = outgoing.samples[-1] if outgoing.samples else None
            outgoing.finish(OutgoingResult("failed", str(err), last, None, None))
            return
        except BaseException:
            # Agent shutting down mid-migration: leave the guest running here.
            with contextlib.suppress(FerryError):
                await asyncio.shield(cancel_migration(vm.qmp))
            raise
        max_gap = heartbeats.close_window()
        slot.state = VmState.MIGRATED
        outgoing.finish(
            OutgoingResult("completed", None, final, heartbeats.last_arrival_ms, max_gap)
        )

    async def _resume_source(self, vm: RunningVm) -> VmState:
        try:
            status = await ensure_running(vm.qmp)
        except FerryError as err:
            self.logger.error("migration.rollback %s: %s", vm.label, err)
            return VmState.STOPPED if not vm.process.is_running else VmState.RUNNING
        return VmState.RUNNING if status == "running" else VmState.MIGRATED

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

    async def cancel_outgoing(self, name: str) -> None:
        """Ask QEMU to cancel VM ``name``'s outgoing migration (the result tells how it ended).

        Raises:
            NotFound, StateError: no migration in flight.
        """
        _, vm = self._running(name, VmState.MIGRATING)
        await vm.qmp.execute("migrate_cancel")

    async def handoff(self, name: str) -> None:
        """End the source QEMU after a completed migration; the guest lives elsewhere now.

        Raises:
            NotFound: no such VM.
            StateError: the migration has not completed.
        """
        await self._retire(name, VmState.MIGRATED)
        self.logger.info("migration.handed_off %s", name)
