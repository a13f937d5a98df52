"""Pre-flight: measure the guest and the path, predict every strategy, choose one for a goal.

A plan takes a few seconds and changes nothing: the source agent profiles the running guest
(dirty rate, zero pages, compressibility, vCPU load), the destination agent opens a sink on its
migration address and the source streams a probe to it over the very path QEMU will use.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from vmferry.agent.api import GuestMeasurement, VmInfo
from vmferry.controller.cluster import Cluster
from vmferry.controller.history import History
from vmferry.core.errors import FerryError
from vmferry.core.model import MECHANISMS, Prediction
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
    "RESUME_ALLOWANCE_MS",
    "Plan",
    "calibration_from",
    "make_plan",
    "measure_path",
    "qemu_downtime_limit_ms",
]

logger = logging.getLogger(__name__)

# A guest whose vCPUs run more than this share of the time dirties as fast as it can compute.
CPU_BOUND_BUSY = 0.8
# QEMU's downtime limit is a target it overshoots (the last pass, device state): ask QEMU for
# this share of the user's maximum so the result stays under it.
DOWNTIME_HEADROOM = 0.7
# The user's maximum is what the guest feels: QEMU's pause plus resuming on the destination.
RESUME_ALLOWANCE_MS = Calibration.default().resume_felt_ms


def qemu_downtime_limit_ms(max_downtime_ms: int) -> int:
    """The ``downtime-limit`` given to QEMU (and to the predictor) for a user's maximum of what
    the guest feels: the resume is taken off first, then QEMU's overshoot."""
    return max(1, int((max_downtime_ms - RESUME_ALLOWANCE_MS) * DOWNTIME_HEADROOM))


_PROBE_MS = 1000


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
                "zero_fraction": round(m.zero_fraction, 4),
                "compress_ratio": round(m.compress_ratio, 3),
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
        }


async def measure_path(
    cluster: Cluster, info: VmInfo, destination: str, cap_bps: int | None
) -> tuple[GuestMeasurement, Measurement]:
    """Profile the guest and the path from its host to ``destination``.

    Raises:
        FerryError: an agent failed to measure (the guest is untouched either way).
    """
    source = cluster.client(info.host)
    target = cluster.client(destination)
    guest = await source.measure(info.name)
    port = await target.open_sink()
    address = cluster.inventory.host(destination).address
    try:
        await source.probe(address, port, _PROBE_MS)
    finally:
        bandwidth_bps = await target.sink_result(port)
    # Under a cap QEMU paces its own streams below the link: no queue builds for a fault's page.
    paced = cap_bps is not None and cap_bps < bandwidth_bps
    if cap_bps is not None:
        bandwidth_bps = min(bandwidth_bps, cap_bps)
    measurement = Measurement(
        ram_bytes=guest.ram_bytes,
        zero_fraction=guest.zero_fraction,
        compress_ratio=max(1.0, guest.compress_ratio),
        dirty_rate_bps=guest.dirty_rate_bps,
        bandwidth_bps=max(1, int(bandwidth_bps)),
        # Pages that are zero now are not being rewritten: the set a dirtier keeps rewriting
        # lies within the non-zero part of RAM (an upper bound; the true set may be smaller).
        dirty_set_bytes=round(guest.ram_bytes * (1.0 - guest.zero_fraction)),
        dirty_is_cpu_bound=guest.vcpu_busy is not None and guest.vcpu_busy > CPU_BOUND_BUSY,
        # On shared storage nothing of the disk moves: no mirror, so no copy and no write cost.
        disk_copy_bytes=0 if guest.disk_shared else guest.disk_allocated_bytes,
        disk_write_bps=guest.disk_write_bps,
        link_queue_ms=0.0 if paced else None,
    )
    logger.info("plan.measured %s %s->%s %s", info.name, info.host, destination, measurement)
    return guest, measurement


def calibration_from(history: History | None) -> Calibration:
    """Default calibration refined by past migrations that carried a prediction."""
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
            )
        )
    return base.refined(samples) if samples else base


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
    guest, measurement = await measure_path(cluster, info, destination, cap_bps)
    predictions = predict_all(
        measurement,
        downtime_limit_ms=qemu_downtime_limit_ms(goal.max_downtime_ms),
        cal=calibration_from(history),
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
    )
