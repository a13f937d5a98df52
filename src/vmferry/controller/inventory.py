"""The cluster inventory: which hosts exist, where their agents listen, the shared token and the
CA their HTTPS certificates are signed by.

A lab writes it (``lab.json`` in the lab directory); the CLI and the controller read it. The
lab directory is ``$VMFERRY_LAB_DIR`` if set, else ``<user state dir>/vmferry/lab``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from vmferry.core.errors import ConfigError

__all__ = ["INVENTORY_SCHEMA", "HostEntry", "Inventory", "default_lab_dir"]

INVENTORY_SCHEMA = 1


def default_lab_dir() -> Path:
    """Where the lab keeps its state (``$VMFERRY_LAB_DIR`` overrides)."""
    override = os.environ.get("VMFERRY_LAB_DIR")
    if override:
        return Path(override)
    import platformdirs  # here, not at import: every command's start-up counts (`plan`)

    return Path(platformdirs.user_state_dir("vmferry")) / "lab"


@dataclass(frozen=True, slots=True)
class HostEntry:
    """One host of the cluster."""

    name: str
    url: str  # the agent's base URL, e.g. https://127.0.0.1:41234
    pid: int | None  # the agent's process id (lab-managed hosts)
    state_dir: str  # the agent's state directory
    address: str  # where its migration stream listens (127.0.0.1, or its netns address)
    netns: str | None = None  # network namespace it runs in, if any

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "url": self.url,
            "pid": self.pid,
            "state_dir": self.state_dir,
            "address": self.address,
            "netns": self.netns,
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> HostEntry:
        pid = data.get("pid")
        netns = data.get("netns")
        return cls(
            name=str(data["name"]),
            url=str(data["url"]),
            pid=pid if isinstance(pid, int) else None,
            state_dir=str(data["state_dir"]),
            address=str(data["address"]),
            netns=netns if isinstance(netns, str) else None,
        )


@dataclass(frozen=True, slots=True)
class Inventory:
    """All hosts, the token that authenticates to their agents, and shared paths."""

    directory: Path
    token: str
    hosts: tuple[HostEntry, ...]
    netns: bool = False
    link_mbps: int | None = None
    # The CA that signed the agents' HTTPS certificates; clients trust it alone.
    ca_file: Path | None = None

    @property
    def path(self) -> Path:
        return self.directory / "lab.json"

    @property
    def token_file(self) -> Path:
        return self.directory / "token"

    @property
    def history_db(self) -> Path:
        return self.directory / "history.db"

    def host(self, name: str) -> HostEntry:
        """The host called ``name``.

        Raises:
            ConfigError: no such host.
        """
        for entry in self.hosts:
            if entry.name == name:
                return entry
        known = ", ".join(h.name for h in self.hosts) or "none"
        raise ConfigError(f"unknown host {name!r} (hosts: {known})")

    def to_json(self) -> dict[str, object]:
        return {
            "schema": INVENTORY_SCHEMA,
            "netns": self.netns,
            "link_mbps": self.link_mbps,
            "ca_file": None if self.ca_file is None else str(self.ca_file),
            "hosts": [h.to_json() for h in self.hosts],
        }

    def save(self) -> None:
        """Write ``lab.json`` and the token file (mode 0600) atomically."""
        self.directory.mkdir(parents=True, exist_ok=True)
        token_tmp = self.token_file.with_suffix(".tmp")
        fd = os.open(token_tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(self.token + "\n")
        token_tmp.replace(self.token_file)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        tmp.replace(self.path)

    @classmethod
    def load(cls, directory: Path | None = None) -> Inventory:
        """Read the inventory.

        Raises:
            ConfigError: there is no lab (``vmferry lab up`` first) or the file is damaged.
        """
        directory = directory or default_lab_dir()
        path = directory / "lab.json"
        try:
            data = json.loads(path.read_text())
            token = (directory / "token").read_text().strip()
        except FileNotFoundError:
            raise ConfigError(f"no lab at {directory}: run `vmferry lab up` first") from None
        except (OSError, ValueError) as err:
            raise ConfigError(f"cannot read the lab inventory {path}: {err}") from err
        if not isinstance(data, dict) or data.get("schema") != INVENTORY_SCHEMA:
            raise ConfigError(f"{path} is not a vmferry lab inventory (schema {INVENTORY_SCHEMA})")
        link = data.get("link_mbps")
        ca_file = data.get("ca_file")
        return cls(
            directory=directory,
            token=token,
            hosts=tuple(HostEntry.from_json(h) for h in data.get("hosts", [])),
            netns=bool(data.get("netns", False)),
            link_mbps=link if isinstance(link, int) else None,
            ca_file=Path(ca_file) if isinstance(ca_file, str) else None,
        )
