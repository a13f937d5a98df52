"""Pre-flight: measure the guest and the path, predict every strategy, choose one for a goal.

A plan changes nothing. Its inputs are the guest's profile (dirty rate, zero pages,
compressibility, vCPU load, disk writes) and the path's bandwidth. Agents keep both as rolling
profiles (:mod:`vmferry.agent.profile`): the source measures its running guests in the
background and remembers what probes and migrations achieved per destination, so a plan from
fresh profiles answers at once. What is missing or stale is measured now, as a pre-flight
always did: the source agent profiles the guest (~1 s), the destination agent opens a sink on
its migration address and the source streams a probe to it over the very path QEMU will use
(~1 s). The plan says how old its data is.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field, replace

from vmferry.agent.api import GuestMeasurement, VmInfo
from vmferry.agent.port import AgentPort
from vmferry.controller.cluster import Cluster
from vmferry.controller.history import History
from vmferry.core.blind import Learnt, learnt_rewrites
from vmferry.core.errors import FerryError
from vmferry.core.model import MECHANISMS, Prediction
from vmferry.core.move_cost import DOWNTIME_HEADROOM, RESUME_ALLOWANCE_MS, qemu_downtime_limit_ms
from vmferry.core.predict import (
    Calibration,
    CalibrationSample,
    Measurement,
    StrategyPrediction,
    predict_all,
)
from vmferry.core.strategy import Choice, Goal, choose

__all__ = [
    "CPU_BOUND_BUSY",
    "DOWNTIME_HEADROOM",
    "GUEST_FRESH_S",
    "PATH_FRESH_S",
    "RESUME_ALLOWANCE_MS",
    "DataAge",
    "Plan",
    "calibration_from",
    "dirty_set_bound",
    "guest_kind",
    "make_plan",
    "measure_path",
    "probe_path",
    "qemu_downtime_limit_ms",
]

logger = logging.getLogger(__name__)

# A guest whose vCPUs run more than this share of the time dirties as fast as it can compute.
CPU_BOUND_BUSY = 0.8


_PROBE_MS = 1000
# How old a rolling profile may be to plan from. A guest's profile is refreshed every ~10 s
# while it runs (a workload that changes faster than this is planned from its last sample);
# a path's bandwidth changes rarely, and every migration on it refreshes it.
GUEST_FRESH_S = 30.0
PATH_FRESH_S = 300.0


@dataclass(frozen=True, slots=True)
class DataAge:
    """How old a plan's inputs are (0: measured for this plan).

    Attributes:
        guest_age_s: the guest's profile.
        bandwidth_age_s: the path's bandwidth.
        bandwidth_source: ``probe`` or ``migration`` (what measured the bandwidth).
    """

    guest_age_s: float
    bandwidth_age_s: float
    bandwidth_source: str

    @property
    def age_s(self) -> float:
        """The age of the oldest input."""
        return max(self.guest_age_s, self.bandwidth_age_s)

    @property
    def measured_now(self) -> bool:
        """Nothing came from a profile: the plan measured everything itself."""
        return self.guest_age_s == 0 and self.bandwidth_age_s == 0

    def to_json(self) -> dict[str, object]:
        return {
            "age_s": round(self.age_s, 1),
            "guest_age_s": round(self.guest_age_s, 1),
            "bandwidth_age_s": round(self.bandwidth_age_s, 1),
            "bandwidth_source": self.bandwidth_source,
            "measured_now": self.measured_now,
        }


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything ``vmferry plan`` shows and ``migrate --strategy auto`` acts on."""

    vm: str
    source: str
    destination: str
    guest: GuestMeasurement
    measurement: Measurement
    predictions: tuple[StrategyPrediction, ...]
    goal: Goal
    choice: Choice
    data: DataAge = DataAge(0.0, 0.0, "probe")
    calibration: Calibration = field(default_factory=Calibration.default)  # predictions used it

    def prediction_for(self, strategy: str) -> StrategyPrediction | None:
        return next((p for p in self.predictions if p.strategy == strategy), None)

    def to_json(self) -> dict[str, object]:
        m = self.measurement
        return {
            "schema": 1,
            "vm": self.vm,
            "source": self.source,
            "destination": self.destination,
            "measured": {
                "ram_bytes": m.ram_bytes,
                "dirty_rate_bps": m.dirty_rate_bps,
                "rewritten_unchanged_bps": m.blind_dirty_bps,
                "rewrites_keep_pace": m.blind_keeps_pace,
                "hot_bytes": m.hot_bytes,
                "dirty_set_bytes": m.dirty_set_bytes,
                "dirty_set_seen": self.guest.settled_bytes is not None,
                "resident_bytes": m.resident_bytes,
                "zero_fraction": round(m.zero_fraction, 4),
                "compress_ratio": round(m.compress_ratio, 3),
                "dirty_compress_ratio": (
                    None if m.dirty_compress_ratio is None else round(m.dirty_compress_ratio, 3)
                ),
                "bandwidth_bps": m.bandwidth_bps,
                "vcpu_busy": self.guest.vcpu_busy,
                "dirty_is_cpu_bound": m.dirty_is_cpu_bound,
                "disk_copy_bytes": m.disk_copy_bytes,
                "disk_write_bps": m.disk_write_bps,
                "disk_shared": self.guest.disk_shared,
            },
            "goal": {
                "max_downtime_ms": self.goal.max_downtime_ms,
                "deadline_ms": self.goal.deadline_ms,
                "allow_postcopy": self.goal.allow_postcopy,
            },
            "predictions": [
                {
                    "strategy": p.strategy,
                    "converges": p.converges,
                    "total_ms": p.total_ms,
                    "downtime_ms": p.downtime_ms,
                    "guest_downtime_ms": p.guest_downtime_ms,
                    "switch_felt_ms": p.switch_felt_ms,
                    "transferred_bytes": p.transferred_bytes,
                    "iterations": p.iterations,
                    "disk_ms": p.disk_ms,
                    "risk": p.risk,
                    "note": p.note,
                }
                for p in self.predictions
            ],
            "recommended": self.choice.strategy,
            "meets_goal": self.choice.meets_goal,
            "reason": self.choice.reason,
            "profile": self.data.to_json(),
        }


def dirty_set_bound(guest: GuestMeasurement) -> int:
    """The set a dirtier keeps rewriting: where the agent's scan saw it level off, that; else
    the non-zero part of RAM (pages that are zero now are not being rewritten; an upper bound,
    the true set may be smaller)."""
    nonzero = round(guest.ram_bytes * (1.0 - guest.zero_fraction))
    if guest.settled_bytes is None:
        return nonzero
    return min(nonzero, max(guest.settled_bytes, guest.hot_bytes))


async def measure_path(
    cluster: Cluster, info: VmInfo, destination: str, cap_bps: int | None
) -> tuple[GuestMeasurement, Measurement, DataAge]:
    """The guest's profile and the path's bandwidth from its host to ``destination``: from
    the source agent's rolling profiles when fresh, measured now otherwise.

    Raises:
        FerryError: an agent failed to measure (the guest is untouched either way).
    """
    source = cluster.client(info.host)
    address = cluster.inventory.host(destination).address
    # The host's CPUs: what multifd's zstd shares with the guest's vCPUs (core.predict_cpu).
    profile, host = await asyncio.gather(source.profile(info.name, address), source.host_info())
    if profile.guest is not None and (profile.guest_age_s or 0.0) <= GUEST_FRESH_S:
        guest, guest_age_s = profile.guest, profile.guest_age_s or 0.0
    else:
        guest, guest_age_s = await source.measure(info.name), 0.0
    path = profile.path
    if path is not None and path.age_s <= PATH_FRESH_S:
        bandwidth_bps, data = path.bandwidth_bps, DataAge(guest_age_s, path.age_s, path.source)
    else:
        bandwidth_bps = await probe_path(source, cluster.client(destination), address)
        data = DataAge(guest_age_s, 0.0, "probe")
    # Under a cap QEMU paces its own streams below the link: no queue builds for a fault's page.
    paced = cap_bps is not None and cap_bps < bandwidth_bps
    if cap_bps is not None:
        bandwidth_bps = min(bandwidth_bps, cap_bps)
    measurement = Measurement(
        ram_bytes=guest.ram_bytes,
        zero_fraction=guest.zero_fraction,
        compress_ratio=max(1.0, guest.compress_ratio),
        dirty_compress_ratio=(
            None if guest.dirty_compress_ratio is None else max(1.0, guest.dirty_compress_ratio)
        ),
        dirty_rate_bps=guest.dirty_rate_bps,
        hot_bytes=guest.hot_bytes,
        resident_bytes=guest.resident_bytes,
        bandwidth_bps=max(1, int(bandwidth_bps)),
        dirty_set_bytes=dirty_set_bound(guest),
        dirty_is_cpu_bound=guest.vcpu_busy is not None and guest.vcpu_busy > CPU_BOUND_BUSY,
        host_cpus=host.cpus,
        guest_busy_cores=None if guest.vcpu_busy is None else guest.vcpu_busy * info.vcpus,
        # On shared storage nothing of the disk moves: no mirror, so no copy and no write cost.
        disk_copy_bytes=0 if guest.disk_shared else guest.disk_allocated_bytes,
        disk_write_bps=guest.disk_write_bps,
        link_queue_ms=0.0 if paced else None,
    )
    logger.info(
        "plan.measured %s %s->%s %s (data %.1f s old)",
        info.name,
        info.host,
        destination,
        measurement,
        data.age_s,
    )
    return guest, measurement, data


async def probe_path(source: AgentPort, target: AgentPort, address: str) -> float:
    """Stream a probe from ``source`` to a sink on ``target`` (at ``address``); the sink's
    figure, which the source also keeps for its next plans."""
    port = await target.open_sink()
    try:
        await source.probe(address, port, _PROBE_MS)
    finally:
        bandwidth_bps = await target.sink_result(port)
    await source.record_bandwidth(address, bandwidth_bps)
    return bandwidth_bps


def guest_kind(info: VmInfo) -> str:
    """What kind of guest ``info`` runs, as the history tells them apart: ``lab`` (vmferry's
    lab guest) or ``own`` (a user's)."""
    return "lab" if info.boot is None else "own"


def calibration_from(history: History | None, guest: str | None = None) -> Calibration:
    """Default calibration refined by past migrations that carried a prediction (what the
    guest feels from moves of ``guest``'s kind, see :meth:`Calibration.refined`)."""
    base = Calibration.default()
    if history is None:
        return base
    samples: list[CalibrationSample] = []
    try:
        entries = history.entries(limit=200)
    except FerryError as err:
        logger.warning("plan: history unreadable, using default calibration: %s", err)
        return base
    for entry in entries:
        report = entry.report
        predicted = report.get("predicted")
        strategy = report.get("strategy")
        total = report.get("total_ms")
        downtime = report.get("downtime_ms")
        felt = report.get("guest_downtime_ms")
        if (
            report.get("status") != "completed"
            or not isinstance(predicted, dict)
            or strategy not in MECHANISMS
            or not isinstance(total, int)
        ):
            continue
        samples.append(
            CalibrationSample(
                strategy=next(m for m in MECHANISMS if m == strategy),
                predicted=Prediction(
                    int(predicted["total_ms"]),
                    int(predicted["downtime_ms"]),
                    int(predicted["transferred_bytes"]),
                    _int_or_none(predicted.get("guest_downtime_ms")),
                ),
                actual_total_ms=total,
                actual_downtime_ms=_int_or_none(downtime),
                actual_guest_downtime_ms=_int_or_none(felt),
                # Only a user's guest is asked about its guest agent on arrival.
                guest="lab" if report.get("guest_agent") is None else "own",
            )
        )
    return base.refined(samples, guest=guest) if samples else base


def learnt_blind(history: History | None, vm: str) -> Learnt:
    """The pages ``vm`` rewrites unchanged, as its recent moves saw them
    (:mod:`vmferry.core.blind`); none without a history or when it cannot be read."""
    if history is None:
        return Learnt(0, False)
    try:
        return learnt_rewrites(history.resent_zero(vm))
    except FerryError as err:
        logger.warning("plan: history unreadable, no learnt rewrites for %s: %s", vm, err)
        return Learnt(0, False)


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) else None


async def make_plan(
    cluster: Cluster,
    info: VmInfo,
    destination: str,
    goal: Goal,
    *,
    cap_bps: int | None = None,
    history: History | None = None,
) -> Plan:
    """Measure, predict every strategy, choose for ``goal``.

    Raises:
        FerryError: measuring failed.
    """
    guest, measurement, data = await measure_path(cluster, info, destination, cap_bps)
    blind = learnt_blind(history, info.name)
    if blind.rate_bps:
        measurement = replace(
            measurement, blind_dirty_bps=blind.rate_bps, blind_keeps_pace=blind.keeps_pace
        )
    cal = calibration_from(history, guest_kind(info))
    predictions = predict_all(
        measurement, downtime_limit_ms=qemu_downtime_limit_ms(goal.max_downtime_ms), cal=cal
    )
    return Plan(
        vm=info.name,
        source=info.host,
        destination=destination,
        guest=guest,
        measurement=measurement,
        predictions=predictions,
        goal=goal,
        choice=choose(predictions, goal),
        data=data,
        calibration=cal,
    )
