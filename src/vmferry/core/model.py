"""Domain values: VM names and specs, migration progress samples and the migration report."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, NewType

from vmferry.core.boot import GuestBoot
from vmferry.core.errors import ConfigError
from vmferry.core.handoff import HandoffVerdict, VerifyMode
from vmferry.core.status import MigrationStatus, Stage
from vmferry.core.workload import WorkloadSpec, parse_size, parse_workload

__all__ = [
    "DEFAULT_CPU_MODEL",
    "DEFAULT_MACHINE_TYPE",
    "DISK_BUSES",
    "DISK_NODE",
    "MECHANISMS",
    "REPORT_SCHEMA",
    "STORAGE_MODES",
    "STRATEGIES",
    "DiskBus",
    "DiskSpec",
    "EarlierAttempt",
    "GuestAgentCheck",
    "HostName",
    "IntegrityReport",
    "Mechanism",
    "MigrationOptions",
    "MigrationReport",
    "MigrationStats",
    "NbdTarget",
    "Prediction",
    "ReportStatus",
    "StorageMode",
    "VmName",
    "VmSpec",
    "spec_from_json",
    "spec_to_json",
    "validate_name",
]

VmName = NewType("VmName", str)
HostName = NewType("HostName", str)

Mechanism = Literal["precopy", "multifd", "xbzrle", "auto-converge", "postcopy", "hybrid", "cold"]
MECHANISMS: tuple[Mechanism, ...] = (
    "precopy",
    "multifd",
    "xbzrle",
    "auto-converge",
    "postcopy",
    "hybrid",
    "cold",
)
# What a user may ask for: a mechanism, or ``auto`` (the controller chooses one by a plan).
STRATEGIES: tuple[str, ...] = ("auto", *MECHANISMS)

# A fixed machine-type version and a named CPU model, so that source and destination build the
# same virtual hardware whatever QEMU release each host runs (>= 10.0 is required anyway).
DEFAULT_MACHINE_TYPE = "pc-q35-10.0"
DEFAULT_CPU_MODEL = "qemu64"
REPORT_SCHEMA = 1

DiskBus = Literal["virtio-blk", "virtio-scsi"]
DISK_BUSES: tuple[DiskBus, ...] = ("virtio-blk", "virtio-scsi")
# local: the image lives on the VM's host and moves with it (NBD + blockdev-mirror);
# shared: every host sees the same image path, only RAM moves.
StorageMode = Literal["local", "shared"]
STORAGE_MODES: tuple[StorageMode, ...] = ("local", "shared")
# The block node name of a VM's disk, the same on every host (mirror and NBD export use it).
DISK_NODE = "disk0"

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}\Z", re.IGNORECASE)
_MIN_MEMORY_BYTES = 128 << 20
_MAX_MEMORY_BYTES = 64 << 30
_MAX_VCPUS = 64
_MIN_DISK_BYTES = 16 << 20
_MAX_DISK_BYTES = 2 << 40


def validate_name(name: str, what: str = "VM name") -> str:
    """Check a VM or host name: letters, digits, '-' and '_', at most 63, no path characters.

    Raises:
        ConfigError: if the name is not acceptable.
    """
    if not _NAME_RE.match(name):
        raise ConfigError(
            f"invalid {what} {name!r}: use 1-63 letters, digits, '-' or '_', "
            "starting with a letter or digit"
        )
    return name


@dataclass(frozen=True, slots=True)
class DiskSpec:
    """A VM's one qcow2 disk: its virtual size, the bus the guest sees it on, where it lives."""

    size_bytes: int
    bus: DiskBus = "virtio-blk"
    storage: StorageMode = "local"

    def __post_init__(self) -> None:
        if not _MIN_DISK_BYTES <= self.size_bytes <= _MAX_DISK_BYTES:
            raise ConfigError(
                f"disk size {self.size_bytes} bytes out of range "
                f"({_MIN_DISK_BYTES >> 20} MiB .. {_MAX_DISK_BYTES >> 40} TiB)"
            )
        # A user's image may have any size QEMU accepts (sectors); sizes we create are MiB.
        if self.size_bytes % 512:
            raise ConfigError("disk size must be a whole number of 512-byte sectors")
        if self.bus not in DISK_BUSES:
            raise ConfigError(f"unknown disk bus {self.bus!r}: use {' or '.join(DISK_BUSES)}")
        if self.storage not in STORAGE_MODES:
            raise ConfigError(
                f"unknown storage mode {self.storage!r}: use {' or '.join(STORAGE_MODES)}"
            )

    @property
    def guest_device(self) -> str:
        """The device name the lab guest's kernel gives the disk (under /dev)."""
        return "vda" if self.bus == "virtio-blk" else "sda"

    def to_json(self) -> dict[str, object]:
        return {"size_bytes": self.size_bytes, "bus": self.bus, "storage": self.storage}

    @classmethod
    def from_json(cls, data: object) -> DiskSpec:
        """Raises: ConfigError on missing or mistyped fields."""
        if not isinstance(data, dict):
            raise ConfigError("'disk' must be a JSON object")
        size, bus, storage = data.get("size_bytes"), data.get("bus"), data.get("storage")
        if not isinstance(size, int) or isinstance(size, bool):
            raise ConfigError("disk needs an integer 'size_bytes'")
        return cls(size_bytes=size, bus=_bus(bus), storage=_storage(storage))


def _bus(text: object) -> DiskBus:
    for bus in DISK_BUSES:
        if text == bus:
            return bus
    raise ConfigError(f"unknown disk bus {text!r}: use {' or '.join(DISK_BUSES)}")


def _storage(text: object) -> StorageMode:
    for mode in STORAGE_MODES:
        if text == mode:
            return mode
    raise ConfigError(f"unknown storage mode {text!r}: use {' or '.join(STORAGE_MODES)}")


@dataclass(frozen=True, slots=True)
class NbdTarget:
    """Where a destination exports a VM's disk."""

    host: str
    port: int
    export: str = DISK_NODE

    def to_json(self) -> dict[str, object]:
        return {"host": self.host, "port": self.port, "export": self.export}

    @classmethod
    def from_json(cls, data: object) -> NbdTarget:
        """Raises: ConfigError on malformed data."""
        if not isinstance(data, dict):
            raise ConfigError("an NBD target must be a JSON object")
        host, port, export = data.get("host"), data.get("port"), data.get("export", DISK_NODE)
        if not isinstance(host, str) or not isinstance(port, int) or not isinstance(export, str):
            raise ConfigError(f"bad NBD target {data!r}")
        if not 0 < port < 65536 or export != DISK_NODE:
            raise ConfigError(f"bad NBD target {data!r}")
        return cls(host, port, export)


@dataclass(frozen=True, slots=True)
class VmSpec:
    """What a VM is: enough to build identical QEMU command lines on any host."""

    name: VmName
    memory_bytes: int = 512 << 20
    vcpus: int = 1
    workload: WorkloadSpec = field(default_factory=lambda: parse_workload("idle"))
    machine_type: str = DEFAULT_MACHINE_TYPE
    cpu_model: str = DEFAULT_CPU_MODEL
    disk: DiskSpec | None = None
    # None: the lab guest (vmferry's kernel, initramfs and workload); else the user's own.
    boot: GuestBoot | None = None

    @property
    def is_lab_guest(self) -> bool:
        """The guest is vmferry's own lab guest (it answers on the lab channel)."""
        return self.boot is None

    @property
    def has_heartbeats(self) -> bool:
        """The guest sends heartbeats on the lab channel (the lab guest; an own guest that
        runs vmferry's workload program, ``GuestBoot.heartbeat``)."""
        return self.boot is None or self.boot.heartbeat

    def __post_init__(self) -> None:
        validate_name(self.name)
        if self.boot is not None and self.disk is None:
            raise ConfigError(f"VM {self.name}: a guest of your own boots from a disk image")
        if self.boot is not None and self.workload != parse_workload("idle"):
            raise ConfigError("--workload applies to the lab guest only (not to --image guests)")
        if not _MIN_MEMORY_BYTES <= self.memory_bytes <= _MAX_MEMORY_BYTES:
            raise ConfigError(
                f"memory {self.memory_bytes} bytes out of range "
                f"({_MIN_MEMORY_BYTES >> 20} MiB .. {_MAX_MEMORY_BYTES >> 30} GiB)"
            )
        if self.memory_bytes % (1 << 20):
            raise ConfigError("memory must be a whole number of MiB")
        if not 1 <= self.vcpus <= _MAX_VCPUS:
            raise ConfigError(f"vcpus must be 1..{_MAX_VCPUS}, got {self.vcpus}")
        # The kernel and the initramfs need room beside the working set.
        if self.workload.size_bytes > self.memory_bytes - (96 << 20):
            raise ConfigError(
                f"working set {self.workload.size_bytes >> 20} MiB does not fit in "
                f"{self.memory_bytes >> 20} MiB of guest memory (leave 96 MiB for the kernel)"
            )

    @classmethod
    def build(
        cls,
        name: str,
        memory: str = "512M",
        vcpus: int = 1,
        workload: WorkloadSpec | None = None,
        *,
        disk: str | None = None,
        disk_bus: str = "virtio-blk",
        storage: str = "local",
    ) -> VmSpec:
        """Build a spec from user-facing text (``memory="1G"``, ``disk="2G"``).

        Raises:
            ConfigError: on a bad name, size, count, bus or storage mode.
        """
        disk_spec = None
        if disk is not None:
            disk_spec = DiskSpec(parse_size(disk), bus=_bus(disk_bus), storage=_storage(storage))
        return cls(
            name=VmName(validate_name(name)),
            memory_bytes=parse_size(memory),
            vcpus=vcpus,
            workload=workload if workload is not None else parse_workload("idle"),
            disk=disk_spec,
        )


def spec_to_json(spec: VmSpec) -> dict[str, object]:
    """A VM spec as JSON-ready data (persisted by agents, sent between them)."""
    return {
        "name": spec.name,
        "memory_bytes": spec.memory_bytes,
        "vcpus": spec.vcpus,
        "workload": spec.workload.to_spec(),
        "machine_type": spec.machine_type,
        "cpu_model": spec.cpu_model,
        "disk": None if spec.disk is None else spec.disk.to_json(),
        "boot": None if spec.boot is None else spec.boot.to_json(),
    }


def spec_from_json(data: object) -> VmSpec:
    """Validate JSON data into a :class:`VmSpec`.

    Raises:
        ConfigError: missing or mistyped fields, or values out of range.
    """
    if not isinstance(data, dict):
        raise ConfigError("a VM spec must be a JSON object")
    name, memory, vcpus = data.get("name"), data.get("memory_bytes"), data.get("vcpus", 1)
    workload = data.get("workload", "idle")
    machine = data.get("machine_type", DEFAULT_MACHINE_TYPE)
    cpu = data.get("cpu_model", DEFAULT_CPU_MODEL)
    if not isinstance(name, str):
        raise ConfigError("VM spec needs a string 'name'")
    if not isinstance(memory, int) or isinstance(memory, bool):
        raise ConfigError("VM spec needs an integer 'memory_bytes'")
    if not isinstance(vcpus, int) or isinstance(vcpus, bool):
        raise ConfigError("'vcpus' must be an integer")
    if not isinstance(workload, str) or not isinstance(machine, str) or not isinstance(cpu, str):
        raise ConfigError("'workload', 'machine_type' and 'cpu_model' must be strings")
    # QEMU's names: machine types are lower case; CPU models may not be (Skylake-Client).
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,80}", machine + cpu):
        raise ConfigError(f"bad machine type or CPU model: {machine!r} {cpu!r}")
    return VmSpec(
        name=VmName(validate_name(name)),
        memory_bytes=memory,
        vcpus=vcpus,
        workload=parse_workload(workload),
        machine_type=machine,
        cpu_model=cpu,
        disk=None if data.get("disk") is None else DiskSpec.from_json(data["disk"]),
        boot=None if data.get("boot") is None else GuestBoot.from_json(data["boot"]),
    )


@dataclass(frozen=True, slots=True)
class MigrationStats:
    """One progress sample of a migration, as the source QEMU reports it.

    ``status`` is QEMU's own; ``stage`` is what vmferry does around it: while a local disk is
    copied (``DISK_COPY``, before RAM moves) ``status`` is ``NONE``; at the switchover pause
    with the disk complete (``DISK_SYNCED``) it is QEMU's real status (``pre-switchover``).
    """

    status: MigrationStatus
    total_ms: int
    transferred_bytes: int
    remaining_bytes: int
    total_bytes: int
    dirty_pages_rate: int
    page_size: int
    iterations: int
    throughput_bps: int
    expected_downtime_ms: int | None
    downtime_ms: int | None
    # The disk mirror of a VM on local storage (0 without one). While the disk is copied,
    # before RAM moves (stage DISK_COPY), the RAM figures are the RAM still to send (its
    # size) and ``throughput_bps`` is the mirror's rate.
    disk_copied_bytes: int = 0
    disk_total_bytes: int = 0
    stage: Stage = Stage.MIGRATION
    # Pages sent so far as data (``normal``) and as a zero-page flag (``duplicate``): a zero
    # page costs a few bytes on the wire, not a page (see :mod:`vmferry.core.eta`).
    normal_pages: int = 0
    zero_pages: int = 0

    @property
    def disk_remaining_bytes(self) -> int:
        return max(0, self.disk_total_bytes - self.disk_copied_bytes)

    @property
    def dirty_rate_bps(self) -> int:
        """Guest dirty rate in bytes per second, as QEMU measured it."""
        return self.dirty_pages_rate * self.page_size


@dataclass(frozen=True, slots=True)
class MigrationOptions:
    """How one QEMU migration runs: its mechanism and knobs (set on both sides where needed).

    ``mechanism`` is what QEMU does: ``precopy`` (plain iterative copy), ``multifd`` (parallel
    channels with zstd), ``xbzrle`` (delta-encode re-sent pages), ``auto-converge`` (throttle
    the vCPUs), ``postcopy`` (switch to the destination at once, pull pages on demand),
    ``hybrid`` (pre-copy, then post-copy) or ``cold`` (pause the guest, then copy).
    ``postcopy_ready`` enables post-copy on both sides so a pre-copy can be switched over
    mid-flight if it stalls. ``hold`` keeps the guest paused on the destination once it has
    arrived (QEMU's autostart off, block devices left inactive) until the two copies have been
    compared (see :mod:`vmferry.core.handoff`). ``tls`` runs the RAM stream and the NBD disk
    mirror over mutual TLS (QEMU's ``tls-creds-x509``; both agents need QEMU credentials).
    ``switch_priority``: at its switchover the source's other pre-copies pause their sending
    until it is over (see :mod:`vmferry.agent.switch_priority`); a job's moves ask for it.
    """

    max_bandwidth_bps: int | None = None
    downtime_limit_ms: int = 300
    timeout_s: float = 600.0
    mechanism: Mechanism = "precopy"
    postcopy_ready: bool = False
    multifd_channels: int = 2
    xbzrle_cache_bytes: int = 64 << 20
    tls: bool = False
    hold: bool = False
    switch_priority: bool = False

    @property
    def uses_postcopy(self) -> bool:
        """Post-copy must be enabled on both QEMUs before the migration starts."""
        return self.postcopy_ready or self.mechanism in ("postcopy", "hybrid")


@dataclass(frozen=True, slots=True)
class IntegrityReport:
    """The guest's own verdict on its working set after a move."""

    ok: bool
    pages_checked: int
    bad_pages: int
    # The disk region the guest writes (0 checked without a disk).
    blocks_checked: int = 0
    bad_blocks: int = 0

    def to_json(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "pages_checked": self.pages_checked,
            "bad_pages": self.bad_pages,
            "blocks_checked": self.blocks_checked,
            "bad_blocks": self.bad_blocks,
        }


@dataclass(frozen=True, slots=True)
class GuestAgentCheck:
    """What the guest's own agent (qemu-guest-agent) said after a move: whether it answered,
    and the guest clock set from the host's (as OpenStack Nova's ``sync_guest_time`` does)."""

    answered: bool
    clock_synced: bool = False
    # The guest's clock minus the host's, read back after the sync (ms).
    clock_offset_ms: int | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "answered": self.answered,
            "clock_synced": self.clock_synced,
            "clock_offset_ms": self.clock_offset_ms,
        }

    @classmethod
    def from_json(cls, data: object) -> GuestAgentCheck:
        """Raises: ConfigError on malformed data."""
        if not isinstance(data, dict) or not isinstance(data.get("answered"), bool):
            raise ConfigError(f"bad guest agent check {data!r}")
        offset = data.get("clock_offset_ms")
        return cls(
            answered=data["answered"],
            clock_synced=data.get("clock_synced") is True,
            clock_offset_ms=offset if isinstance(offset, int) else None,
        )


@dataclass(frozen=True, slots=True)
class Prediction:
    """What a migration was predicted to cost: QEMU's downtime and the longest stall the guest
    feels (``guest_downtime_ms``, None in records from before it was predicted)."""

    total_ms: int
    downtime_ms: int
    transferred_bytes: int
    guest_downtime_ms: int | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "total_ms": self.total_ms,
            "downtime_ms": self.downtime_ms,
            "guest_downtime_ms": self.guest_downtime_ms,
            "transferred_bytes": self.transferred_bytes,
        }


ReportStatus = Literal["completed", "failed", "cancelled"]


@dataclass(frozen=True, slots=True)
class EarlierAttempt:
    """A first attempt ``auto`` cancelled mid-flight (the guest kept running on the source)
    before it retried with another strategy (:mod:`vmferry.core.retry`)."""

    strategy: str
    total_ms: int
    error: str | None

    def to_json(self) -> dict[str, object]:
        return {"strategy": self.strategy, "total_ms": self.total_ms, "error": self.error}


@dataclass(frozen=True, slots=True)
class MigrationReport:
    """The outcome of one migration; ``to_json`` is DESIGN.md's schema version 1."""

    vm: str
    source: str
    destination: str
    running_on: str
    strategy: str
    status: ReportStatus
    error: str | None
    total_ms: int
    downtime_ms: int | None
    guest_downtime_ms: int | None
    transferred_bytes: int
    iterations: int
    predicted: Prediction | None
    integrity: IntegrityReport | None
    guest_alive: bool
    # Post-copy recoveries after network faults (pause, re-listen, resume) that succeeded.
    recoveries: int = 0
    # The migration stream (and disk mirror) ran over TLS, as QEMU reported at the end.
    tls: bool = False
    # A user's guest: what its guest agent said on the destination (None: not asked).
    guest_agent: GuestAgentCheck | None = None
    # Both stopped copies compared before the destination ran (None: the move never got there).
    handoff: HandoffVerdict | None = None
    # The attempt ``auto`` cancelled before this one, if it retried.
    retried_from: EarlierAttempt | None = None
    # Where ``guest_downtime_ms`` came from: the longest stall while the guest still ran on the
    # source (the copy starving it), and from its last beat there to its first on the
    # destination (QEMU's pause and the resume). None: not measured.
    guest_stall_copy_ms: int | None = None
    guest_stall_switch_ms: int | None = None
    # Zero pages per second (bytes of pages) the pre-copy re-sent after its first pass: pages
    # the guest rewrote unchanged (vmferry.core.blind). None: it did not iterate to tell.
    resent_zero_bps: int | None = None

    @property
    def is_success(self) -> bool:
        """Completed, guest alive, and verified: the lab guest by its own page check, a user's
        guest by the comparison of both copies (or, where none could run, by its agent)."""
        if self.status != "completed" or not self.guest_alive:
            return False
        if self.handoff is not None and not self.handoff.ok:
            return False
        if self.guest_agent is None:  # the lab guest
            return self.integrity is not None and self.integrity.ok
        compared = self.handoff is not None and self.handoff.ram is not None
        skipped_on_purpose = self.handoff is not None and self.handoff.mode is VerifyMode.OFF
        return compared or skipped_on_purpose or self.guest_agent.answered

    def to_json(self) -> dict[str, object]:
        return {
            "schema": REPORT_SCHEMA,
            "vm": self.vm,
            "source": self.source,
            "destination": self.destination,
            "running_on": self.running_on,
            "strategy": self.strategy,
            "status": self.status,
            "error": self.error,
            "total_ms": self.total_ms,
            "downtime_ms": self.downtime_ms,
            "guest_downtime_ms": self.guest_downtime_ms,
            "transferred_bytes": self.transferred_bytes,
            "iterations": self.iterations,
            "predicted": None if self.predicted is None else self.predicted.to_json(),
            "integrity": None if self.integrity is None else self.integrity.to_json(),
            "guest_alive": self.guest_alive,
            "recoveries": self.recoveries,
            "tls": self.tls,
            "guest_agent": None if self.guest_agent is None else self.guest_agent.to_json(),
            "handoff": None if self.handoff is None else self.handoff.to_json(),
            "retried_from": None if self.retried_from is None else self.retried_from.to_json(),
            "guest_stall_copy_ms": self.guest_stall_copy_ms,
            "guest_stall_switch_ms": self.guest_stall_switch_ms,
            "resent_zero_bps": self.resent_zero_bps,
        }
