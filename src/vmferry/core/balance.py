"""Balancing a real cluster: host load from memory and measured CPU, the cool-down that stops a
balancer from flapping, and a plan of moves with every host's predicted load after each.

A host's load is the larger of two shares: the memory its VMs use, and the CPUs its VMs keep
busy (each VM's measured vCPU load, e.g. a 2-vCPU VM busy 50 % of the time keeps one CPU
busy, over the host's CPUs). Allocation (memory and vCPUs given to VMs) stays what a
destination must have room for (:class:`~vmferry.core.placement.Room`); the load is what it
is balanced by. The spread of a cluster is its most loaded host's load less its least loaded
one's.

A plan moves, one step at a time, a VM from a host to one of the least loaded hosts while the
spread between the two exceeds a target: the VM must fit there, relieve its host, not leave
the destination more loaded than its host then is (the next plan would move it back), and not
push the destination's CPUs past full. Among the few VMs whose move comes closest to evening
the two out, the one with the least predicted cost per unit of load relieved is chosen; a move
predicted never to end (cost infinite) is never chosen. A VM moves at most once per plan, and
VMs that moved within the cool-down (:func:`cooling`) not at all: when loads change (a
measured CPU load rises and falls), a VM is not sent back and forth.

This planner looks at every host at each step (a real cluster's few hosts); the simulator's
10,000-host plans use :func:`vmferry.core.placement.plan_balance`.

Example:
    >>> from vmferry.core.cluster_model import Cluster, Host, HostName, Vm, VmName
    >>> hosts = [Host(HostName(h), 1 << 30, 8, 125_000_000) for h in ("h1", "h2")]
    >>> vms = [Vm(VmName(v), HostName("h1"), 256 << 20) for v in ("a", "b")]
    >>> plan = plan_moves(Cluster.build(hosts, vms), cpu_busy={}, cpus={},
    ...                   cost_s=lambda vm, host: 1.0, max_moves=4)
    >>> [(m.name, m.destination) for m in plan.moves], plan.spread_before, plan.spread_after
    ([('a', 'h2')], 0.5, 0.0)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from vmferry.core.cluster_model import Cluster, Host, HostName, Move, Vm, VmName
from vmferry.core.errors import ConfigError
from vmferry.core.placement import Room

__all__ = [
    "DEFAULT_SPREAD",
    "BalancePlan",
    "BalanceStep",
    "HostLoad",
    "LoadBook",
    "RecentMove",
    "Stop",
    "cooling",
    "plan_moves",
    "spread",
]

# The load difference (0..1) between the most and least loaded hosts a plan aims under.
DEFAULT_SPREAD = 0.10
# A step weighs the predicted cost of this many candidates (those closest to evening out).
_WEIGHED = 4
# Each source is tried against this many of the least loaded hosts.
_DESTINATIONS = 3
_EPS = 1e-9

Stop = Literal["balanced", "max-moves", "cool-down", "no-move-helps"]


@dataclass(frozen=True, slots=True)
class HostLoad:
    """One host's load.

    Attributes:
        host: the host.
        memory: share of its memory its VMs use (0..1).
        cpu: share of its CPUs its VMs keep busy, as measured (0..1, more when overloaded).
    """

    host: HostName
    memory: float
    cpu: float

    @property
    def load(self) -> float:
        """The larger of the two shares."""
        return max(self.memory, self.cpu)

    def to_json(self) -> dict[str, Any]:
        return {
            "load": round(self.load, 4),
            "memory": round(self.memory, 4),
            "cpu": round(self.cpu, 4),
        }


def spread(loads: Iterable[HostLoad]) -> float:
    """The most loaded host's load less the least loaded one's (0 for fewer than two)."""
    values = [h.load for h in loads]
    return max(values) - min(values) if len(values) > 1 else 0.0


class LoadBook:
    """Memory and busy CPUs per host, updated as VMs move.

    Args:
        cluster: hosts and VMs.
        hosts: the hosts that take part (the others are neither counted nor moved to).
        cpu_busy: busy vCPUs each VM was measured to keep (its vCPUs times their busy share);
            a VM not listed counts as all its vCPUs busy.
        cpus: CPUs per host; a host not listed counts its vCPUs (the measured load is then a
            share of what it offers VMs).
    """

    def __init__(
        self,
        cluster: Cluster,
        hosts: Collection[str],
        cpu_busy: Mapping[str, float],
        cpus: Mapping[str, float],
    ) -> None:
        self._cpu_busy = cpu_busy
        self._hosts: dict[HostName, Host] = {}
        self._cpus: dict[HostName, float] = {}
        self.memory_bytes: dict[HostName, int] = {}
        self.busy: dict[HostName, float] = {}
        for name in hosts:
            host = cluster.host(name)
            self._hosts[host.name] = host
            self._cpus[host.name] = max(_EPS, float(cpus.get(host.name, host.vcpus)))
            on = cluster.vms_on(host.name)
            self.memory_bytes[host.name] = sum(v.memory_bytes for v in on)
            self.busy[host.name] = sum(self.cpu_of(v) for v in on)

    @property
    def hosts(self) -> tuple[HostName, ...]:
        return tuple(self._hosts)

    def cpu_of(self, vm: Vm) -> float:
        """The busy vCPUs ``vm`` brings (at most its vCPUs)."""
        return min(float(vm.vcpus), max(0.0, self._cpu_busy.get(vm.name, float(vm.vcpus))))

    def load(self, host: HostName, *, memory_bytes: int = 0, busy: float = 0.0) -> HostLoad:
        """``host``'s load, with ``memory_bytes`` and ``busy`` vCPUs added (negative: taken)."""
        total = self._hosts[host].memory_bytes
        return HostLoad(
            host,
            (self.memory_bytes[host] + memory_bytes) / total,
            max(0.0, self.busy[host] + busy) / self._cpus[host],
        )

    def loads(self) -> tuple[HostLoad, ...]:
        """Every host's load, in the cluster's order."""
        return tuple(self.load(h) for h in self._hosts)

    def after(self, vm: Vm, source: HostName, target: HostName) -> tuple[HostLoad, HostLoad]:
        """The loads of ``source`` and ``target`` were ``vm`` moved (nothing changes)."""
        cpu = self.cpu_of(vm)
        return (
            self.load(source, memory_bytes=-vm.memory_bytes, busy=-cpu),
            self.load(target, memory_bytes=vm.memory_bytes, busy=cpu),
        )

    def move(self, vm: Vm, source: HostName, target: HostName) -> None:
        cpu = self.cpu_of(vm)
        self.memory_bytes[source] -= vm.memory_bytes
        self.memory_bytes[target] += vm.memory_bytes
        self.busy[source] -= cpu
        self.busy[target] += cpu


@dataclass(frozen=True, slots=True)
class RecentMove:
    """A VM that moved, and when its move ended (seconds on the caller's clock)."""

    vm: str
    ended_at_s: float


def cooling(recent: Iterable[RecentMove], now_s: float, cool_down_s: float) -> dict[VmName, float]:
    """The VMs still in their cool-down at ``now_s``, with the seconds left of it.

    Args:
        recent: moves that ended, any order (a VM's latest counts).
        now_s: now, on the same clock as the moves' ends.
        cool_down_s: how long after its move a VM stays put.

    Raises:
        ConfigError: a negative cool-down.
    """
    if cool_down_s < 0:
        raise ConfigError("the cool-down must be >= 0")
    left: dict[VmName, float] = {}
    for move in recent:
        remaining = move.ended_at_s + cool_down_s - now_s
        if remaining > 0:
            name = VmName(move.vm)
            left[name] = max(left.get(name, 0.0), remaining)
    return left


@dataclass(frozen=True, slots=True)
class BalanceStep:
    """One move of a plan and the cluster after it.

    Attributes:
        move: the move.
        cost_s: its predicted duration (what weighed it).
        loads: every host's load once it is done (the hosts of the plan, in order).
    """

    move: Move
    cost_s: float
    loads: tuple[HostLoad, ...]

    @property
    def spread(self) -> float:
        return spread(self.loads)

    def to_json(self) -> dict[str, Any]:
        return {
            "vm": self.move.name,
            "source": self.move.source,
            "destination": self.move.destination,
            "cost_s": None if math.isinf(self.cost_s) else round(self.cost_s, 3),
            "spread_after": round(self.spread, 4),
            "loads_after": {h.host: round(h.load, 4) for h in self.loads},
        }


@dataclass(frozen=True, slots=True)
class BalancePlan:
    """What a balance would do.

    Attributes:
        before: every host's load now.
        steps: the moves, in order, each with the loads after it.
        target: the spread aimed under.
        stopped: why the plan ends: ``balanced`` (the spread is within the target),
            ``max-moves``, ``cool-down`` (only VMs in their cool-down would help) or
            ``no-move-helps``.
        cooling: every VM in its cool-down, with the seconds left.
        held_back: the VMs in their cool-down that the last search would have moved.
    """

    before: tuple[HostLoad, ...]
    steps: tuple[BalanceStep, ...]
    target: float
    stopped: Stop
    cooling: Mapping[VmName, float] = field(default_factory=dict)
    held_back: tuple[VmName, ...] = ()

    @property
    def moves(self) -> tuple[Move, ...]:
        return tuple(s.move for s in self.steps)

    @property
    def after(self) -> tuple[HostLoad, ...]:
        return self.steps[-1].loads if self.steps else self.before

    @property
    def spread_before(self) -> float:
        return spread(self.before)

    @property
    def spread_after(self) -> float:
        return spread(self.after)

    @property
    def cost_s(self) -> float:
        """The moves' predicted durations added up (one after the other)."""
        return sum(s.cost_s for s in self.steps)

    def reason(self) -> str:
        """Why the plan ends where it does, in words."""
        spreads = f"spread {self.spread_before:.2f}"
        if self.steps:
            spreads += f" → {self.spread_after:.2f}"
        elif self.stopped != "balanced":
            spreads = f"nothing to do: {spreads}"
        if self.stopped == "balanced":
            if not self.steps:
                return f"nothing to do: {spreads} is within the target {self.target:.2f}"
            return f"{spreads}, within the target {self.target:.2f}"
        if self.stopped == "max-moves":
            return f"{spreads}; stopped at the move limit"
        if self.stopped == "cool-down":
            held = ", ".join(self.held_back)
            left = min(self.cooling[v] for v in self.held_back) / 60.0
            return (
                f"{spreads}; the VMs that would even it out moved recently ({held}): in their "
                f"cool-down for {left:.0f} more min"
            )
        return f"{spreads}; no move of a single VM narrows it"

    def to_json(self) -> dict[str, Any]:
        after = {h.host: h for h in self.after}
        return {
            "target_spread": self.target,
            "spread_before": round(self.spread_before, 4),
            "spread_after": round(self.spread_after, 4),
            "stopped": self.stopped,
            "reason": self.reason(),
            "hosts": [
                {"host": h.host, "before": h.to_json(), "after": after[h.host].to_json()}
                for h in self.before
            ],
            "steps": [s.to_json() for s in self.steps],
            "cooling": [
                {"vm": vm, "left_s": round(left, 1)} for vm, left in sorted(self.cooling.items())
            ],
            "held_back": list(self.held_back),
        }


def plan_moves(
    cluster: Cluster,
    *,
    cpu_busy: Mapping[str, float],
    cpus: Mapping[str, float],
    cost_s: Callable[[Vm, Host], float],
    max_moves: int,
    hosts: Collection[str] | None = None,
    cooldown: Mapping[VmName, float] | Collection[str] = (),
    fixed: Collection[str] = (),
    target: float = DEFAULT_SPREAD,
) -> BalancePlan:
    """The moves that bring the hosts' loads within ``target`` of each other.

    Args:
        cluster: the cluster now.
        cpu_busy: busy vCPUs per VM as measured (see :class:`LoadBook`).
        cpus: CPUs per host.
        cost_s: predicted seconds to move a VM to a host (inf: it would not end).
        max_moves: at most this many moves (>= 1).
        hosts: the hosts to balance (default: all); the others (in maintenance, say) are
            neither sources nor destinations, nor counted in the spread.
        cooldown: VMs in their cool-down (with seconds left, if known): not moved.
        fixed: VMs that must stay put for another reason (a migration in flight).
        target: the spread aimed under (0..1).

    Raises:
        ConfigError: ``max_moves`` below 1, a target outside 0..1.
        UnknownHost: a host of ``hosts`` is not in the cluster.
    """
    if max_moves < 1:
        raise ConfigError("max_moves must be at least 1")
    if not 0.0 <= target < 1.0:
        raise ConfigError("the target spread must be within 0..1")
    names = [h.name for h in cluster.hosts] if hosts is None else list(dict.fromkeys(hosts))
    book = LoadBook(cluster, names, cpu_busy, cpus)
    room = Room(cluster, book.hosts)
    on = {h: list(cluster.vms_on(h)) for h in book.hosts}
    left = (
        {VmName(v): float(s) for v, s in cooldown.items()}
        if isinstance(cooldown, Mapping)
        else dict.fromkeys((VmName(v) for v in cooldown), math.inf)
    )
    moved: set[VmName] = {VmName(v) for v in fixed}
    present = {vm.name for vm in cluster.vms}
    before = book.loads()
    steps: list[BalanceStep] = []
    stopped: Stop = "max-moves"
    held: tuple[VmName, ...] = ()
    while len(steps) < max_moves:
        found, held = _step(cluster, book, room, on, (moved, set(left)), cost_s, target)
        if found is None:
            stopped = "balanced" if spread(book.loads()) <= target + _EPS else "no-move-helps"
            if stopped == "no-move-helps" and held:
                stopped = "cool-down"
            break
        vm, destination, cost = found
        room.give_back(vm, vm.host)
        room.take(vm, destination)
        book.move(vm, vm.host, destination)
        on[vm.host].remove(vm)
        on[destination].append(vm)
        moved.add(vm.name)
        steps.append(BalanceStep(Move(vm, destination), cost, book.loads()))
    return BalancePlan(
        before,
        tuple(steps),
        target,
        stopped,
        {v: s for v, s in left.items() if v in present},
        held if stopped == "cool-down" else (),
    )


def _step(
    cluster: Cluster,
    book: LoadBook,
    room: Room,
    on: Mapping[HostName, Sequence[Vm]],
    frozen: tuple[set[VmName], set[VmName]],
    cost_s: Callable[[Vm, Host], float],
    target: float,
) -> tuple[tuple[Vm, HostName, float] | None, tuple[VmName, ...]]:
    """The next move: from the most loaded host that has one, to one of the least loaded.

    Returns:
        (VM, destination, cost) or None, and the cooling VMs that would have been candidates.
    """
    loads = {h.host: h.load for h in book.loads()}
    hot = sorted(loads, key=lambda h: (-loads[h], h))
    cool = sorted(loads, key=lambda h: (loads[h], h))[:_DESTINATIONS]
    held: list[VmName] = []
    for source in hot:
        for target_host in cool:
            if loads[source] - loads[target_host] <= target + _EPS:
                break  # the rest are more loaded still
            hosts = (cluster.host(source), cluster.host(target_host))
            picked, cooling = _pick(on[source], hosts, book, room, frozen, cost_s)
            held += [v for v in cooling if v not in held]
            if picked is not None:
                return (picked[0], target_host, picked[1]), tuple(held)
    return None, tuple(held)


def _pick(
    candidates: Sequence[Vm],
    hosts: tuple[Host, Host],
    book: LoadBook,
    room: Room,
    frozen: tuple[set[VmName], set[VmName]],
    cost_s: Callable[[Vm, Host], float],
) -> tuple[tuple[Vm, float] | None, list[VmName]]:
    """The VM of ``hosts[0]`` to move to ``hosts[1]`` and its cost (see the module docs), and
    the VMs in their cool-down that would have qualified."""
    (source, target), (moved, cooling) = hosts, frozen
    hot, cool = book.load(source.name).load, book.load(target.name).load
    even = (hot - cool) / 2.0
    fitting: list[tuple[float, float, Vm]] = []
    held: list[VmName] = []
    for vm in candidates:
        if vm.name in moved or room.why_not(vm, target.name) is not None:
            continue
        new_source, new_target = book.after(vm, source.name, target.name)
        relief = hot - new_source.load
        if relief <= _EPS or new_target.load > new_source.load + _EPS or new_target.cpu > 1.0:
            continue  # no relief, a new hot spot, or a destination's CPUs overcommitted
        if vm.name in cooling:
            held.append(vm.name)
            continue
        fitting.append((abs(relief - even), relief, vm))
    fitting.sort(key=lambda item: (item[0], item[2].name))
    scored = [
        (cost / relief, vm.name, vm, cost)
        for _, relief, vm in fitting[:_WEIGHED]
        if not math.isinf(cost := cost_s(vm, target))
    ]
    if not scored:
        return None, held
    best = min(scored, key=lambda item: item[:2])
    return (best[2], best[3]), held
