"""Wire types of the agent's HTTP API (JSON), shared by the server and its client.

Every body is a JSON object. Errors are ``{"error": {"type": <class>, "message": <text>}}`` with
an HTTP status chosen by :data:`STATUS_BY_ERROR`.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

from vmferry.core.errors import (
    ConfigError,
    FerryError,
    GuestError,
    MigrationFailed,
    QEMULaunchError,
    QEMUNotFound,
    StateError,
)
from vmferry.core.handoff import Digests
from vmferry.core.model import GuestAgentCheck, IntegrityReport, MigrationStats
from vmferry.core.status import MigrationStatus, Stage
from vmferry.qemu.guest_agent import ExecResult

__all__ = [
    "API_PREFIX",
    "PROGRESS_WAIT_MAX_S",
    "SINK_WAIT_MAX_S",
    "STATUS_BY_ERROR",
    "CapacityError",
    "GuestMeasurement",
    "HostInfo",
    "NotFound",
    "OutgoingResult",
    "PathSample",
    "Profile",
    "VmInfo",
    "integrity_from_json",
    "stats_from_json",
    "stats_to_json",
]

API_PREFIX = "/v1"
# The longest a long-poll may wait: progress samples, and a bandwidth sink's result (longer
# requested waits are capped, over HTTP and in-process alike).
PROGRESS_WAIT_MAX_S = 10.0
SINK_WAIT_MAX_S = 60.0


class NotFound(ConfigError):
    """No such VM (or route) on this host."""


class CapacityError(ConfigError):
    """The host has no room for this VM (memory would be overcommitted)."""


# Most specific first: the first matching class decides.
STATUS_BY_ERROR: tuple[tuple[type[FerryError], int], ...] = (
    (NotFound, 404),
    (CapacityError, 507),
    (QEMUNotFound, 500),
    (ConfigError, 400),
    (StateError, 409),
    (MigrationFailed, 502),
    (GuestError, 502),
    (QEMULaunchError, 500),
    (FerryError, 500),
)

ERRORS_BY_NAME: dict[str, type[FerryError]] = {cls.__name__: cls for cls, _ in STATUS_BY_ERROR}


@dataclass(frozen=True, slots=True)
class HostInfo:
    """What a host offers: capacity, QEMU, virtual hardware it can build."""

    host: str
    memory_bytes: int
    memory_used_bytes: int
    vms: int
    qemu_version: str
    machine_types: tuple[str, ...]
    cpu_models: tuple[str, ...]
    accel: str
    migration_address: str
    # QEMU credentials for migration-stream TLS are configured (``--qemu-tls-dir``).
    qemu_tls: bool = False
    # The user QEMU runs as after start-up (None: as the agent runs).
    qemu_user: str | None = None
    # vCPUs VMs may use (the host's CPUs times the overcommit), and those its VMs have;
    # space left for local disk images. None: an agent too old to say.
    vcpus: int | None = None
    vcpus_used: int = 0
    disk_free_bytes: int | None = None
    # The host's CPUs (what measured vCPU load is a share of). None: an agent too old to say.
    cpus: int | None = None

    @property
    def memory_free_bytes(self) -> int:
        return self.memory_bytes - self.memory_used_bytes

    def to_json(self) -> dict[str, object]:
        return {
            "host": self.host,
            "memory_bytes": self.memory_bytes,
            "memory_used_bytes": self.memory_used_bytes,
            "vms": self.vms,
            "qemu_version": self.qemu_version,
            "machine_types": list(self.machine_types),
            "cpu_models": list(self.cpu_models),
            "accel": self.accel,
            "migration_address": self.migration_address,
            "qemu_tls": self.qemu_tls,
            "qemu_user": self.qemu_user,
            "vcpus": self.vcpus,
            "vcpus_used": self.vcpus_used,
            "disk_free_bytes": self.disk_free_bytes,
            "cpus": self.cpus,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HostInfo:
        return cls(
            host=str(data["host"]),
            memory_bytes=int(data["memory_bytes"]),
            memory_used_bytes=int(data["memory_used_bytes"]),
            vms=int(data["vms"]),
            qemu_version=str(data["qemu_version"]),
            machine_types=tuple(data["machine_types"]),
            cpu_models=tuple(data["cpu_models"]),
            accel=str(data["accel"]),
            migration_address=str(data["migration_address"]),
            qemu_tls=data.get("qemu_tls") is True,
            qemu_user=user if isinstance(user := data.get("qemu_user"), str) else None,
            vcpus=vcpus if isinstance(vcpus := data.get("vcpus"), int) else None,
            vcpus_used=used if isinstance(used := data.get("vcpus_used"), int) else 0,
            disk_free_bytes=free if isinstance(free := data.get("disk_free_bytes"), int) else None,
            cpus=cpus if isinstance(cpus := data.get("cpus"), int) else None,
        )


@dataclass(frozen=True, slots=True)
class VmInfo:
    """One VM as its host reports it."""

    name: str
    host: str
    state: str
    memory_bytes: int
    vcpus: int
    workload: str
    pid: int | None
    machine_type: str
    cpu_model: str
    disk: dict[str, object] | None = None  # DiskSpec.to_json() of its disk, if it has one
    qemu_uid: int | None = None  # the uid its QEMU runs as (None: not running)
    boot: dict[str, object] | None = None  # GuestBoot.to_json() of a user's guest (None: lab)

    def to_json(self) -> dict[str, object]:
        return {
            "qemu_uid": self.qemu_uid,
            "disk": self.disk,
            "boot": self.boot,
            "name": self.name,
            "host": self.host,
            "state": self.state,
            "memory_bytes": self.memory_bytes,
            "vcpus": self.vcpus,
            "workload": self.workload,
            "pid": self.pid,
            "machine_type": self.machine_type,
            "cpu_model": self.cpu_model,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VmInfo:
        pid = data.get("pid")
        return cls(
            name=str(data["name"]),
            host=str(data["host"]),
            state=str(data["state"]),
            memory_bytes=int(data["memory_bytes"]),
            vcpus=int(data["vcpus"]),
            workload=str(data["workload"]),
            pid=pid if isinstance(pid, int) else None,
            machine_type=str(data["machine_type"]),
            cpu_model=str(data["cpu_model"]),
            disk=disk if isinstance(disk := data.get("disk"), dict) else None,
            qemu_uid=uid if isinstance(uid := data.get("qemu_uid"), int) else None,
            boot=boot if isinstance(boot := data.get("boot"), dict) else None,
        )


@dataclass(frozen=True, slots=True)
class GuestMeasurement:
    """A guest's pre-flight profile, measured by its host while it runs."""

    ram_bytes: int
    dirty_rate_bps: int
    zero_fraction: float
    compress_ratio: float
    vcpu_busy: float | None  # share of time its vCPUs ran (0..1); high = CPU-bound dirtier
    elapsed_ms: int
    # The VM's disk (all 0 without one): bytes its image holds (what a mirror must copy on
    # local storage), the guest's write rate to it, and whether the image is on shared storage
    # (then nothing of the disk moves).
    disk_allocated_bytes: int = 0
    disk_write_bps: int = 0
    disk_shared: bool = False
    # Bytes written again within any short window (``core.dirty_curve``); 0 where the RAM could
    # not be scanned. The dirty rate is then the larger of QEMU's and the scan's.
    hot_bytes: int = 0
    # The bytes the guest's writes settle into (its dirty set) where the scan saw its count
    # level off within ~2.5 s (``core.dirty_curve.settled_bytes``); None: not seen (larger).
    settled_bytes: int | None = None
    # Guest RAM this host has allocated (the memfd's blocks; ``core.predict_touch``): pages
    # never written are holes that a migration's zero check allocates. None where unreadable.
    resident_bytes: int | None = None
    # zstd's ratio over the pages the guest changed during the scan (what a pre-copy's later
    # rounds send); None where too few changed or the RAM could not be scanned.
    dirty_compress_ratio: float | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "ram_bytes": self.ram_bytes,
            "dirty_compress_ratio": self.dirty_compress_ratio,
            "dirty_rate_bps": self.dirty_rate_bps,
            "hot_bytes": self.hot_bytes,
            "settled_bytes": self.settled_bytes,
            "resident_bytes": self.resident_bytes,
            "zero_fraction": self.zero_fraction,
            "compress_ratio": self.compress_ratio,
            "vcpu_busy": self.vcpu_busy,
            "elapsed_ms": self.elapsed_ms,
            "disk_allocated_bytes": self.disk_allocated_bytes,
            "disk_write_bps": self.disk_write_bps,
            "disk_shared": self.disk_shared,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GuestMeasurement:
        busy, resident = data.get("vcpu_busy"), data.get("resident_bytes")
        settled = data.get("settled_bytes")
        dirty_ratio = data.get("dirty_compress_ratio")
        return cls(
            dirty_compress_ratio=None if dirty_ratio is None else float(dirty_ratio),
            ram_bytes=int(data["ram_bytes"]),
            dirty_rate_bps=int(data["dirty_rate_bps"]),
            zero_fraction=float(data["zero_fraction"]),
            compress_ratio=float(data["compress_ratio"]),
            vcpu_busy=None if busy is None else float(busy),
            elapsed_ms=int(data["elapsed_ms"]),
            disk_allocated_bytes=int(data.get("disk_allocated_bytes", 0)),
            disk_write_bps=int(data.get("disk_write_bps", 0)),
            hot_bytes=int(data.get("hot_bytes", 0)),
            settled_bytes=None if settled is None else int(settled),
            disk_shared=bool(data.get("disk_shared", False)),
            resident_bytes=None if resident is None else int(resident),
        )


@dataclass(frozen=True, slots=True)
class PathSample:
    """What an agent last saw of the path to one migration address.

    Attributes:
        bandwidth_bps: bytes/s a probe or a migration achieved on it.
        age_s: how long ago.
        source: ``probe`` (a bandwidth probe's sink figure) or ``migration`` (an outgoing
            migration's throughput).
    """

    bandwidth_bps: float
    age_s: float
    source: str

    def to_json(self) -> dict[str, object]:
        return {"bandwidth_bps": self.bandwidth_bps, "age_s": self.age_s, "source": self.source}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PathSample:
        return cls(float(data["bandwidth_bps"]), float(data["age_s"]), str(data["source"]))


@dataclass(frozen=True, slots=True)
class Profile:
    """What an agent knows of a VM and of a path without measuring anything now: its rolling
    profile (see :mod:`vmferry.agent.profile`). None where it has nothing (yet)."""

    guest: GuestMeasurement | None
    guest_age_s: float | None
    path: PathSample | None

    def to_json(self) -> dict[str, object]:
        return {
            "guest": None if self.guest is None else self.guest.to_json(),
            "guest_age_s": self.guest_age_s,
            "path": None if self.path is None else self.path.to_json(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Profile:
        guest, age, path = data.get("guest"), data.get("guest_age_s"), data.get("path")
        return cls(
            guest=GuestMeasurement.from_json(guest) if isinstance(guest, dict) else None,
            guest_age_s=float(age) if isinstance(age, int | float) else None,
            path=PathSample.from_json(path) if isinstance(path, dict) else None,
        )


@dataclass(frozen=True, slots=True)
class OutgoingResult:
    """How an outgoing migration ended, as the source agent saw it.

    ``last_heartbeat_ms`` (wall clock) and ``max_gap_ms`` let the controller compute the
    guest-observed downtime together with the destination's first heartbeat.
    """

    status: str  # completed | failed | cancelled
    error: str | None
    stats: MigrationStats | None
    last_heartbeat_ms: float | None
    max_gap_ms: int | None
    # The source QEMU's migration ran with TLS credentials (query-migrate-parameters).
    tls: bool = False

    def to_json(self) -> dict[str, object]:
        return {
            "status": self.status,
            "error": self.error,
            "stats": None if self.stats is None else stats_to_json(self.stats),
            "last_heartbeat_ms": self.last_heartbeat_ms,
            "max_gap_ms": self.max_gap_ms,
            "tls": self.tls,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> OutgoingResult:
        stats = data.get("stats")
        return cls(
            status=str(data["status"]),
            error=data.get("error"),
            stats=None if stats is None else stats_from_json(stats),
            last_heartbeat_ms=data.get("last_heartbeat_ms"),
            max_gap_ms=data.get("max_gap_ms"),
            tls=data.get("tls") is True,
        )


def stats_to_json(stats: MigrationStats) -> dict[str, object]:
    return {
        "status": stats.status.value,
        "stage": stats.stage.value,
        "total_ms": stats.total_ms,
        "transferred_bytes": stats.transferred_bytes,
        "remaining_bytes": stats.remaining_bytes,
        "total_bytes": stats.total_bytes,
        "dirty_pages_rate": stats.dirty_pages_rate,
        "page_size": stats.page_size,
        "iterations": stats.iterations,
        "throughput_bps": stats.throughput_bps,
        "expected_downtime_ms": stats.expected_downtime_ms,
        "downtime_ms": stats.downtime_ms,
        "disk_copied_bytes": stats.disk_copied_bytes,
        "disk_total_bytes": stats.disk_total_bytes,
        "normal_pages": stats.normal_pages,
        "zero_pages": stats.zero_pages,
    }


# What agents before ``stage`` existed wrote into ``status`` for vmferry's own stages.
_LEGACY_STAGES = {"disk-mirror": Stage.DISK_COPY, "disk-synced": Stage.DISK_SYNCED}


def stats_from_json(data: dict[str, Any]) -> MigrationStats:
    """Raises: ValueError, KeyError, TypeError: a malformed sample."""
    status_text = str(data["status"])
    stage = _LEGACY_STAGES.get(status_text) or Stage(data.get("stage", Stage.MIGRATION))
    legacy = status_text in _LEGACY_STAGES
    status = MigrationStatus.NONE if legacy else MigrationStatus(status_text)
    return MigrationStats(
        status=status,
        stage=stage,
        total_ms=int(data["total_ms"]),
        transferred_bytes=int(data["transferred_bytes"]),
        remaining_bytes=int(data["remaining_bytes"]),
        total_bytes=int(data["total_bytes"]),
        dirty_pages_rate=int(data["dirty_pages_rate"]),
        page_size=int(data["page_size"]),
        iterations=int(data["iterations"]),
        throughput_bps=int(data["throughput_bps"]),
        expected_downtime_ms=data.get("expected_downtime_ms"),
        downtime_ms=data.get("downtime_ms"),
        disk_copied_bytes=int(data.get("disk_copied_bytes", 0)),
        disk_total_bytes=int(data.get("disk_total_bytes", 0)),
        normal_pages=int(data.get("normal_pages", 0)),
        zero_pages=int(data.get("zero_pages", 0)),
    )


def integrity_from_json(data: dict[str, Any]) -> IntegrityReport:
    return IntegrityReport(
        ok=bool(data["ok"]),
        pages_checked=int(data["pages_checked"]),
        bad_pages=int(data["bad_pages"]),
        blocks_checked=int(data.get("blocks_checked", 0)),
        bad_blocks=int(data.get("bad_blocks", 0)),
    )


@dataclass(frozen=True, slots=True)
class Arrival:
    """The guest runs on the destination: what the destination saw of it.

    Attributes:
        first_heartbeat_ms: the lab guest's first heartbeat there (wall clock; None: a user's
            guest, which sends none).
        integrity: the lab guest's own page check (None: a user's guest).
        guest_agent: what the guest agent said (None: not asked, the lab guest runs none).
    """

    first_heartbeat_ms: float | None
    integrity: IntegrityReport | None
    guest_agent: GuestAgentCheck | None

    def to_json(self) -> dict[str, object]:
        return {
            "first_heartbeat_ms": self.first_heartbeat_ms,
            "integrity": None if self.integrity is None else self.integrity.to_json(),
            "guest_agent": None if self.guest_agent is None else self.guest_agent.to_json(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Arrival:
        first, integrity, agent = (
            data.get("first_heartbeat_ms"),
            data.get("integrity"),
            data.get("guest_agent"),
        )
        return cls(
            first_heartbeat_ms=float(first) if isinstance(first, int | float) else None,
            integrity=integrity_from_json(integrity) if isinstance(integrity, dict) else None,
            guest_agent=None if agent is None else GuestAgentCheck.from_json(agent),
        )


@dataclass(frozen=True, slots=True)
class HandoffDigests:
    """One side's digests of its stopped copy: guest RAM, and a local disk (None: none)."""

    ram: Digests
    disk: Digests | None

    def to_json(self) -> dict[str, object]:
        return {
            "ram": self.ram.to_json(),
            "disk": None if self.disk is None else self.disk.to_json(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HandoffDigests:
        """Raises: ConfigError on malformed digests."""
        disk = data.get("disk")
        return cls(
            Digests.from_json(data.get("ram")), None if disk is None else Digests.from_json(disk)
        )


def exec_to_json(result: ExecResult) -> dict[str, object]:
    """A guest command's end as JSON (its output base64, it may be binary)."""
    return {
        "exit_code": result.exit_code,
        "signal": result.signal,
        "stdout": base64.b64encode(result.stdout).decode("ascii"),
        "stderr": base64.b64encode(result.stderr).decode("ascii"),
        "truncated": result.truncated,
    }


def exec_from_json(data: dict[str, Any]) -> ExecResult:
    """Raises: ValueError, KeyError: malformed (the client maps them)."""
    code, signal = data.get("exit_code"), data.get("signal")
    return ExecResult(
        exit_code=code if isinstance(code, int) else None,
        signal=signal if isinstance(signal, int) else None,
        stdout=base64.b64decode(str(data["stdout"])),
        stderr=base64.b64decode(str(data["stderr"])),
        truncated=data.get("truncated") is True,
    )
