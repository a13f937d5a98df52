"""What a host agent keeps on disk: each VM's definition, its QEMU's pid, marker files, and
where disk images live.

``<state_dir>/vms/<name>/spec.json`` plus ``qemu.pid`` let a restarted agent reattach to the
VMs that kept running; the markers record what an agent restart must not forget:

- ``incoming``: this host is the destination of an unfinished migration;
- ``postcopy``: this source's migration entered post-copy: never resume it here;
- ``held``: this destination keeps the guest paused once it arrives and has never run it
  (it may be dropped after it arrived, if the copies differ).
"""

from __future__ import annotations

import enum
import json
import shutil
from pathlib import Path

from vmferry.agent.config import AgentConfig
from vmferry.core.errors import ConfigError
from vmferry.core.model import VmSpec, spec_from_json, spec_to_json
from vmferry.qemu.qcow2 import remove_image

__all__ = ["Marker", "VmStore"]


class Marker(enum.Enum):
    """Files in a VM's runtime directory that survive an agent restart."""

    INCOMING = "incoming"
    POSTCOPY = "postcopy"
    HELD = "held"


class VmStore:
    """The agent's state directory."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config

    @property
    def vms_dir(self) -> Path:
        return self.config.state_dir / "vms"

    @property
    def disks_dir(self) -> Path:
        return self.config.state_dir / "disks"

    def directory(self, name: str) -> Path:
        """VM ``name``'s runtime directory (QMP and serial sockets, spec, pid, markers)."""
        return self.vms_dir / name

    def directories(self) -> list[Path]:
        """Every VM directory found, sorted."""
        self.vms_dir.mkdir(parents=True, exist_ok=True)
        return sorted(p for p in self.vms_dir.iterdir() if p.is_dir())

    def disk_path(self, spec: VmSpec) -> Path | None:
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

    def owned_disk(self, spec: VmSpec) -> Path | None:
        """The image this host removes together with the VM: a local one only."""
        if spec.disk is None or spec.disk.storage != "local":
            return None
        return self.disk_path(spec)

    def persist(self, spec: VmSpec) -> None:
        path = self.directory(spec.name) / "spec.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(spec_to_json(spec), indent=2) + "\n")
        tmp.replace(path)

    @staticmethod
    def has_spec(directory: Path) -> bool:
        return (directory / "spec.json").exists()

    @staticmethod
    def load_spec(directory: Path) -> VmSpec:
        """Raises: OSError, ValueError, FerryError: missing or unreadable."""
        return spec_from_json(json.loads((directory / "spec.json").read_text()))

    @staticmethod
    def pid(directory: Path) -> int:
        """The QEMU pid recorded in ``directory`` (0: none or unreadable)."""
        try:
            return int((directory / "qemu.pid").read_text().strip())
        except (OSError, ValueError):
            return 0

    @staticmethod
    def mark(directory: Path, marker: Marker) -> None:
        (directory / marker.value).touch()

    @staticmethod
    def unmark(directory: Path, marker: Marker) -> None:
        (directory / marker.value).unlink(missing_ok=True)

    @staticmethod
    def is_marked(directory: Path, marker: Marker) -> bool:
        return (directory / marker.value).exists()

    def remove(self, name: str, disk: Path | None) -> None:
        """Drop VM ``name``'s runtime directory and, if given, its disk image."""
        shutil.rmtree(self.directory(name), ignore_errors=True)
        if disk is not None:
            remove_image(disk)
