"""The cluster as the controller sees it: the inventory plus one agent per host.

Each agent is an :class:`~vmferry.agent.port.AgentPort`: an HTTP client of the inventory's
agent (``vmferry`` commands), or an agent running in this process (the one-machine lab,
:mod:`vmferry.lab.local`). The controller cannot tell them apart.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from types import TracebackType

from vmferry.agent.api import NotFound, VmInfo
from vmferry.agent.client import AgentClient, AgentUnreachable
from vmferry.agent.port import AgentPort
from vmferry.controller.inventory import Inventory
from vmferry.core.errors import ConfigError
from vmferry.core.model import DEFAULT_CPU_MODEL, VmSpec, spec_from_json, validate_name

__all__ = ["Cluster", "VmListing", "spec_of"]


@dataclass(frozen=True, slots=True)
class VmListing:
    """Every VM of the cluster, and the hosts that did not answer."""

    vms: tuple[VmInfo, ...]
    unreachable: tuple[str, ...]


def spec_of(info: VmInfo) -> VmSpec:
    """The spec of a VM as its host reported it (to rebuild it identically elsewhere)."""
    return spec_from_json(
        {
            "name": info.name,
            "memory_bytes": info.memory_bytes,
            "vcpus": info.vcpus,
            "workload": info.workload,
            "machine_type": info.machine_type,
            "cpu_model": info.cpu_model or DEFAULT_CPU_MODEL,
            "disk": info.disk,
            "boot": info.boot,
        }
    )


class Cluster:
    """One agent per host of ``inventory``; use as an async context manager.

    Args:
        inventory: the hosts (names, migration addresses) and how to reach their agents.
        agents: the hosts' agents when they run in this process, by host name; None (the
            default): open an HTTP client to each host's agent on entry.

    Raises:
        ConfigError: ``agents`` and the inventory's hosts differ.
    """

    def __init__(self, inventory: Inventory, agents: Mapping[str, AgentPort] | None = None) -> None:
        self.inventory = inventory
        self._given = None if agents is None else dict(agents)
        if self._given is not None and set(self._given) != {h.name for h in inventory.hosts}:
            raise ConfigError("the in-process agents must be those of the inventory's hosts")
        self._clients: dict[str, AgentPort] = {}
        self._stack = AsyncExitStack()

    async def __aenter__(self) -> Cluster:
        if self._given is not None:
            self._clients = dict(self._given)
            return self
        for host in self.inventory.hosts:
            client = AgentClient(host.name, host.url, self.inventory.token, self.inventory.ca_file)
            self._clients[host.name] = await self._stack.enter_async_context(client)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stack.aclose()

    def client(self, host: str) -> AgentPort:
        """The agent of ``host``.

        Raises:
            ConfigError: no such host.
        """
        validate_name(host, "host name")
        self.inventory.host(host)  # raises a clear "unknown host" error
        return self._clients[host]

    async def list_vms(self) -> VmListing:
        """Ask every agent for its VMs (concurrently); unreachable hosts are listed apart."""
        names = list(self._clients)
        results = await asyncio.gather(
            *(self._clients[n].list_vms() for n in names), return_exceptions=True
        )
        vms: list[VmInfo] = []
        unreachable: list[str] = []
        for name, result in zip(names, results, strict=True):
            if isinstance(result, AgentUnreachable):
                unreachable.append(name)
            elif isinstance(result, BaseException):
                raise result
            else:
                vms.extend(result)
        return VmListing(tuple(sorted(vms, key=lambda v: v.name)), tuple(unreachable))

    async def locate(self, name: str) -> VmInfo:
        """Find the host holding VM ``name`` (running, or mid-migration as its source).

        Raises:
            ConfigError: bad name, or no host has it (NotFound).
        """
        validate_name(name)
        listing = await self.list_vms()
        found = [vm for vm in listing.vms if vm.name == name and vm.state != "incoming"]
        if not found:
            found = [vm for vm in listing.vms if vm.name == name]
        if not found:
            where = ""
            if listing.unreachable:
                where = f" (unreachable: {', '.join(listing.unreachable)})"
            raise NotFound(f"unknown VM {name!r}{where}")
        return found[0]

    async def check_new_name(self, name: str) -> None:
        """Refuse a name any host already uses.

        Raises:
            ConfigError: taken.
        """
        listing = await self.list_vms()
        for vm in listing.vms:
            if vm.name == name:
                raise ConfigError(f"a VM named {name!r} already exists on {vm.host}")
