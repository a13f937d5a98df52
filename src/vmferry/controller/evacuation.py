"""Planning a job of many real moves: emptying a host (``host evacuate``, ``host maintenance
enter``) or bringing its VMs back (``maintenance exit --bring-back``).

Destinations come from :mod:`vmferry.core.placement` on the cluster the agents report now;
each move is then planned as ``vmferry plan`` plans one (the agents' rolling profiles of the
guest and of the path, measured now where stale), and a VM whose goal no strategy meets is
refused with the reason. The measured VMs and links make the core's cluster, on which
:func:`vmferry.core.job.plan_job` predicts the schedule (order, concurrency, bandwidth caps,
makespan) of :class:`~vmferry.core.schedule.BandwidthDispatcher`. Nothing moves here;
:mod:`vmferry.controller.job_runner` runs the plan.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from vmferry.controller.cluster import Cluster
from vmferry.controller.history import History
from vmferry.controller.placing import LiveCluster
from vmferry.controller.plan import PATH_FRESH_S, Plan, calibration_from, make_plan, probe_path
from vmferry.core import cluster_model as cm
from vmferry.core.cluster_model import PlacementError, UnknownHost
from vmferry.core.errors import ConfigError, FerryError
from vmferry.core.job import POLICY_NAMES, Schedule, plan_job
from vmferry.core.move_cost import CostBook
from vmferry.core.placement import Placement, place_by_rate, place_evacuation, place_onto
from vmferry.core.strategy import Goal

__all__ = [
    "MAX_MOVES_PER_HOST",
    "JobPlan",
    "JobRequest",
    "plan_bring_back",
    "plan_evacuation",
    "plan_placed",
    "probe_paths",
]

logger = logging.getLogger(__name__)

# The most a --max-outbound/--max-inbound may ask for.
MAX_MOVES_PER_HOST = 1000


# An evacuation with this many destinations or fewer probes the path to each of them, so
# ours can place by the links' rates (:func:`place_by_rate`); with more, the paths the
# most-free placement uses are probed (one probe each, one at a time).
_PROBE_ALL_MAX = 8
# Links whose fastest is less than this many times the slowest count as alike.
_RATES_DIFFER = 1.2


@dataclass(frozen=True, slots=True)
class JobRequest:
    """What the user asked of a job.

    Attributes:
        host: the host emptied (or, bringing VMs back, the host they go back to).
        to: the only destinations allowed (None: every host that takes VMs).
        deadline_s: the whole job must be predicted to end within this.
        bandwidth_mbps: each move's cap (megabits/s).
        max_downtime_ms: each VM's downtime goal (what the guest feels).
        max_outbound: moves each host sends at once, at most (None: the scheduler's default).
        max_inbound: moves each host receives at once, at most (None: the default).
        policy: the scheduling policy, ``ours`` or a fixed-concurrency baseline of
            :data:`vmferry.core.job.POLICY_NAMES` (benches compare them on real moves).
    """

    host: str
    to: tuple[str, ...] | None = None
    deadline_s: float | None = None
    bandwidth_mbps: int | None = None
    max_downtime_ms: int = 300
    max_outbound: int | None = None
    max_inbound: int | None = None
    policy: str = "ours"

    def check(self) -> None:
        """Raises: ConfigError: numbers out of range."""
        if self.deadline_s is not None and not 0 < self.deadline_s <= 86_400:
            raise ConfigError("--deadline must be in (0, 86400] seconds")
        if self.bandwidth_mbps is not None and not 1 <= self.bandwidth_mbps <= 1_000_000:
            raise ConfigError("--bandwidth must be 1..1000000 Mbit/s")
        if not 1 <= self.max_downtime_ms <= 600_000:
            raise ConfigError("--max-downtime must be 1..600000 ms")
        for flag, limit in (
            ("--max-outbound", self.max_outbound),
            ("--max-inbound", self.max_inbound),
        ):
            if limit is not None and not 1 <= limit <= MAX_MOVES_PER_HOST:
                raise ConfigError(
                    f"{flag} must be a positive integer (1..{MAX_MOVES_PER_HOST} moves at once), "
                    f"not {limit}"
                )
        if self.policy not in POLICY_NAMES:
            raise ConfigError(f"unknown policy {self.policy!r}: use {', '.join(POLICY_NAMES)}")

    def limits(self, host: cm.Host) -> cm.Host:
        """``host`` with the per-host move limits asked for."""
        return replace(
            host,
            max_outbound=host.max_outbound if self.max_outbound is None else self.max_outbound,
            max_inbound=host.max_inbound if self.max_inbound is None else self.max_inbound,
        )

    @property
    def cap_bps(self) -> int | None:
        return None if self.bandwidth_mbps is None else self.bandwidth_mbps * 125_000

    def to_json(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "to": None if self.to is None else list(self.to),
            "deadline_s": self.deadline_s,
            "bandwidth_mbps": self.bandwidth_mbps,
            "max_downtime_ms": self.max_downtime_ms,
            "max_outbound": self.max_outbound,
            "max_inbound": self.max_inbound,
            "policy": self.policy,
        }

    @classmethod
    def from_json(cls, host: str, data: Mapping[str, Any] | None) -> JobRequest:
        """The request a job recorded (:meth:`to_json`; None: a job recorded before requests
        were, taken with the defaults)."""
        if data is None:
            return cls(host)
        to = data.get("to")
        return cls(
            host=host,
            to=None if to is None else tuple(str(h) for h in to),
            deadline_s=data.get("deadline_s"),
            bandwidth_mbps=data.get("bandwidth_mbps"),
            max_downtime_ms=int(data.get("max_downtime_ms", 300)),
            max_outbound=data.get("max_outbound"),
            max_inbound=data.get("max_inbound"),
            policy=str(data.get("policy", "ours")),
        )


@dataclass(frozen=True, slots=True)
class JobPlan:
    """A planned job.

    Attributes:
        kind: ``evacuate``, ``maintenance-enter`` or ``bring-back``.
        host: the host it is about.
        request: what was asked.
        model: the cluster with the moving VMs as measured and the links' rates.
        moves: the moves (their VMs as measured).
        refused: (VM, why) for each VM that cannot move: the job does not start with any.
        schedule: the predicted schedule (None when VMs were refused).
        book: the predictions the schedule was made with.
        plans: each move's plan (as ``vmferry plan`` shows it).
    """

    kind: str
    host: str
    request: JobRequest
    model: cm.Cluster
    moves: tuple[cm.Move, ...]
    refused: tuple[tuple[str, str], ...]
    schedule: Schedule | None
    book: CostBook
    plans: Mapping[str, Plan]

    def require_movable(self) -> Schedule:
        """The schedule, if every VM can move.

        Raises:
            PlacementError: naming every VM that cannot, with why (nothing moved).
        """
        if self.refused or self.schedule is None:
            named = "; ".join(f"{vm}: {why}" for vm, why in self.refused)
            raise PlacementError(
                f"{len(self.refused)} VM(s) of {self.host} cannot move, so none does: {named}",
                dict(self.refused),
            )
        return self.schedule

    def strategy_of(self, vm: str) -> str:
        """What ``vm``'s move runs as: the schedule's (the scheduler chooses each move's
        strategy, e.g. multifd where its pages compress), else its own plan's choice."""
        for record in () if self.schedule is None else self.schedule.records:
            if record.move.name == vm:
                return record.ran_as
        return self.plans[vm].choice.strategy

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "host": self.host,
            "policy": self.request.policy,
            "request": self.request.to_json(),
            "moves": [
                {
                    "vm": m.name,
                    "source": m.source,
                    "destination": m.destination,
                    "strategy": self.strategy_of(m.name),
                    "dirty_rate_bps": m.vm.dirty_rate_bps,
                    "memory_bytes": m.vm.memory_bytes,
                }
                for m in self.moves
            ],
            "refused": [{"vm": vm, "reason": why} for vm, why in self.refused],
            "limits": {
                "max_outbound": self.request.max_outbound,
                "max_inbound": self.request.max_inbound,
            },
            "predicted": None if self.schedule is None else self.schedule.to_json(),
        }


def _targets(live: LiveCluster, request: JobRequest) -> list[str]:
    """The hosts VMs may go to.

    Raises:
        ConfigError: a ``--to`` host unknown, unreachable, in maintenance or the host itself.
        PlacementError: no host is left (the only host, every other one in maintenance).
    """
    host = request.host
    if request.to is not None:
        for name in request.to:
            if name == host:
                raise ConfigError(f"--to {name}: the host being emptied")
            if name in live.unreachable:
                raise ConfigError(f"--to {name}: its agent does not answer")
            live.model.host(name)
            if name in live.marks:
                raise ConfigError(f"--to {name}: it is {live.marks[name].describe}")
        return list(dict.fromkeys(request.to))
    targets = [h for h in live.open_hosts() if h != host]
    if not targets:
        others = [h.name for h in live.model.hosts if h.name != host]
        if not others and not live.unreachable:
            raise PlacementError(f"cannot empty {host}: it is the only host")
        why = [f"{h} in maintenance" for h in others] + [
            f"{h} unreachable" for h in live.unreachable
        ]
        raise PlacementError(f"cannot empty {host}: no other host takes VMs ({', '.join(why)})")
    return targets


def _check_host(live: LiveCluster, host: str) -> None:
    """Raises: UnknownHost, FerryError (its agent does not answer)."""
    if host in live.unreachable:
        raise FerryError(f"{host}'s agent does not answer: its VMs cannot be moved")
    if host not in live.hosts:
        raise UnknownHost(host)


async def plan_evacuation(
    cluster: Cluster,
    live: LiveCluster,
    request: JobRequest,
    history: History | None,
    *,
    kind: str = "evacuate",
) -> JobPlan:
    """Plan emptying ``request.host``.

    Raises:
        UnknownHost, ConfigError, PlacementError: see :func:`_targets`.
        DeadlineUnreachable: the schedule is predicted to end after ``request.deadline_s``.
        FerryError: the host's agent does not answer.
    """
    request.check()
    _check_host(live, request.host)
    targets = _targets(live, request)
    placement = place_evacuation(live.model, [request.host], to=targets)
    busy = [
        (v.name, f"it is {v.state} (a migration is in flight)")
        for v in live.vms_on(request.host)
        if v.state != "running"
    ]
    by_rate = request.policy == "ours" and 1 < len(targets) <= _PROBE_ALL_MAX
    moving = [v.name for v in live.vms_on(request.host)]
    if by_rate and moving:
        await probe_paths(cluster, [(request.host, t, moving[0]) for t in targets])
    first = await _planned(cluster, live, request, history, kind, placement, busy)
    if not by_rate or first.schedule is None:
        return first
    return await _replaced_by_rate(cluster, live, history, first, targets, busy)


async def _replaced_by_rate(
    cluster: Cluster,
    live: LiveCluster,
    history: History | None,
    first: JobPlan,
    targets: Sequence[str],
    busy: Sequence[tuple[str, str]],
) -> JobPlan:
    """``first`` re-placed by the measured rates of the paths to ``targets``
    (:func:`place_by_rate`) and planned again, if that is predicted to end sooner."""
    assert first.schedule is not None
    rates = await _path_rates(cluster, first.host, [m.name for m in first.moves], targets)
    if not rates or max(rates.values()) < _RATES_DIFFER * min(rates.values()):
        return first  # links alike: the most-free placement spreads as well
    rated = cm.Cluster.build(
        [
            replace(h, link_bps=max(1, round(rates.get(h.name, h.link_bps))))
            for h in first.model.hosts
        ],
        first.model.vms,
    )
    stream = first.book.cal.qemu_throughput_bps

    def bytes_of(vm: cm.Vm) -> float:
        rate = min(stream, rated.host(vm.host).link_bps)
        return float(first.book.choose(vm, rate).transferred_bytes)

    names = [cm.HostName(t) for t in targets]
    better = place_by_rate(rated, Placement(first.moves), names, bytes_of)
    if better.moves == first.moves:
        return first
    moves = tuple(cm.Move(live.model.vm(m.name), m.destination) for m in better.moves)
    second = await _planned(
        cluster, live, first.request, history, first.kind, Placement(moves), busy
    )
    if second.schedule is None or second.schedule.makespan_s >= first.schedule.makespan_s:
        return first
    logger.info(
        "evacuation.placed_by_rate %s: predicted makespan %.1f s -> %.1f s",
        first.host, first.schedule.makespan_s, second.schedule.makespan_s,
    )  # fmt: skip
    return second


async def _path_rates(
    cluster: Cluster, source: str, vms: Sequence[str], targets: Sequence[str]
) -> dict[str, float]:
    """The measured rate of the path from ``source`` to each target (its agent's rolling
    profile; the paths were probed fresh by the first plan)."""
    if not vms:
        return {}
    agent = cluster.client(source)
    profiles = await asyncio.gather(
        *(agent.profile(vms[0], cluster.inventory.host(t).address) for t in targets)
    )
    return {
        t: p.path.bandwidth_bps
        for t, p in zip(targets, profiles, strict=True)
        if p.path is not None and p.path.bandwidth_bps > 0
    }


async def plan_bring_back(
    cluster: Cluster,
    live: LiveCluster,
    request: JobRequest,
    vms: Sequence[str],
    history: History | None,
) -> JobPlan:
    """Plan moving ``vms`` (where they run now) back onto ``request.host``; VMs gone or
    already there are left out.

    Raises:
        UnknownHost, FerryError: see :func:`plan_evacuation`.
    """
    request.check()
    _check_host(live, request.host)
    present = [live.model.vm(v) for v in vms if v in live.vms]
    away = [vm for vm in present if vm.host != request.host]
    placement = place_onto(live.model, away, request.host)
    busy = [
        (v.name, "a migration is in flight") for v in away if live.vms[v.name].state != "running"
    ]
    return await _planned(cluster, live, request, history, "bring-back", placement, busy)


async def plan_placed(
    cluster: Cluster,
    live: LiveCluster,
    request: JobRequest,
    history: History | None,
    kind: str,
    placement: Placement,
) -> JobPlan:
    """Plan the moves of ``placement`` (chosen elsewhere: a balance) as one job of ``kind``:
    each move planned, VMs whose goal no strategy meets refused, the schedule predicted.

    Raises:
        ConfigError: numbers out of range in ``request``.
    """
    request.check()
    return await _planned(cluster, live, request, history, kind, placement, ())


async def _planned(
    cluster: Cluster,
    live: LiveCluster,
    request: JobRequest,
    history: History | None,
    kind: str,
    placement: Placement,
    busy: Sequence[tuple[str, str]],
) -> JobPlan:
    """Plan each placed move, build the measured cluster and predict the schedule."""
    refused = [(str(vm), why) for vm, why in placement.refused] + list(busy)
    skipped = {vm for vm, _ in refused}
    moves = [m for m in placement.moves if m.name not in skipped]
    goal = Goal(max_downtime_ms=request.max_downtime_ms)
    await probe_paths(cluster, [(m.source, m.destination, m.name) for m in moves])
    planned = await asyncio.gather(
        *(
            make_plan(
                cluster,
                live.vms[m.name],
                m.destination,
                goal,
                cap_bps=request.cap_bps,
                history=history,
            )
            for m in moves
        ),
        return_exceptions=True,
    )
    plans: dict[str, Plan] = {}
    for move, plan in zip(moves, planned, strict=True):
        if isinstance(plan, FerryError):
            refused.append((move.name, f"cannot be planned: {plan}"))
        elif isinstance(plan, BaseException):
            raise plan
        elif not plan.choice.meets_goal:
            refused.append((move.name, f"goal unreachable: {plan.choice.reason}"))
        else:
            plans[move.name] = plan
    links = await _links(cluster, live, plans)
    model = _measured_model(live, plans, links, request)
    measured = tuple(cm.Move(model.vm(m.name), m.destination) for m in moves if m.name in plans)
    cal = calibration_from(history, "lab")
    if request.cap_bps is not None:
        cal = replace(cal, qemu_throughput_bps=min(cal.qemu_throughput_bps, request.cap_bps))
    book = CostBook(cal)
    schedule = None
    if not refused:
        schedule = plan_job(
            model, measured, book=book, policy=request.policy, deadline_s=request.deadline_s
        )
    return JobPlan(
        kind, request.host, request, model, measured, tuple(refused), schedule, book, plans
    )


async def probe_paths(cluster: Cluster, moves: Sequence[tuple[str, str, str]]) -> None:
    """Probe each distinct path of ``moves`` (source, destination, VM) whose bandwidth the
    source agent has no fresh figure of, one path at a time: the plans of the moves then
    read the figures from the agents' rolling profiles. Probes run at once would each
    measure only their share of the source's link. A probe that fails is logged; the plan of
    a move on that path probes again and reports the error."""
    seen: set[tuple[str, str]] = set()
    for source, destination, vm in moves:
        if (source, destination) in seen:
            continue
        seen.add((source, destination))
        agent, address = cluster.client(source), cluster.inventory.host(destination).address
        try:
            path = (await agent.profile(vm, address)).path
            if path is None or path.age_s > PATH_FRESH_S:
                await probe_path(agent, cluster.client(destination), address)
        except FerryError as err:
            logger.warning("evacuation.probe_failed %s->%s: %s", source, destination, err)


async def _links(
    cluster: Cluster, live: LiveCluster, plans: Mapping[str, Plan]
) -> dict[str, float]:
    """Each host's link rate: what its paths measured (the profiles the plans left fresh,
    before any cap), or the lab's shaping."""
    shaped = cluster.inventory.link_mbps
    if shaped is not None:
        return {h: shaped * 125_000.0 for h in live.hosts}
    samples = await asyncio.gather(
        *(
            cluster.client(p.source).profile(p.vm, cluster.inventory.host(p.destination).address)
            for p in plans.values()
        )
    )
    rates: dict[str, float] = {}
    for plan, profile in zip(plans.values(), samples, strict=True):
        rate = float(plan.measurement.bandwidth_bps)
        if profile.path is not None:
            rate = max(rate, profile.path.bandwidth_bps)
        for host in (plan.source, plan.destination):
            rates[host] = max(rates.get(host, 0.0), rate)
    fallback = max(rates.values(), default=0.0)
    return {h: rates.get(h, fallback) for h in live.hosts if rates.get(h, fallback) > 0}


def _measured_model(
    live: LiveCluster, plans: Mapping[str, Plan], links: Mapping[str, float], request: JobRequest
) -> cm.Cluster:
    """The live cluster with its links' rates and the planned VMs as measured."""
    hosts = [
        request.limits(replace(h, link_bps=max(1, round(links.get(h.name, h.link_bps)))))
        for h in live.model.hosts
    ]
    vms = []
    for vm in live.model.vms:
        plan = plans.get(vm.name)
        if plan is None:
            vms.append(vm)
            continue
        m = plan.measurement
        vms.append(
            replace(
                vm,
                dirty_rate_bps=m.dirty_rate_bps,
                dirty_set_bytes=None
                if m.dirty_set_bytes is None
                else min(vm.memory_bytes, m.dirty_set_bytes),
                zero_fraction=m.zero_fraction,
                compress_ratio=m.compress_ratio,
                max_downtime_ms=request.max_downtime_ms,
            )
        )
    return cm.Cluster.build(hosts, vms)
