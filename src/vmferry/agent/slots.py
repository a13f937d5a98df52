"""The VMs of one host as its agent holds them: one :class:`Slot` each, the outgoing
migration's record, and the capacity rules (memory, disk space, virtual hardware)."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

from vmferry.agent.api import CapacityError, HostInfo, NotFound, OutgoingResult, VmInfo
from vmferry.agent.config import AgentConfig
from vmferry.agent.vm import RunningVm
from vmferry.core.errors import ConfigError, StateError
from vmferry.core.model import MigrationStats, VmSpec
from vmferry.core.outgoing import OutgoingState, advance
from vmferry.qemu.binary import QemuBinary
from vmferry.qemu.image_map import ImageMap
from vmferry.qemu.process import process_uid
from vmferry.qemu.qcow2 import free_bytes

__all__ = ["VCPU_OVERCOMMIT", "Outgoing", "Slot", "Slots", "VmState"]

# vCPUs a host offers VMs per CPU it has (placement counts against it; nothing enforces it).
VCPU_OVERCOMMIT = 4


class VmState(enum.Enum):
    RUNNING = "running"
    INCOMING = "incoming"  # destination of a migration, not yet finished
    MIGRATING = "migrating"  # source of a migration in flight
    MIGRATED = "migrated"  # source after completion: paused for good, awaiting handoff
    STOPPED = "stopped"  # its QEMU is gone (found dead on reattach)


@dataclass(slots=True)
class Outgoing:
    """One outgoing migration: its state (see :mod:`vmferry.core.outgoing`), its progress
    samples and its result, observed by HTTP long-polls and by the migration task."""

    state: OutgoingState
    samples: list[MigrationStats] = field(default_factory=list)
    result: OutgoingResult | None = None
    # A bandwidth cap asked for after it started (None: the one it started with).
    cap_bps: int | None = None
    # The destination's address its QEMU streams to (None until the RAM migration starts).
    peer_address: str | None = None
    # Set, then replaced by a fresh one, at every change: a waiter takes the current one.
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def last(self) -> MigrationStats | None:
        return self.samples[-1] if self.samples else None

    def push(self, stats: MigrationStats) -> None:
        self.samples.append(stats)
        self._notify()

    def move(self, target: OutgoingState) -> None:
        """Raises: StateError: a move the lifecycle does not allow."""
        self.state = advance(self.state, target)
        self._notify()

    def finish(self, result: OutgoingResult, state: OutgoingState) -> None:
        """Raises: StateError: ``state`` cannot follow the current one."""
        self.state = advance(self.state, state)
        self.result = result
        self._notify()

    async def wait_change(self, timeout_s: float) -> None:
        """Until the next change, or ``timeout_s`` passed."""
        changed = self._changed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), timeout_s)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()


@dataclass(slots=True)
class Slot:
    """One VM of this host. While it has an outgoing migration, that decides its state."""

    spec: VmSpec
    base: VmState
    vm: RunningVm | None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    outgoing: Outgoing | None = None
    # Highest post-copy recovery attempt a controller sent for the current migration: requests
    # of older attempts, delivered late by TCP once a cut link is back, are refused.
    recovery_attempt: int = 0
    # The local disk's map, taken in the background once the disk is final at the switchover
    # (see agent/handoff.py: premap_disk); the handoff's comparison then finds it ready.
    disk_map: asyncio.Future[ImageMap] | None = None

    @property
    def state(self) -> VmState:
        if self.outgoing is not None:
            return VmState(self.outgoing.state.vm_state)
        return self.base

    @property
    def is_launching(self) -> bool:
        """Its QEMU is being started: the name and memory are reserved, no process is known
        yet (listed ``stopped`` meanwhile), and the launch may still bring one up."""
        return self.vm is None and self.base is VmState.INCOMING


class Slots:
    """The table of this host's VMs and the rules for room on it."""

    def __init__(self, config: AgentConfig, qemu: QemuBinary) -> None:
        self.config = config
        self.qemu = qemu
        self._slots: dict[str, Slot] = {}

    def __iter__(self) -> Iterator[Slot]:
        return iter([slot for _, slot in sorted(self._slots.items())])

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, name: str) -> bool:
        return name in self._slots

    def add(self, slot: Slot) -> None:
        self._slots[slot.spec.name] = slot

    def pop(self, name: str) -> None:
        self._slots.pop(name, None)

    def get(self, name: str) -> Slot:
        """Raises: NotFound."""
        try:
            return self._slots[name]
        except KeyError:
            raise NotFound(f"no VM {name!r} on {self.config.host}") from None

    def running(self, name: str, want: VmState = VmState.RUNNING) -> tuple[Slot, RunningVm]:
        """VM ``name`` and its QEMU, if it is in state ``want``.

        Raises:
            NotFound: no such VM.
            StateError: it is in another state (or has no QEMU).
        """
        slot = self.get(name)
        if slot.state != want or slot.vm is None:
            raise StateError(f"VM {name}", slot.state.value, want.value)
        return slot, slot.vm

    def memory_used(self) -> int:
        return sum(s.spec.memory_bytes for s in self._slots.values() if s.state != VmState.STOPPED)

    def _local_disk_used(self) -> int:
        return sum(
            s.spec.disk.size_bytes
            for s in self._slots.values()
            if s.spec.disk is not None and s.spec.disk.storage == "local"
        )

    def check_room(self, spec: VmSpec) -> None:
        """Raises: ConfigError (duplicate name, unknown hardware), CapacityError (memory)."""
        if spec.name in self._slots:
            raise ConfigError(f"a VM named {spec.name!r} already exists on {self.config.host}")
        if spec.machine_type not in self.qemu.machine_types:
            raise ConfigError(f"{self.config.host} has no machine type {spec.machine_type}")
        if spec.cpu_model not in self.qemu.cpu_models:
            raise ConfigError(f"{self.config.host} has no CPU model {spec.cpu_model}")
        free = self.config.memory_bytes - self.memory_used()
        if spec.memory_bytes > free:
            raise CapacityError(
                f"{self.config.host} has {free >> 20} MiB free for VMs; "
                f"{spec.name} needs {spec.memory_bytes >> 20} MiB"
            )

    def disk_free(self) -> int:
        """Space left for local disk images."""
        if self.config.disk_bytes is not None:
            return self.config.disk_bytes - self._local_disk_used()
        return free_bytes(self.config.state_dir / "disks")

    def vcpus_used(self) -> int:
        return sum(s.spec.vcpus for s in self._slots.values() if s.state != VmState.STOPPED)

    def check_disk_room(self, spec: VmSpec) -> None:
        """Raises: CapacityError when a new local image of ``spec`` would not fit."""
        if spec.disk is None or spec.disk.storage != "local":
            return
        need = spec.disk.size_bytes
        free = self.disk_free()
        if need > free:
            raise CapacityError(
                f"{self.config.host} has {free >> 20} MiB free for disks; "
                f"{spec.name} needs {need >> 20} MiB"
            )

    def vm_info(self, slot: Slot) -> VmInfo:
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
            boot=None if slot.spec.boot is None else slot.spec.boot.to_json(),
            qemu_uid=None if pid is None else process_uid(pid),
        )

    def host_info(self, accel: str) -> HostInfo:
        return HostInfo(
            host=self.config.host,
            memory_bytes=self.config.memory_bytes,
            memory_used_bytes=self.memory_used(),
            vms=len(self._slots),
            qemu_version=self.qemu.version_text,
            machine_types=tuple(sorted(self.qemu.machine_types)),
            cpu_models=tuple(sorted(self.qemu.cpu_models)),
            accel=accel,
            migration_address=self.config.migration_address,
            qemu_tls=self.config.qemu_tls_dir is not None,
            qemu_user=None if self.config.qemu_user is None else self.config.qemu_user.name,
            vcpus=(os.cpu_count() or 1) * VCPU_OVERCOMMIT,
            vcpus_used=self.vcpus_used(),
            disk_free_bytes=self.disk_free(),
            cpus=os.cpu_count() or 1,
        )
