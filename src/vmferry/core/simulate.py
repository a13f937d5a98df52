"""The simulator: scheduling policies compared on a modelled cluster, where no lab reaches.

:func:`model_cluster` draws a cluster from a seeded distribution (below); :func:`simulate`
plans a bulk operation on it (the evacuation of some hosts, or a balance) with each policy,
then runs the plan's moves through the model of pre-copy (and multifd) of
:mod:`vmferry.core.precopy_flow` (the same model for every policy) and reports per policy the
makespan, the downtime the guests felt, the moves that missed their goal, the bytes moved and
the planning time, with two lower bounds no schedule beats: one for the raw non-zero pages
(:func:`lower_bound_s`), one for pages compressed as well as each VM's allow
(:func:`compressed_bound_s`). Every policy moves the same VMs to the same destinations; only
the order, the concurrency, the bandwidth caps and the strategy of each move (plain pre-copy
for the peers' policies) differ.

The modelled cluster (assumptions, not measurements):

* hosts: 384 GiB and 256 vCPUs each (64 cores, 4:1 overcommit); a migration link of 10 GbE
  (60 %) or 25 GbE (40 %); at most 8 moves out and 8 in at once (vSphere's per-host limit);
  some hosts busier than others (a log-normal weight per host, sigma 0.4).
* one migration stream carries at most 1 GB/s (one QEMU migration thread on a KVM host);
  QEMU pushes 2 GB/s while the guest is paused and scans zero pages at 8 GB/s; the other
  constants are :class:`~vmferry.core.calibration.Calibration`'s defaults.
* VMs: 1-64 GiB (mostly 2-8), 1 vCPU per 2 GiB; zero pages 10-80 %; 85 % quiet (dirty rate
  log-normal around 4 MB/s, dirty set 2-25 % of RAM) and 15 % busy (around 120 MB/s, a dirty
  set around 1 GiB); downtime goals of 150 ms (10 %), 300 ms (70 %) or 1 s (20 %); one VM in
  ten in an anti-affinity group of three.
* what the scheduler sees is what a pre-flight measured; the model runs on the truth: the
  dirty rate differs by a log-normal factor (sigma 0.25), the dirty set by one of sigma 0.1.
* compression: the zstd ratio of a VM's non-zero pages is 1.2-3.0 (uniform) as measured, and
  the truth differs by a log-normal factor (sigma 0.1, at least 1; drawn from a random stream
  of its own, so the rest of the cluster is the one drawn before compression was modelled).
  A multifd move runs :data:`MULTIFD_CHANNELS` channels at zstd level 1 (QEMU's default
  ``multifd-zstd-level``), each compressing :data:`ZSTD_CHANNEL_BPS` of memory pages on one
  server core (zstd's own benchmark gives ~500 MB/s at level 1 on a desktop core; server
  cores clock lower): 1.4 GB/s of guest memory per move (``SIM_CALIBRATION``'s
  ``multifd_compress_bps``, what the cost book plans with too). A host lends compression at
  most :data:`HOST_COMPRESS_CORES` of its 64 cores (its VMs keep running on the rest):
  :data:`HOST_COMPRESS_BPS`, shared by the multifd moves it sends at once (the model's
  :class:`~vmferry.core.precopy_flow.CompressionBudget`; the scheduler does not know it).
  Decompression (several times faster per core) is not a limit here. A multifd move's wire
  still carries at most one stream's 1 GB/s (as the predictor has it; conservative, as four
  channels could send more). vmferry's lab runs 2 channels on its own calibration.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from vmferry.core.calibration import Calibration
from vmferry.core.cluster_model import Cluster, Host, HostName, Move, Vm, VmName
from vmferry.core.errors import ConfigError
from vmferry.core.flows import FluidExecutor
from vmferry.core.job import POLICY_NAMES, ManualClock, Schedule, make_dispatcher, plan_job, run_job
from vmferry.core.move_cost import CostBook
from vmferry.core.placement import (
    Placement,
    Room,
    host_load,
    place_by_rate,
    place_evacuation,
    plan_balance,
)
from vmferry.core.precopy_flow import CompressionBudget, PrecopyFlow

__all__ = [
    "HOST_COMPRESS_BPS",
    "HOST_COMPRESS_CORES",
    "MULTIFD_CHANNELS",
    "SCENARIOS",
    "SIM_CALIBRATION",
    "ZSTD_CHANNEL_BPS",
    "ModelledCluster",
    "PolicyResult",
    "SimulationResult",
    "compressed_bound_s",
    "load_spread",
    "lower_bound_s",
    "model_cluster",
    "simulate",
]

Scenario = Literal["evacuate", "balance"]
SCENARIOS: tuple[Scenario, ...] = ("evacuate", "balance")
# Compression on the modelled servers (assumptions, see the module docs).
ZSTD_CHANNEL_BPS = 350_000_000
MULTIFD_CHANNELS = 4
HOST_COMPRESS_CORES = 16
HOST_COMPRESS_BPS = HOST_COMPRESS_CORES * ZSTD_CHANNEL_BPS
SIM_CALIBRATION = Calibration(
    qemu_throughput_bps=1_000_000_000,
    paused_throughput_bps=2_000_000_000,
    zero_scan_bps=8_000_000_000,
    multifd_compress_bps=MULTIFD_CHANNELS * ZSTD_CHANNEL_BPS,
    # Bare-metal KVM servers: a first touch is a plain page fault, not this nested host's
    # shadow-paging walk that grows with the guest (core.predict_touch); not modelled.
    touch_ms_per_gib2=0.0,
)
GIB = 1 << 30
_HOST_MEMORY = 384 * GIB
_HOST_VCPUS = 256
_LINKS = ((1_250_000_000, 0.6), (3_125_000_000, 0.4))
_SIZES_GIB = ((1, 0.15), (2, 0.2), (4, 0.25), (8, 0.2), (16, 0.12), (32, 0.06), (64, 0.02))
_GOALS_MS = ((150, 0.1), (300, 0.7), (1000, 0.2))
_BUSY_SHARE = 0.15
_GROUPED_SHARE = 0.1
_MAX_RATE_BPS = 2_000_000_000
_PLACE_TRIES = 30
_RATIO_RANGE = (1.2, 3.0)
_RATIO_NOISE = 0.1
# Labels of a move rescued from a stall: a pre-copy switched to post-copy, a multifd move
# cancelled and moved again as hybrid.
_RESCUES = ("precopy+postcopy", "multifd+hybrid")


@dataclass(frozen=True, slots=True)
class ModelledCluster:
    """A drawn cluster: what the scheduler sees, and the truth the model runs on."""

    cluster: Cluster
    truth: dict[VmName, Vm]


def model_cluster(hosts: int, vms: int, *, seed: int) -> ModelledCluster:
    """Draw a cluster of ``hosts`` hosts and ``vms`` VMs (see the module docs).

    Raises:
        ConfigError: fewer than 2 hosts, a negative VM count, or VMs that do not fit.
    """
    if hosts < 2 or vms < 0:
        raise ConfigError("a simulated cluster needs at least 2 hosts and 0 or more VMs")
    rng = random.Random(seed)
    zstd_rng = random.Random(f"zstd-{seed}")  # its own stream: see the module docs
    host_list = [
        Host(HostName(f"host-{i + 1}"), _HOST_MEMORY, _HOST_VCPUS, _pick(rng, _LINKS))
        for i in range(hosts)
    ]
    weights = [rng.lognormvariate(0.0, 0.4) for _ in host_list]
    cumulative = list(_accumulate(weights))
    free_memory = [h.memory_bytes for h in host_list]
    free_vcpus = [h.vcpus for h in host_list]
    groups: list[set[str]] = [set() for _ in host_list]
    seen, truth = [], {}
    group_index = 0
    for i in range(vms):
        group = None
        if rng.random() < _GROUPED_SHARE:
            group, group_index = f"ha-{group_index // 3}", group_index + 1
        vm = _draw_vm(rng, VmName(f"vm-{i + 1}"), group)
        at = _place(rng, vm, cumulative, (free_memory, free_vcpus, groups))
        vm = replace(vm, host=host_list[at].name)
        free_memory[at] -= vm.memory_bytes
        free_vcpus[at] -= vm.vcpus
        if group is not None:
            groups[at].add(group)
        seen.append(vm)
        truth[vm.name] = _true(rng, vm)
        ratio = vm.compress_ratio * zstd_rng.lognormvariate(0.0, _RATIO_NOISE)
        truth[vm.name] = replace(truth[vm.name], compress_ratio=max(1.0, ratio))
    return ModelledCluster(Cluster.build(host_list, seen), truth)


def _pick(rng: random.Random, table: Sequence[tuple[int, float]]) -> int:
    return rng.choices([value for value, _ in table], [weight for _, weight in table])[0]


def _accumulate(values: Sequence[float]) -> list[float]:
    total, out = 0.0, []
    for value in values:
        total += value
        out.append(total)
    return out


def _draw_vm(rng: random.Random, name: VmName, group: str | None) -> Vm:
    size = _pick(rng, _SIZES_GIB) * GIB
    if rng.random() < _BUSY_SHARE:
        rate = rng.lognormvariate(math.log(120e6), 0.7)
        dirty_set = min(size, round(rng.lognormvariate(math.log(GIB), 0.8)))
    else:
        rate = rng.lognormvariate(math.log(4e6), 1.2)
        dirty_set = round(size * rng.uniform(0.02, 0.25))
    return Vm(
        name,
        HostName("unplaced"),
        size,
        vcpus=max(1, size // (2 * GIB)),
        dirty_rate_bps=min(_MAX_RATE_BPS, round(rate)),
        dirty_set_bytes=dirty_set,
        zero_fraction=rng.uniform(0.1, 0.8),
        compress_ratio=rng.uniform(*_RATIO_RANGE),
        max_downtime_ms=_pick(rng, _GOALS_MS),
        group=group,
    )


def _place(
    rng: random.Random,
    vm: Vm,
    cumulative: list[float],
    room: tuple[list[int], list[int], list[set[str]]],
) -> int:
    """A host for a new VM, drawn by the hosts' weights among those with room."""
    memory, vcpus, groups = room

    def fits(at: int) -> bool:
        return (
            memory[at] >= vm.memory_bytes and vcpus[at] >= vm.vcpus and vm.group not in groups[at]
        )

    for _ in range(_PLACE_TRIES):
        at = rng.choices(range(len(cumulative)), cum_weights=cumulative)[0]
        if fits(at):
            return at
    for at in sorted(range(len(memory)), key=lambda i: -memory[i]):
        if fits(at):
            return at
    raise ConfigError(f"{vm.name} does not fit anywhere: too many VMs for the hosts")


def _true(rng: random.Random, vm: Vm) -> Vm:
    """The VM as it really behaves: its measured dirty rate and set, off by some noise."""
    rate = min(_MAX_RATE_BPS, round(vm.dirty_rate_bps * rng.lognormvariate(0.0, 0.25)))
    dirty_set = vm.memory_bytes if vm.dirty_set_bytes is None else vm.dirty_set_bytes
    dirty_set = min(vm.memory_bytes, round(dirty_set * rng.lognormvariate(0.0, 0.1)))
    return replace(vm, dirty_rate_bps=rate, dirty_set_bytes=dirty_set)


@dataclass(frozen=True, slots=True)
class PolicyResult:
    """One policy's plan and its simulated run.

    Attributes:
        policy: its name.
        planning_s: placing and planning the moves (on the caller's timer).
        predicted_makespan_s: the plan's ETA for the whole job.
        makespan_s: the simulated job's length.
        downtime_sum_ms: the guests' felt downtime, summed.
        missed: moves whose guest felt more than its goal.
        rescued: moves that stalled: pre-copies switched to post-copy, multifd moves
            cancelled and moved again as hybrid.
        transferred_bytes: bytes moved (on the wire: compressed for multifd).
        run: the simulated schedule.
    """

    policy: str
    planning_s: float
    predicted_makespan_s: float
    makespan_s: float
    downtime_sum_ms: int
    missed: int
    rescued: int
    transferred_bytes: int
    run: Schedule

    @property
    def ran_as(self) -> dict[str, int]:
        """How many moves ran as what (``precopy``, ``multifd``, ``hybrid``, rescues)."""
        counts: dict[str, int] = {}
        for record in self.run.records:
            counts[record.ran_as] = counts.get(record.ran_as, 0) + 1
        return dict(sorted(counts.items()))

    def to_json(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "planning_s": round(self.planning_s, 3),
            "predicted_makespan_s": round(self.predicted_makespan_s, 1),
            "makespan_s": round(self.makespan_s, 1),
            "downtime_sum_ms": self.downtime_sum_ms,
            "missed": self.missed,
            "rescued": self.rescued,
            "transferred_bytes": self.transferred_bytes,
            "ran_as": self.ran_as,
        }


@dataclass(frozen=True, slots=True)
class SimulationResult:
    """Every policy's result on one modelled cluster and operation.

    ``lower_bound_s`` is no schedule's of the raw non-zero pages (:func:`lower_bound_s`),
    ``compressed_bound_s`` no schedule's at all, compressing as well as the VMs and the hosts'
    CPU allow (:func:`compressed_bound_s`)."""

    hosts: int
    vms: int
    seed: int
    scenario: Scenario
    sources: tuple[HostName, ...]
    moves: int
    refused: int
    placement_s: float
    lower_bound_s: float
    compressed_bound_s: float
    results: tuple[PolicyResult, ...]
    spread: tuple[float, float] = (0.0, 0.0)  # host load spread before and after the moves

    def best_fixed(self, *, choice: bool = False) -> PolicyResult | None:
        """The fixed-concurrency baseline with the shortest simulated makespan: of those run
        as the peers run them (plain pre-copy), or with ``choice`` of those given vmferry's
        per-move strategy choice (``fixed-N+choice``)."""
        fixed = [
            r
            for r in self.results
            if r.policy.startswith("fixed-") and r.policy.endswith("+choice") == choice
        ]
        return min(fixed, key=lambda r: r.makespan_s, default=None)

    def to_json(self) -> dict[str, Any]:
        best, best_choice = self.best_fixed(), self.best_fixed(choice=True)
        rows = []
        for result in self.results:
            row = result.to_json()
            for key, other in (
                ("makespan_vs_best_fixed", best),
                ("makespan_vs_best_fixed_choice", best_choice),
            ):
                if other is not None and other.makespan_s > 0:
                    row[key] = round(result.makespan_s / other.makespan_s, 3)
            rows.append(row)
        return {
            "hosts": self.hosts,
            "vms": self.vms,
            "seed": self.seed,
            "scenario": self.scenario,
            "sources": len(self.sources),
            "moves": self.moves,
            "refused": self.refused,
            "placement_s": round(self.placement_s, 3),
            "lower_bound_s": round(self.lower_bound_s, 1),
            "lower_bound_compressed_s": round(self.compressed_bound_s, 1),
            "load_spread_before": round(self.spread[0], 3),
            "load_spread_after": round(self.spread[1], 3),
            "best_fixed": None if best is None else best.policy,
            "best_fixed_choice": None if best_choice is None else best_choice.policy,
            "policies": rows,
        }


def simulate(
    hosts: int,
    vms: int,
    *,
    seed: int,
    timer: Callable[[], float],
    policies: Sequence[str] = POLICY_NAMES,
    scenario: Scenario = "evacuate",
    evacuate: int | None = None,
    max_moves: int | None = None,
    cal: Calibration = SIM_CALIBRATION,
    host_compress_bps: float = HOST_COMPRESS_BPS,
) -> SimulationResult:
    """Plan and simulate one operation on a modelled cluster with each policy.

    Args:
        hosts, vms, seed: the modelled cluster (:func:`model_cluster`).
        timer: seconds from a monotonic clock (the caller's: the core reads no clock).
        policies: names from :data:`vmferry.core.job.POLICY_NAMES`.
        scenario: evacuate hosts, or balance the cluster.
        evacuate: how many hosts to evacuate (default: 1 in 20, at least 1).
        max_moves: the most moves a balance plans (default: one per host).
        cal: the machine constants of the model and of the predictor.
        host_compress_bps: what a source host compresses at most, all its moves together.

    Raises:
        ConfigError: bad sizes, an unknown policy or scenario.
    """
    unknown = [p for p in policies if p not in POLICY_NAMES]
    if unknown or scenario not in SCENARIOS:
        raise ConfigError(f"unknown policy or scenario: {', '.join(unknown) or scenario}")
    modelled = model_cluster(hosts, vms, seed=seed)
    cluster, book = modelled.cluster, CostBook(cal)
    began = timer()
    sources, placement = _operation(
        cluster, book, scenario, evacuate=evacuate, max_moves=max_moves, seed=seed
    )
    placement_s = timer() - began
    results = []
    for policy in policies:
        began = timer()
        moves = _policy_moves(cluster, book, policy, sources, placement)
        plan = plan_job(cluster, moves, book=book, policy=policy)
        planning_s = placement_s + timer() - began
        budget = CompressionBudget(host_compress_bps)
        run = _run(cluster, modelled.truth, moves, policy, (book, budget))
        results.append(
            PolicyResult(
                policy,
                planning_s,
                plan.makespan_s,
                run.makespan_s,
                run.downtime_sum_ms,
                run.missed,
                sum(1 for r in run.records if r.ran_as in _RESCUES),
                run.transferred_bytes,
                run,
            )
        )
    return SimulationResult(
        hosts,
        vms,
        seed,
        scenario,
        sources,
        len(placement.moves),
        len(placement.refused),
        placement_s,
        lower_bound_s(cluster, placement.moves, book),
        compressed_bound_s(cluster, placement.moves, modelled.truth, book, host_compress_bps),
        tuple(results),
        (load_spread(cluster), load_spread(cluster.after(placement.moves))),
    )


def load_spread(cluster: Cluster) -> float:
    """The difference between the most and the least loaded hosts' loads (0..1)."""
    room = Room(cluster, [h.name for h in cluster.hosts])
    loads = [host_load(h, room) for h in cluster.hosts]
    return max(loads) - min(loads)


def lower_bound_s(cluster: Cluster, moves: Sequence[Move], book: CostBook) -> float:
    """No schedule of ``moves`` ends sooner: every link must carry the non-zero pages of the
    moves through it, and every move must set up, then send its pages at one stream's rate at
    most (re-sent pages not counted)."""
    stream = book.cal.qemu_throughput_bps
    through: dict[tuple[str, HostName], float] = {}
    bound = 0.0
    for move in moves:
        vm = move.vm
        data = vm.memory_bytes * (1.0 - vm.zero_fraction)
        links = (cluster.host(move.source).link_bps, cluster.host(move.destination).link_bps)
        bound = max(bound, book.setup_s(vm) + data / min(stream, *links))
        for link in (("out", move.source), ("in", move.destination)):
            through[link] = through.get(link, 0.0) + data
    for (_, host), data in through.items():
        bound = max(bound, data / cluster.host(host).link_bps)
    return bound


def compressed_bound_s(
    cluster: Cluster,
    moves: Sequence[Move],
    truth: Mapping[VmName, Vm],
    book: CostBook,
    host_compress_bps: float,
) -> float:
    """No schedule of ``moves`` ends sooner, whatever each move runs as: a move sets up, then
    sends its non-zero pages no faster than the better of a stream (pre-copy) and multifd
    (a stream's wire times its true zstd ratio, at most one move's zstd and its host's);
    a destination's link carries at least each page compressed by its true ratio; a source's
    link carries the pages its host's CPU has no time to compress raw (:func:`_source_s`).
    Re-sent pages are not counted."""
    cal = book.cal
    sent: dict[HostName, list[tuple[float, float]]] = {}
    into: dict[HostName, float] = {}
    bound = 0.0
    for move in moves:
        vm = truth.get(move.name, move.vm)
        ratio = max(1.0, vm.compress_ratio)
        data = vm.memory_bytes * (1.0 - vm.zero_fraction)
        links = (cluster.host(move.source).link_bps, cluster.host(move.destination).link_bps)
        wire = min(cal.qemu_throughput_bps, *links)
        zstd = min(wire * ratio, cal.multifd_compress_bps, host_compress_bps)
        bound = max(bound, book.setup_s(vm) + data / max(wire, zstd))
        sent.setdefault(move.source, []).append((data, ratio))
        into[move.destination] = into.get(move.destination, 0.0) + data / ratio
    for host, data in into.items():
        bound = max(bound, data / cluster.host(host).link_bps)
    for host, pages in sent.items():
        bound = max(bound, _source_s(cluster.host(host).link_bps, host_compress_bps, pages))
    return bound


def _source_s(link_bps: float, cpu_bps: float, pages: Sequence[tuple[float, float]]) -> float:
    """The least time a source needs to send ``pages`` ((non-zero bytes, zstd ratio) per
    move) over its link when its CPU compresses at most ``cpu_bps``: compressing a byte of
    ratio ``c`` saves ``1 - 1/c`` of the link and costs a byte of the CPU's time, so the best
    ratios are compressed first, until the link's time and the CPU's meet."""
    wire, cpu = sum(data for data, _ in pages), 0.0
    for data, ratio in sorted(pages, key=lambda page: -page[1]):
        saving = 1.0 - 1.0 / ratio
        slope = saving / link_bps + 1.0 / cpu_bps
        if slope <= 0.0:
            break
        # Compressing ``more`` bytes of it: the link's time falls, the CPU's grows.
        more = (wire / link_bps - cpu / cpu_bps) / slope
        if more <= data:
            return (cpu + max(0.0, more)) / cpu_bps
        wire -= saving * data
        cpu += data
    return max(wire / link_bps, cpu / cpu_bps)


def _operation(
    cluster: Cluster,
    book: CostBook,
    scenario: Scenario,
    *,
    evacuate: int | None,
    max_moves: int | None,
    seed: int,
) -> tuple[tuple[HostName, ...], Placement]:
    """The moves of the operation: an evacuation's, or a balance plan's."""
    if scenario == "balance":
        stream = book.cal.qemu_throughput_bps

        def cost_s(vm: Vm, host: Host) -> float:
            return book.cost(vm, min(stream, host.link_bps)).total_s

        placement = plan_balance(cluster, max_moves=max_moves or len(cluster.hosts), cost_s=cost_s)
        return (), placement
    count = max(1, len(cluster.hosts) // 20) if evacuate is None else evacuate
    if not 1 <= count < len(cluster.hosts):
        raise ConfigError(f"evacuate 1 to {len(cluster.hosts) - 1} hosts, not {count}")
    rng = random.Random(seed + 1)
    chosen = sorted(rng.sample(range(len(cluster.hosts)), count))
    sources = tuple(cluster.hosts[i].name for i in chosen)
    return sources, place_evacuation(cluster, sources)


def _policy_moves(
    cluster: Cluster,
    book: CostBook,
    policy: str,
    sources: Sequence[HostName],
    placement: Placement,
) -> tuple[Move, ...]:
    """The moves ``policy`` runs: ours re-places an evacuation's by the links' rates (as
    ``vmferry host evacuate`` does); the fixed-concurrency baselines keep the most-free
    placement their peers use."""
    if policy != "ours" or not sources:
        return placement.moves
    stream = book.cal.qemu_throughput_bps
    targets = [h.name for h in cluster.hosts if h.name not in set(sources)]

    def bytes_of(vm: Vm) -> float:
        return float(book.choose(vm, min(stream, cluster.host(vm.host).link_bps)).transferred_bytes)

    return place_by_rate(cluster, placement, targets, bytes_of).moves


def _run(
    cluster: Cluster,
    truth: dict[VmName, Vm],
    moves: Sequence[Move],
    policy: str,
    costs: tuple[CostBook, CompressionBudget],
) -> Schedule:
    """The moves under ``policy``, each as the model of pre-copy says it runs (multifd moves
    sharing their source's CPU for compression, ``costs[1]``)."""
    book, budget = costs
    cal = book.cal
    executor = FluidExecutor(
        {h.name: float(h.link_bps) for h in cluster.hosts},
        lambda start, now_s: PrecopyFlow(start, now_s, truth[start.move.name], cal, budget),
    )
    return run_job(make_dispatcher(policy, cluster, moves, book), executor, ManualClock())
