"""What a host agent is told about its host (its command line, as one value)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vmferry.agent.qemu_user import QemuUser

__all__ = ["DEFAULT_PROFILE_INTERVAL_S", "AgentConfig"]

# A guest measurement takes ~1 s (QEMU's dirty-rate window), mostly waiting: one every 10 s
# costs the guest little (bench/profile_cost.py) and keeps a plan's data under ~12 s old.
DEFAULT_PROFILE_INTERVAL_S = 10.0


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
    # Time between two background measurements of a running VM (its rolling profile, see
    # agent/profile.py); None: no background profiling.
    profile_interval_s: float | None = DEFAULT_PROFILE_INTERVAL_S
