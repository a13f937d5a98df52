"""Planning a balance of the real cluster (``vmferry balance``) from live data.

The hosts that take part are those that answer and are not in (or entering) maintenance. Each
running VM's profile comes from its agent's rolling profile (measured now when missing or
stale, as a plan does): its vCPU load makes the host's measured CPU load, and its dirty rate,
zero pages and compressibility make the predicted cost of moving it. VMs whose move ended
within the cool-down (from the migration history) stay put. :func:`vmferry.core.balance.
plan_moves` chooses the moves and predicts every host's load after each; the chosen moves are
then planned as one job, as an evacuation's are (each move's plan, the schedule and its
makespan: :func:`vmferry.controller.evacuation.plan_placed`). Nothing moves here.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from vmferry.agent.api import GuestMeasurement, VmInfo
from vmferry.controller.cluster import Cluster
from vmferry.controller.evacuation import JobPlan, JobRequest, plan_placed
from vmferry.controller.history import History
from vmferry.controller.placing import LiveCluster
from vmferry.controller.plan import GUEST_FRESH_S, calibration_from, dirty_set_bound
from vmferry.core import cluster_model as cm
from vmferry.core.balance import (
    DEFAULT_SPREAD,
    BalancePlan,
    HostLoad,
    LoadBook,
    RecentMove,
    cooling,
    plan_moves,
    spread,
)
from vmferry.core.errors import ConfigError, FerryError
from vmferry.core.move_cost import CostBook
from vmferry.core.placement import Placement

__all__ = [
    "BALANCE_HOST",
    "MAX_BALANCE_MOVES",
    "BalanceJob",
    "BalanceRequest",
    "cooling_from",
    "plan_balance_job",
]

logger = logging.getLogger(__name__)

# A balance job's host in the job store: it holds the whole cluster, so two balances never
# run at once (besides the hosts its moves hold, as every job's).
BALANCE_HOST = "cluster"
MAX_BALANCE_MOVES = 1000
_MAX_COOL_DOWN_MIN = 7 * 24 * 60.0
# A move that ended within the cool-down started at most this long before it.
_LONGEST_MOVE = timedelta(hours=6)
# Agents that do not say how many CPUs their host has offer VMs this many vCPUs per CPU.
_OLD_AGENT_OVERCOMMIT = 4


@dataclass(frozen=True, slots=True)
class BalanceRequest:
    """What the user asked of a balance.

    Attributes:
        max_moves: at most this many moves.
        cool_down_min: VMs that moved within this many minutes stay put.
        max_downtime_ms: each VM's downtime goal (what the guest feels).
        bandwidth_mbps: each move's cap (megabits/s).
        max_outbound: moves each host sends at once, at most (None: the default).
        max_inbound: moves each host receives at once, at most (None: the default).
        target: the spread of host load (0..1) aimed under.
    """

    max_moves: int = 10
    cool_down_min: float = 30.0
    max_downtime_ms: int = 300
    bandwidth_mbps: int | None = None
    max_outbound: int | None = None
    max_inbound: int | None = None
    target: float = DEFAULT_SPREAD

    def check(self) -> None:
        """Raises: ConfigError: numbers out of range (named by their flag)."""
        if not 1 <= self.max_moves <= MAX_BALANCE_MOVES:
            raise ConfigError(
                f"--max-moves must be a positive integer (1..{MAX_BALANCE_MOVES}), "
                f"not {self.max_moves}"
            )
        if not 0 <= self.cool_down_min <= _MAX_COOL_DOWN_MIN:
            raise ConfigError(
                f"--cool-down must be 0..{_MAX_COOL_DOWN_MIN:.0f} minutes, not {self.cool_down_min}"
            )
        self.job_request().check()

    def job_request(self) -> JobRequest:
        """The request each move of the job is planned and run with."""
        return JobRequest(
            host=BALANCE_HOST,
            bandwidth_mbps=self.bandwidth_mbps,
            max_downtime_ms=self.max_downtime_ms,
            max_outbound=self.max_outbound,
            max_inbound=self.max_inbound,
        )


@dataclass(frozen=True, slots=True)
class BalanceJob:
    """A planned balance.

    Attributes:
        balance: the moves chosen, with every host's predicted load before and after each.
        job: the moves planned as one job (None: nothing to move).
        excluded: (host, why) for each host left out (maintenance, unreachable).
        cpu_busy: busy vCPUs measured per VM (what the CPU load is made of).
        cpus: CPUs per host.
        unmeasured: VMs whose profile could not be had (counted as all their vCPUs busy,
            not moved).
    """

    balance: BalancePlan
    job: JobPlan | None
    excluded: tuple[tuple[str, str], ...]
    cpu_busy: Mapping[str, float]
    cpus: Mapping[str, float]
    unmeasured: tuple[str, ...] = ()

    def loads_of(self, live: LiveCluster) -> tuple[HostLoad, ...]:
        """The loads of the balanced hosts in ``live`` (after the job, say), each VM's CPU as
        measured when the balance was planned (a moved VM's new host has not measured it yet)."""
        hosts = [h.host for h in self.balance.before if h.host in live.hosts]
        return LoadBook(live.model, hosts, self.cpu_busy, self.cpus).loads()

    def to_json(self, observed: Sequence[HostLoad] | None = None) -> dict[str, Any]:
        data = self.balance.to_json()
        if observed is not None:
            after = {h.host: h for h in observed}
            data["spread_observed_after"] = round(spread(observed), 4)
            for row in data["hosts"]:
                seen = after.get(row["host"])
                row["observed_after"] = None if seen is None else seen.to_json()
        data["cpu_busy"] = {vm: round(busy, 3) for vm, busy in sorted(self.cpu_busy.items())}
        data["cpus"] = dict(self.cpus)
        data["excluded_hosts"] = [{"host": h, "reason": why} for h, why in self.excluded]
        data["unmeasured"] = list(self.unmeasured)
        return data


async def plan_balance_job(
    cluster: Cluster,
    live: LiveCluster,
    request: BalanceRequest,
    history: History | None,
    *,
    now: datetime | None = None,
) -> BalanceJob:
    """Plan a balance of the hosts of ``live`` that take VMs.

    Raises:
        ConfigError: numbers out of range in ``request``.
        FerryError: the history cannot be read.
    """
    request.check()
    hosts = live.open_hosts()
    excluded = [(h, f"{h} is {mark.describe}") for h, mark in live.marks.items()]
    excluded += [(h, f"{h}'s agent does not answer") for h in live.unreachable]
    on_hosts = [v for v in live.vms.values() if v.host in hosts]
    running = [v for v in on_hosts if v.state == "running"]
    measured = await _profiles(cluster, running)
    unmeasured = sorted(v.name for v in running if v.name not in measured)
    cpu_busy = {v.name: _busy_vcpus(v, measured[v.name]) for v in running if v.name in measured}
    cpus = {h: float(_cpus(live, h)) for h in hosts}
    model = _with_profiles(live.model, measured, request.max_downtime_ms)
    job_request = request.job_request()
    cal = calibration_from(history, "lab")
    if job_request.cap_bps is not None:
        cal = replace(cal, qemu_throughput_bps=min(cal.qemu_throughput_bps, job_request.cap_bps))
    book = CostBook(cal)
    shaped = cluster.inventory.link_mbps
    link_bps = cal.qemu_throughput_bps if shaped is None else shaped * 125_000.0
    link_bps = min(link_bps, cal.qemu_throughput_bps)

    def cost_s(vm: cm.Vm, host: cm.Host) -> float:
        need = book.need(vm, max_bps=link_bps)
        return need.best.total_s if need.feasible else math.inf

    balance = plan_moves(
        model,
        cpu_busy=cpu_busy,
        cpus=cpus,
        cost_s=cost_s,
        max_moves=request.max_moves,
        hosts=hosts,
        cooldown=cooling_from(history, request.cool_down_min, now or datetime.now(UTC)),
        fixed=[v.name for v in on_hosts if v.name not in measured],
        target=request.target,
    )
    job = None
    if balance.moves:
        job = await plan_placed(
            cluster, live, job_request, history, "balance", Placement(balance.moves)
        )
    return BalanceJob(balance, job, tuple(excluded), cpu_busy, cpus, tuple(unmeasured))


def cooling_from(
    history: History | None, cool_down_min: float, now: datetime
) -> dict[cm.VmName, float]:
    """The VMs whose last completed move ended within ``cool_down_min`` of ``now``."""
    if history is None or cool_down_min <= 0:
        return {}
    window = timedelta(minutes=cool_down_min)
    recent = []
    for entry in history.entries_since(now - window - _LONGEST_MOVE):
        report = entry.report
        total_ms = report.get("total_ms")
        if report.get("status") != "completed" or not isinstance(total_ms, int):
            continue
        try:
            started = datetime.fromisoformat(entry.started_at)
        except ValueError:
            continue
        ended = started + timedelta(milliseconds=total_ms)
        recent.append(RecentMove(str(report.get("vm")), ended.timestamp()))
    return cooling(recent, now.timestamp(), window.total_seconds())


async def _profiles(cluster: Cluster, vms: Sequence[VmInfo]) -> dict[str, GuestMeasurement]:
    """Each VM's rolling profile (measured now when missing or stale); VMs whose profile
    cannot be had are left out (and logged)."""
    answers = await asyncio.gather(*(_profile(cluster, v) for v in vms), return_exceptions=True)
    found: dict[str, GuestMeasurement] = {}
    for vm, answer in zip(vms, answers, strict=True):
        if isinstance(answer, FerryError):
            logger.warning("balance.unmeasured %s: %s", vm.name, answer)
        elif isinstance(answer, BaseException):
            raise answer
        else:
            found[vm.name] = answer
    return found


async def _profile(cluster: Cluster, vm: VmInfo) -> GuestMeasurement:
    client = cluster.client(vm.host)
    profile = await client.profile(vm.name)
    if profile.guest is not None and (profile.guest_age_s or 0.0) <= GUEST_FRESH_S:
        return profile.guest
    return await client.measure(vm.name)


def _busy_vcpus(vm: VmInfo, guest: GuestMeasurement) -> float:
    """The vCPUs ``vm`` keeps busy: its vCPUs times their measured busy share (all of them
    when the agent could not tell)."""
    if guest.vcpu_busy is None:
        return float(vm.vcpus)
    return vm.vcpus * guest.vcpu_busy


def _cpus(live: LiveCluster, host: str) -> int:
    info = live.hosts[host]
    if info.cpus is not None:
        return max(1, info.cpus)
    return max(1, (info.vcpus or _OLD_AGENT_OVERCOMMIT) // _OLD_AGENT_OVERCOMMIT)


def _with_profiles(
    model: cm.Cluster, measured: Mapping[str, GuestMeasurement], max_downtime_ms: int
) -> cm.Cluster:
    """``model`` with each measured VM's dirty rate, pages and downtime goal (what its move
    costs)."""
    vms = []
    for vm in model.vms:
        guest = measured.get(vm.name)
        if guest is None:
            vms.append(vm)
            continue
        vms.append(
            replace(
                vm,
                dirty_rate_bps=guest.dirty_rate_bps,
                # As a plan takes it (its non-zero part, or where the scan saw it settle).
                dirty_set_bytes=min(vm.memory_bytes, dirty_set_bound(guest)),
                zero_fraction=guest.zero_fraction,
                compress_ratio=max(1.0, guest.compress_ratio),
                max_downtime_ms=max_downtime_ms,
            )
        )
    return cm.Cluster.build(model.hosts, vms)
