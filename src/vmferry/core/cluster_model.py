"""A cluster as the scheduler of many moves sees it: hosts, VMs, the moves wanted, and the
errors a bulk operation refuses with.

Hosts have room (memory, vCPUs), one migration link (the same rate each way: full duplex) and
limits on the moves they send and receive at once. VMs carry what a pre-flight measures of
them (size, dirty rate and dirty set, zero share) and their downtime goal; the predictor's
:class:`~vmferry.core.measurement.Measurement` is built from them at a bandwidth share.

Example:
    >>> h1 = Host(HostName("h1"), memory_bytes=64 << 30, vcpus=32, link_bps=1_250_000_000)
    >>> h2 = Host(HostName("h2"), memory_bytes=64 << 30, vcpus=32, link_bps=1_250_000_000)
    >>> vm = Vm(VmName("web-1"), HostName("h1"), memory_bytes=4 << 30, vcpus=2)
    >>> cluster = Cluster.build([h1, h2], [vm])
    >>> cluster.used_memory_bytes(HostName("h1")) == 4 << 30
    True
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from vmferry.core.errors import ConfigError
from vmferry.core.measurement import Measurement
from vmferry.core.model import HostName, VmName
from vmferry.core.units import format_ms

__all__ = [
    "Cluster",
    "DeadlineUnreachable",
    "Host",
    "HostName",
    "Move",
    "PlacementError",
    "UnknownHost",
    "Vm",
    "VmName",
]


class UnknownHost(ConfigError):
    """A host named in a request is not in the cluster.

    Attributes:
        host: the name asked for.
    """

    def __init__(self, host: str) -> None:
        super().__init__(f"unknown host {host!r}")
        self.host = host


class PlacementError(ConfigError):
    """VMs have nowhere to go (no host with room, only one host, anti-affinity). Nothing moved
    (a refusal of the request, as bad input is: the CLI exits 2).

    Attributes:
        reasons: per VM that cannot be placed, why (empty when the request itself is refused).
    """

    def __init__(self, message: str, reasons: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.reasons = dict(reasons or {})


class DeadlineUnreachable(ConfigError):
    """The predicted schedule ends after the deadline asked for. Nothing moved (a refusal).

    Attributes:
        predicted_makespan_s: when the whole job is predicted to end, from its start.
        deadline_s: the deadline asked for.
    """

    def __init__(self, predicted_makespan_s: float, deadline_s: float) -> None:
        super().__init__(
            f"cannot finish by the {format_ms(deadline_s * 1000)} deadline: the best schedule "
            f"is predicted to take {format_ms(predicted_makespan_s * 1000)}"
        )
        self.predicted_makespan_s = predicted_makespan_s
        self.deadline_s = deadline_s


@dataclass(frozen=True, slots=True)
class Host:
    """One host.

    Attributes:
        name: its name.
        memory_bytes: memory VMs may use.
        vcpus: vCPUs VMs may use (overcommit included).
        link_bps: its migration link's rate, each way (bytes per second).
        max_outbound: moves it sends at once, at most.
        max_inbound: moves it receives at once, at most.
    """

    name: HostName
    memory_bytes: int
    vcpus: int
    link_bps: int
    max_outbound: int = 8
    max_inbound: int = 8

    def __post_init__(self) -> None:
        if self.memory_bytes <= 0 or self.vcpus <= 0 or self.link_bps <= 0:
            raise ConfigError(f"host {self.name}: memory, vCPUs and link must be positive")
        if self.max_outbound < 1 or self.max_inbound < 1:
            raise ConfigError(f"host {self.name}: move limits must be at least 1")


@dataclass(frozen=True, slots=True)
class Vm:
    """One VM, with what a pre-flight measured of it.

    Attributes:
        name: its name.
        host: where it runs.
        memory_bytes: its RAM.
        vcpus: its vCPUs.
        dirty_rate_bps: bytes per second the guest dirties.
        dirty_set_bytes: the memory it keeps re-dirtying (its working set), at most its RAM;
            None: all of it.
        zero_fraction: share of its pages that are zero.
        compress_ratio: zstd ratio of its non-zero pages.
        max_downtime_ms: its downtime goal (what the guest may feel).
        group: anti-affinity group: no two VMs of a group on one host (None: no constraint).
    """

    name: VmName
    host: HostName
    memory_bytes: int
    vcpus: int = 1
    dirty_rate_bps: int = 0
    dirty_set_bytes: int | None = None
    zero_fraction: float = 0.5
    compress_ratio: float = 1.0
    max_downtime_ms: int = 300
    group: str | None = None

    def __post_init__(self) -> None:
        if self.memory_bytes <= 0 or self.vcpus <= 0:
            raise ConfigError(f"VM {self.name}: memory and vCPUs must be positive")
        dirty_set = self.memory_bytes if self.dirty_set_bytes is None else self.dirty_set_bytes
        if self.dirty_rate_bps < 0 or not 0 <= dirty_set <= self.memory_bytes:
            raise ConfigError(f"VM {self.name}: dirty rate >= 0 and dirty set within its RAM")
        if self.max_downtime_ms <= 0:
            raise ConfigError(f"VM {self.name}: the downtime goal must be positive")

    def measurement(self, bandwidth_bps: float) -> Measurement:
        """The predictor's input for this VM moving at ``bandwidth_bps``."""
        return Measurement(
            ram_bytes=self.memory_bytes,
            zero_fraction=self.zero_fraction,
            compress_ratio=max(1.0, self.compress_ratio),
            dirty_rate_bps=self.dirty_rate_bps,
            bandwidth_bps=max(1, round(bandwidth_bps)),
            dirty_set_bytes=self.dirty_set_bytes,
        )


@dataclass(frozen=True, slots=True)
class Move:
    """One wanted move: ``vm`` (on ``source``) to ``destination``."""

    vm: Vm
    destination: HostName

    @property
    def source(self) -> HostName:
        return self.vm.host

    @property
    def name(self) -> VmName:
        return self.vm.name


@dataclass(frozen=True, slots=True)
class Cluster:
    """Hosts and the VMs on them, indexed (build with :meth:`build`)."""

    hosts: tuple[Host, ...]
    vms: tuple[Vm, ...]
    _hosts: dict[HostName, Host] = field(repr=False, compare=False)
    _vms: dict[VmName, Vm] = field(repr=False, compare=False)
    _on: dict[HostName, tuple[Vm, ...]] = field(repr=False, compare=False)

    @classmethod
    def build(cls, hosts: Iterable[Host], vms: Iterable[Vm]) -> Cluster:
        """Index hosts and VMs.

        Raises:
            ConfigError: duplicate names, no host at all.
            UnknownHost: a VM on a host that is not listed.
        """
        host_list, vm_list = tuple(hosts), tuple(vms)
        if not host_list:
            raise ConfigError("a cluster needs at least one host")
        by_host = {h.name: h for h in host_list}
        by_vm = {v.name: v for v in vm_list}
        if len(by_host) != len(host_list) or len(by_vm) != len(vm_list):
            raise ConfigError("host and VM names must be unique")
        on: dict[HostName, list[Vm]] = {h.name: [] for h in host_list}
        for vm in vm_list:
            if vm.host not in on:
                raise UnknownHost(vm.host)
            on[vm.host].append(vm)
        return cls(host_list, vm_list, by_host, by_vm, {h: tuple(v) for h, v in on.items()})

    def host(self, name: str) -> Host:
        """The host called ``name``.

        Raises:
            UnknownHost: no such host.
        """
        found = self._hosts.get(HostName(name))
        if found is None:
            raise UnknownHost(name)
        return found

    def vm(self, name: str) -> Vm:
        """The VM called ``name``.

        Raises:
            ConfigError: no such VM.
        """
        found = self._vms.get(VmName(name))
        if found is None:
            raise ConfigError(f"unknown VM {name!r}")
        return found

    def vms_on(self, host: str) -> tuple[Vm, ...]:
        """The VMs on ``host``, in the cluster's order.

        Raises:
            UnknownHost: no such host.
        """
        return self._on[self.host(host).name]

    def used_memory_bytes(self, host: str) -> int:
        return sum(v.memory_bytes for v in self.vms_on(host))

    def used_vcpus(self, host: str) -> int:
        return sum(v.vcpus for v in self.vms_on(host))

    def after(self, moves: Sequence[Move]) -> Cluster:
        """The cluster once ``moves`` are done (each VM on its destination)."""
        moved = {m.name: m.destination for m in moves}
        vms = [v if v.name not in moved else replace(v, host=moved[v.name]) for v in self.vms]
        return Cluster.build(self.hosts, vms)
