"""The cluster as placement sees it, from the agents now: each host's room (memory, vCPUs,
disk space), the VMs on it with their anti-affinity groups, and the hosts in maintenance;
and where a new VM goes (:func:`place_vm`, by :func:`vmferry.core.placement.place_new`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

from vmferry.agent.api import HostInfo, VmInfo
from vmferry.agent.client import AgentUnreachable
from vmferry.controller.cluster import Cluster
from vmferry.controller.jobs import HostMark, JobStore
from vmferry.core import cluster_model as cm
from vmferry.core.calibration import Calibration
from vmferry.core.cluster_model import PlacementError
from vmferry.core.errors import ConfigError, FerryError
from vmferry.core.model import VmSpec, validate_name
from vmferry.core.placement import HostVerdict, NewPlacement, place_new

__all__ = ["LiveCluster", "VmPlacement", "live_cluster", "place_vm"]

# Which copy of a VM listed twice stands for it (stopped copies take no room).
_RANK = {"running": 0, "migrating": 1, "migrated": 2, "incoming": 3}
# Until the moves of a job measure the links, a host's link is taken to carry this much.
_DEFAULT_LINK_BPS = Calibration.default().qemu_throughput_bps


@dataclass(frozen=True, slots=True)
class LiveCluster:
    """The cluster now.

    Attributes:
        model: hosts (room as their agents report it) and VMs, as the scheduler's core sees
            them (the VMs not yet measured: no dirty rate).
        hosts: each reachable host's report.
        vms: every VM on a reachable host by name (a VM mid-migration: its source's copy).
        marks: hosts entering or in maintenance.
        groups: each grouped VM's anti-affinity group.
        unreachable: hosts whose agent did not answer.
    """

    model: cm.Cluster
    hosts: Mapping[str, HostInfo]
    vms: Mapping[str, VmInfo]
    marks: Mapping[str, HostMark]
    groups: Mapping[str, str]
    unreachable: tuple[str, ...]

    def open_hosts(self) -> list[str]:
        """Reachable hosts that take VMs (not entering or in maintenance), in order."""
        return [h.name for h in self.model.hosts if h.name not in self.marks]

    def vms_on(self, host: str) -> list[VmInfo]:
        return [v for v in self.vms.values() if v.host == host]


def _host(info: HostInfo, listed: list[VmInfo]) -> cm.Host:
    """A host whose room, less the VMs ``listed`` on it, is what its agent reports free (the
    copies a migration leaves, e.g. an incoming VM, count as used)."""
    listed_memory = sum(v.memory_bytes for v in listed)
    listed_vcpus = sum(v.vcpus for v in listed)
    vcpus = info.vcpus if info.vcpus is not None else max(1, info.vcpus_used) * 4
    return cm.Host(
        cm.HostName(info.host),
        memory_bytes=max(1, info.memory_bytes - (info.memory_used_bytes - listed_memory)),
        vcpus=max(1, vcpus - (info.vcpus_used - listed_vcpus)),
        link_bps=_DEFAULT_LINK_BPS,
    )


async def live_cluster(cluster: Cluster, store: JobStore) -> LiveCluster:
    """Ask every agent for its room and VMs (concurrently); read marks and groups.

    Raises:
        FerryError: no agent answered, or one failed otherwise than by being unreachable.
    """
    names = [h.name for h in cluster.inventory.hosts]
    answers = await asyncio.gather(*(_ask(cluster, name) for name in names), return_exceptions=True)
    hosts: dict[str, HostInfo] = {}
    listed: dict[str, list[VmInfo]] = {}
    unreachable: list[str] = []
    for name, answer in zip(names, answers, strict=True):
        if isinstance(answer, AgentUnreachable):
            unreachable.append(name)
        elif isinstance(answer, BaseException):
            raise answer
        else:
            hosts[name], listed[name] = answer
    if not hosts:
        raise FerryError(f"no host answered ({', '.join(unreachable)})")
    groups = store.groups()
    vms: dict[str, VmInfo] = {}
    for name in hosts:
        for vm in listed[name]:
            # A VM mid-migration is listed twice: the copy that runs stands for it.
            held = vms.get(vm.name)
            if vm.state in _RANK and (held is None or _RANK[vm.state] < _RANK[held.state]):
                vms[vm.name] = vm
    model = cm.Cluster.build(
        [_host(hosts[n], [v for v in vms.values() if v.host == n]) for n in hosts],
        [
            cm.Vm(
                cm.VmName(v.name),
                cm.HostName(v.host),
                memory_bytes=v.memory_bytes,
                vcpus=v.vcpus,
                group=groups.get(v.name),
            )
            for v in sorted(vms.values(), key=lambda v: v.name)
        ],
    )
    return LiveCluster(model, hosts, vms, store.marks(), groups, tuple(unreachable))


async def _ask(cluster: Cluster, host: str) -> tuple[HostInfo, list[VmInfo]]:
    client = cluster.client(host)
    info, vms = await asyncio.gather(client.host_info(), client.list_vms())
    return info, vms


@dataclass(frozen=True, slots=True)
class VmPlacement:
    """Where a new VM goes and why (``vm create``/``vm import`` without ``--host``).

    Attributes:
        host: the chosen host.
        reason: why it was chosen.
        verdicts: every host and how it was judged (the chosen one first).
    """

    host: str
    reason: str
    verdicts: tuple[HostVerdict, ...]

    def to_json(self) -> dict[str, object]:
        return {
            "host": self.host,
            "reason": self.reason,
            "hosts": [
                {
                    "host": v.host,
                    "free_memory_bytes": v.free_memory_bytes,
                    "free_vcpus": v.free_vcpus,
                    "fits": v.why_not is None,
                    "why_not": v.why_not,
                }
                for v in self.verdicts
            ],
        }


def _excluded(live: LiveCluster, spec: VmSpec, disk_bytes: int) -> dict[str, str]:
    """Hosts that cannot take ``spec`` whatever their room: in maintenance, without the
    virtual hardware, without disk space for it."""
    out: dict[str, str] = {}
    for name, info in live.hosts.items():
        mark = live.marks.get(name)
        if mark is not None:
            out[name] = f"{name} is {mark.describe}"
        elif spec.machine_type not in info.machine_types:
            out[name] = f"{name}'s QEMU cannot build machine type {spec.machine_type}"
        elif spec.cpu_model not in info.cpu_models:
            out[name] = f"{name}'s QEMU has no CPU model {spec.cpu_model}"
        elif info.disk_free_bytes is not None and disk_bytes > info.disk_free_bytes:
            out[name] = (
                f"{name} has {info.disk_free_bytes >> 20} MiB free for disks, "
                f"{disk_bytes >> 20} MiB needed"
            )
    return out


def place_vm(
    live: LiveCluster, spec: VmSpec, *, group: str | None = None, disk_bytes: int = 0
) -> VmPlacement:
    """The host for a new VM of ``spec`` (in anti-affinity ``group``, needing ``disk_bytes``
    of local disk space).

    Raises:
        ConfigError: a VM of that name exists, a bad group name.
        PlacementError: no host has room (the message names the one with the most free).
    """
    if spec.name in live.vms:
        raise ConfigError(f"a VM named {spec.name!r} already exists on {live.vms[spec.name].host}")
    if group is not None:
        validate_name(group, "group name")
    excluded = _excluded(live, spec, disk_bytes)
    vm = cm.Vm(
        cm.VmName(spec.name),
        live.model.hosts[0].name,
        memory_bytes=spec.memory_bytes,
        vcpus=spec.vcpus,
        group=group,
    )
    candidates = [h.name for h in live.model.hosts if h.name not in excluded]
    placed = place_new(live.model, vm, candidates)
    shut = [
        HostVerdict(cm.HostName(h), 0, 0, why) for h, why in excluded.items()
    ]  # room does not matter there
    shut += [HostVerdict(cm.HostName(h), 0, 0, f"{h} did not answer") for h in live.unreachable]
    verdicts = (*placed.verdicts, *shut)
    if placed.host is None:
        raise PlacementError(f"cannot place {spec.name}: {_none_fits(placed, excluded)}")
    return VmPlacement(placed.host, placed.reason, verdicts)


def _none_fits(placed: NewPlacement, excluded: Mapping[str, str]) -> str:
    if placed.verdicts:
        return placed.reason
    if excluded:
        return "; ".join(excluded.values())
    return "no host answered"
