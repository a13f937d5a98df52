"""Where VMs go: destinations for an evacuation, and a plan of moves that balances a cluster.

An evacuation places the VMs of the hosts being emptied largest first (first-fit decreasing
packs well), each on the host with the most free memory that also has the vCPUs and holds no
VM of its anti-affinity group: the most-free host spreads the moves over many destinations,
so no destination's link or inbound limit becomes the bottleneck. VMs with nowhere to go are
named up front with the reason. When the links differ, :func:`place_by_rate` re-places those
moves so that what each destination's link takes in ends about together (list scheduling on
machines of different speeds): the most-free rule ignores that a 1 GbE host takes a 512 MiB VM
in the time a 10 GbE host takes ten. A new VM goes the same way: to the host with the most free
memory among those it fits (:func:`place_new`); VMs brought back to a host are checked
against its room together (:func:`place_onto`).

A balance plan moves VMs from the most loaded host (load: the larger of its memory and vCPU
shares) to the least loaded while the spread between them exceeds a target, choosing on the
hot host, among the few VMs whose move comes closest to evening the two out, the one that
relieves most per predicted second, and never one that would make the cool host the new hot
spot. A VM moves at most once per plan, and VMs in the cool-down set (moved
recently) not at all: no flapping.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from vmferry.core.cluster_model import (
    Cluster,
    Host,
    HostName,
    Move,
    PlacementError,
    Vm,
    VmName,
)
from vmferry.core.errors import ConfigError

__all__ = [
    "HostVerdict",
    "NewPlacement",
    "Placement",
    "Room",
    "host_load",
    "place_by_rate",
    "place_evacuation",
    "place_new",
    "place_onto",
    "plan_balance",
]

# place_by_rate looks at most this many least-loaded hosts of one link rate for one that has
# room for a VM (hosts short of room for every VM left are dropped for good).
_RATE_TRIES = 32

# A balance step weighs the predicted cost of this many candidate VMs (those whose move comes
# closest to evening the two hosts out).
_WEIGHED = 4


@dataclass(frozen=True, slots=True)
class Placement:
    """The moves decided, and the VMs that cannot move with why.

    Attributes:
        moves: in request order (hosts as asked, each host's VMs in the cluster's order): the
            order a first-in-first-out scheduler takes them in.
        refused: (VM, reason) for each VM with nowhere to go.
    """

    moves: tuple[Move, ...]
    refused: tuple[tuple[VmName, str], ...] = ()

    def require_all(self) -> tuple[Move, ...]:
        """The moves, if every VM has a place.

        Raises:
            PlacementError: naming each VM that has none and why.
        """
        if self.refused:
            names = ", ".join(f"{vm} ({why})" for vm, why in self.refused[:5])
            more = f" and {len(self.refused) - 5} more" if len(self.refused) > 5 else ""
            raise PlacementError(
                f"{len(self.refused)} VM(s) cannot be placed: {names}{more}", dict(self.refused)
            )
        return self.moves


class Room:
    """Free memory, vCPUs and anti-affinity groups per host, updated as VMs are placed."""

    def __init__(self, cluster: Cluster, hosts: Collection[HostName]) -> None:
        self.memory: dict[HostName, int] = {}
        self.vcpus: dict[HostName, int] = {}
        self.groups: dict[HostName, set[str]] = {}
        for name in hosts:
            host = cluster.host(name)
            on = cluster.vms_on(name)
            self.memory[name] = host.memory_bytes - sum(v.memory_bytes for v in on)
            self.vcpus[name] = host.vcpus - sum(v.vcpus for v in on)
            self.groups[name] = {v.group for v in on if v.group is not None}

    def why_not(self, vm: Vm, host: HostName) -> str | None:
        """None when ``vm`` fits on ``host``, else why not."""
        if vm.memory_bytes > self.memory[host]:
            return "no host with enough free memory"
        if vm.vcpus > self.vcpus[host]:
            return "no host with enough free vCPUs"
        if vm.group is not None and vm.group in self.groups[host]:
            return f"every host with room already runs a VM of group {vm.group!r}"
        return None

    def take(self, vm: Vm, host: HostName) -> None:
        self.memory[host] -= vm.memory_bytes
        self.vcpus[host] -= vm.vcpus
        if vm.group is not None:
            self.groups[host].add(vm.group)

    def give_back(self, vm: Vm, host: HostName) -> None:
        self.memory[host] += vm.memory_bytes
        self.vcpus[host] += vm.vcpus
        if vm.group is not None:
            self.groups[host].discard(vm.group)


def place_evacuation(
    cluster: Cluster, hosts: Sequence[str], *, to: Sequence[str] | None = None
) -> Placement:
    """Destinations for every VM of ``hosts``.

    Args:
        cluster: the cluster now.
        hosts: the hosts to empty.
        to: the only hosts to move to (default: every other host).

    Returns:
        The moves and the VMs that cannot be placed (with why).

    Raises:
        UnknownHost: a host named is not in the cluster.
        ConfigError: no host to empty, a host both emptied and a destination.
        PlacementError: no host is left to move to (e.g. evacuating the only host).
    """
    sources = [cluster.host(h).name for h in hosts]
    if not sources:
        raise ConfigError("name at least one host to evacuate")
    emptied = set(sources)
    if to is not None:
        targets = [cluster.host(h).name for h in to]
        both = emptied.intersection(targets)
        if both:
            raise ConfigError(f"{', '.join(sorted(both))}: both evacuated and a destination")
    else:
        targets = [h.name for h in cluster.hosts if h.name not in emptied]
    if not targets:
        only = "the only host" if len(cluster.hosts) == 1 else "every host"
        raise PlacementError(f"cannot evacuate {', '.join(sources)}: it is {only}")
    room = Room(cluster, targets)
    leaving = [vm for name in dict.fromkeys(sources) for vm in cluster.vms_on(name)]
    chosen: dict[VmName, HostName] = {}
    refused: list[tuple[VmName, str]] = []
    # Most free memory first (negated for heapq); ties by name, so the result is stable.
    heap = [(-room.memory[h], h) for h in targets]
    heapq.heapify(heap)
    for vm in sorted(leaving, key=lambda v: (-v.memory_bytes, v.name)):
        found, why = _most_free_fit(vm, heap, room)
        if found is None:
            refused.append((vm.name, why))
        else:
            chosen[vm.name] = found
    moves = tuple(Move(vm, chosen[vm.name]) for vm in leaving if vm.name in chosen)
    order = {vm.name: i for i, vm in enumerate(leaving)}
    return Placement(moves, tuple(sorted(refused, key=lambda r: order[r[0]])))


def _most_free_fit(
    vm: Vm, heap: list[tuple[int, HostName]], room: Room
) -> tuple[HostName | None, str]:
    """Pop hosts, most free memory first, until one fits ``vm``; take its room there and put
    every popped host back. Returns the host (None if none fits) and why none fits."""
    popped: list[HostName] = []
    found: HostName | None = None
    reason = "no host with enough free memory"
    while heap:
        free, host = heap[0]
        if -free != room.memory[host]:  # stale entry: its room changed since it was pushed
            heapq.heapreplace(heap, (-room.memory[host], host))
            continue
        if room.memory[host] < vm.memory_bytes:
            break  # the most free host is too small: so is every other
        popped.append(heapq.heappop(heap)[1])
        why = room.why_not(vm, host)
        if why is None:
            room.take(vm, host)
            found = host
            break
        reason = why
    for host in popped:
        heapq.heappush(heap, (-room.memory[host], host))
    return found, reason


def place_by_rate(
    cluster: Cluster,
    placement: Placement,
    targets: Sequence[HostName],
    bytes_of: Callable[[Vm], float],
) -> Placement:
    """Re-place ``placement``'s moves onto ``targets`` by their links' rates.

    Largest first (by ``bytes_of``: what a VM's move sends), each VM goes to the host where
    its move would end earliest if the hosts took their moves one after another: the bytes
    already queued for that host's link plus its own, over that link's rate, and never less
    than its own bytes over the slower of its two ends. The same room applies as in
    :func:`place_evacuation` (memory, vCPUs, anti-affinity). Ties go to the host with more free
    memory. The refused VMs stay refused; if some VM finds no room this way (a packing the
    most-free rule found but this one does not), ``placement`` is returned unchanged.
    """
    room = Room(cluster, targets)
    classes: dict[int, list[tuple[float, HostName]]] = {}
    for host in targets:
        classes.setdefault(cluster.host(host).link_bps, []).append((0.0, host))
    queued: dict[HostName, float] = dict.fromkeys(targets, 0.0)
    vms = sorted((m.vm for m in placement.moves), key=lambda v: (-bytes_of(v), v.name))
    smallest = min((v.memory_bytes for v in vms), default=0)
    chosen: dict[VmName, HostName] = {}
    for vm in vms:
        data = bytes_of(vm)
        source_bps = cluster.host(vm.host).link_bps
        best: tuple[float, int, HostName] | None = None
        for rate_bps, heap in classes.items():
            fit = _least_queued_fit(vm, heap, queued, room, smallest)
            if fit is None:
                continue
            end_s = max((queued[fit] + data) / rate_bps, data / min(source_bps, rate_bps))
            if best is None or (end_s, -room.memory[fit], fit) < best:
                best = (end_s, -room.memory[fit], fit)
        if best is None:
            return placement
        host = best[2]
        room.take(vm, host)
        queued[host] += data
        heap = classes[cluster.host(host).link_bps]
        heapq.heappush(heap, (queued[host], host))
        chosen[vm.name] = host
    moves = tuple(Move(m.vm, chosen[m.vm.name]) for m in placement.moves)
    return Placement(moves, placement.refused)


def _least_queued_fit(
    vm: Vm,
    heap: list[tuple[float, HostName]],
    queued: dict[HostName, float],
    room: Room,
    smallest_bytes: int,
) -> HostName | None:
    """The least-queued host of one link rate (a heap of (queued bytes, host), entries made
    stale by later moves skipped) that has room for ``vm``; looks at :data:`_RATE_TRIES` at
    most and drops hosts too full for the smallest VM. The heap is left as found otherwise."""
    popped: list[tuple[float, HostName]] = []
    found: HostName | None = None
    while heap and len(popped) < _RATE_TRIES:
        load, host = heapq.heappop(heap)
        if load != queued[host]:
            continue  # stale: a newer entry for this host is in the heap
        if room.memory[host] < smallest_bytes:
            continue  # nothing left fits there
        popped.append((load, host))
        if room.why_not(vm, host) is None:
            found = host
            break
    for entry in popped:
        heapq.heappush(heap, entry)
    return found


@dataclass(frozen=True, slots=True)
class HostVerdict:
    """One candidate host of a new VM: its room before the VM, and why it cannot take it.

    Attributes:
        host: the host.
        free_memory_bytes: memory not used by its VMs.
        free_vcpus: vCPUs not used by its VMs.
        why_not: None when the VM fits there, else the reason.
    """

    host: HostName
    free_memory_bytes: int
    free_vcpus: int
    why_not: str | None


@dataclass(frozen=True, slots=True)
class NewPlacement:
    """Where a new VM goes, and how every host was judged.

    Attributes:
        host: the chosen host, None when none fits.
        verdicts: every host considered, the chosen one first, then by free memory.
    """

    host: HostName | None
    verdicts: tuple[HostVerdict, ...]

    @property
    def reason(self) -> str:
        """Why the host was chosen, or why none was."""
        if self.host is not None:
            chosen = self.verdicts[0]
            fitting = sum(1 for v in self.verdicts if v.why_not is None)
            return (
                f"the most free memory ({chosen.free_memory_bytes >> 20} MiB, "
                f"{chosen.free_vcpus} vCPUs) of the {fitting} host(s) it fits"
            )
        if not self.verdicts:
            return "no host to place it on"
        biggest = self.verdicts[0]
        return (
            f"no host has room: the most free is {biggest.host} with "
            f"{biggest.free_memory_bytes >> 20} MiB and {biggest.free_vcpus} vCPUs "
            f"({biggest.why_not})"
        )


def place_new(cluster: Cluster, vm: Vm, hosts: Sequence[str]) -> NewPlacement:
    """The host for a new VM ``vm`` among ``hosts``: the one with the most free memory among
    those with its memory and vCPUs free and no VM of its anti-affinity group.

    Args:
        cluster: the cluster now (``vm`` not in it; its ``host`` is ignored).
        vm: the new VM.
        hosts: the candidate hosts (hosts in maintenance left out by the caller).

    Raises:
        UnknownHost: a host of ``hosts`` is not in the cluster.
    """
    names = [cluster.host(h).name for h in dict.fromkeys(hosts)]
    room = Room(cluster, names)
    verdicts = [
        HostVerdict(h, room.memory[h], room.vcpus[h], _why_not_host(room.why_not(vm, h), h))
        for h in names
    ]
    verdicts.sort(key=lambda v: (v.why_not is not None, -v.free_memory_bytes, v.host))
    chosen = verdicts[0].host if verdicts and verdicts[0].why_not is None else None
    return NewPlacement(chosen, tuple(verdicts))


def _why_not_host(why: str | None, host: HostName) -> str | None:
    """Room's reasons speak of every host; a verdict speaks of one."""
    if why is None:
        return None
    if why.startswith("no host with"):
        return f"{host} has not enough free " + why.rsplit("enough free ", 1)[1]
    return f"{host} already runs a VM of the same group"


def place_onto(cluster: Cluster, vms: Sequence[Vm], host: str) -> Placement:
    """Moves of ``vms`` (running elsewhere) onto ``host``, as many as its room takes (largest
    first), the others refused with why.

    Raises:
        UnknownHost: ``host`` is not in the cluster.
    """
    target = cluster.host(host).name
    room = Room(cluster, [target])
    taken: set[VmName] = set()
    refused: list[tuple[VmName, str]] = []
    for vm in sorted(vms, key=lambda v: (-v.memory_bytes, v.name)):
        if vm.host == target:
            continue
        why = room.why_not(vm, target)
        if why is None:
            room.take(vm, target)
            taken.add(vm.name)
        else:
            refused.append((vm.name, _why_not_host(why, target) or why))
    moves = tuple(Move(vm, target) for vm in vms if vm.name in taken)
    return Placement(moves, tuple(refused))


def host_load(host: Host, room: Room) -> float:
    """The larger of a host's memory and vCPU shares in use."""
    memory = 1.0 - room.memory[host.name] / host.memory_bytes
    vcpus = 1.0 - room.vcpus[host.name] / host.vcpus
    return max(memory, vcpus)


def plan_balance(
    cluster: Cluster,
    *,
    max_moves: int,
    cost_s: Callable[[Vm, Host], float],
    spread: float = 0.10,
    cooldown: Collection[str] = (),
) -> Placement:
    """Moves that bring the most and least loaded hosts within ``spread`` of each other.

    Args:
        cluster: the cluster now.
        max_moves: at most this many moves.
        cost_s: predicted seconds to move a VM to a host (weighs which VM to move).
        spread: the load difference (0..1) the plan aims under.
        cooldown: VMs moved recently: not moved again.

    Returns:
        The moves, in the order they were chosen.

    Raises:
        ConfigError: a negative ``max_moves`` or a spread outside 0..1.
    """
    if max_moves < 0 or not 0.0 <= spread < 1.0:
        raise ConfigError("max_moves must be >= 0 and spread within 0..1")
    names = [h.name for h in cluster.hosts]
    room = Room(cluster, names)
    on = {h: list(cluster.vms_on(h)) for h in names}
    frozen = {VmName(v) for v in cooldown}
    hot = [(-host_load(h, room), h.name) for h in cluster.hosts]
    cool = [(-load, name) for load, name in hot]
    heapq.heapify(hot)
    heapq.heapify(cool)
    moves: list[Move] = []
    stuck: set[HostName] = set()
    while len(moves) < max_moves:
        top = _fresh(hot, cluster, room, sign=-1.0, skip=stuck)
        bottom = _fresh(cool, cluster, room, sign=1.0, skip=set())
        if top is None or bottom is None or top[0] - bottom[0] <= spread:
            break
        (hot_load, source), (cool_load, target) = top, bottom
        hosts = (cluster.host(source), cluster.host(target))
        vm = _pick(on[source], hosts, room, (hot_load, cool_load), cost_s, frozen)
        if vm is None:
            stuck.add(source)
            continue
        room.give_back(vm, source)
        room.take(vm, target)
        on[source].remove(vm)
        on[target].append(vm)
        frozen.add(vm.name)
        moves.append(Move(vm, target))
        for heap, sign in ((hot, -1.0), (cool, 1.0)):
            for name in (source, target):
                heapq.heappush(heap, (sign * host_load(cluster.host(name), room), name))
    return Placement(tuple(moves))


def _fresh(
    heap: list[tuple[float, HostName]],
    cluster: Cluster,
    room: Room,
    *,
    sign: float,
    skip: set[HostName],
) -> tuple[float, HostName] | None:
    """The top of a load heap (max with ``sign`` -1, min with +1), skipping stale entries."""
    while heap:
        key, name = heap[0]
        load = host_load(cluster.host(name), room)
        if name in skip or abs(key - sign * load) > 1e-12:
            heapq.heappop(heap)
            if name not in skip:
                heapq.heappush(heap, (sign * load, name))
            continue
        return load, name
    return None


def _pick(
    candidates: Sequence[Vm],
    hosts: tuple[Host, Host],
    room: Room,
    loads: tuple[float, float],
    cost_s: Callable[[Vm, Host], float],
    frozen: set[VmName],
) -> Vm | None:
    """The VM of the hot host that fits the cool host, leaves it no more loaded than the hot
    one is then, and relieves most per predicted second among the few whose move comes
    closest to evening the two out."""
    (source, target), (hot_load, cool_load) = hosts, loads
    even = (hot_load - cool_load) / 2.0
    fitting: list[tuple[float, float, Vm]] = []
    for vm in candidates:
        if vm.name in frozen or room.why_not(vm, target.name) is not None:
            continue
        relief = max(vm.memory_bytes / source.memory_bytes, vm.vcpus / source.vcpus)
        added = max(vm.memory_bytes / target.memory_bytes, vm.vcpus / target.vcpus)
        if cool_load + added > hot_load - relief:
            continue  # the cool host would become the hot spot: the next plan moves it back
        fitting.append((abs(relief - even), relief, vm))
    fitting.sort(key=lambda item: (item[0], item[2].name))
    scored = [(cost_s(vm, target) / relief, vm.name, vm) for _, relief, vm in fitting[:_WEIGHED]]
    return min(scored, key=lambda item: item[:2])[2] if scored else None
