"""The service's Prometheus metrics (``GET /metrics``, text format 0.0.4).

Names follow Prometheus' conventions: the ``vmferry_`` prefix, base units in the name
(``_seconds``, ``_bytes``), ``_total`` for counters, ``_ratio`` for a dimensionless ratio.
Moves are counted as their reports arrive (a single migration, each move of an evacuation or a
balance); jobs and hosts are read when scraped (the store's job table, every agent's
``host_info`` with a deadline).

=========================================================  =========  =========================
metric                                                     type       labels
=========================================================  =========  =========================
vmferry_migrations_total                                   counter    strategy, result
vmferry_migration_duration_seconds                         histogram  strategy
vmferry_migration_downtime_seconds (QEMU's figure)         histogram  strategy
vmferry_migration_guest_downtime_seconds (heartbeat gap)   histogram  strategy
vmferry_migration_transferred_bytes                        histogram  strategy
vmferry_migration_prediction_error_ratio                   histogram  quantity
vmferry_postcopy_recoveries_total                          counter
vmferry_jobs                                               gauge      kind, state
vmferry_host_up                                            gauge      host
vmferry_host_memory_capacity_bytes / _used_bytes           gauge      host
vmferry_events_dropped_total                               counter
vmferry_api_requests_total                                 counter    method, route, status
vmferry_api_request_duration_seconds                       histogram  route
=========================================================  =========  =========================

``result`` is the report's status (``completed``, ``failed``, ``cancelled``) or ``unverified``
(completed, but the guest was not vouched for). The prediction error is
``(actual - predicted) / predicted`` for ``quantity`` ``total_time``, ``downtime`` (the
guest-felt figure where both exist) and ``transferred_bytes``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from vmferry.agent.api import HostInfo
from vmferry.core.model import MigrationReport

__all__ = ["CONTENT_TYPE", "ServiceMetrics", "outcome"]

# Text format 0.0.4, which every Prometheus reads (our names are plain ASCII, so the body is
# the same in prometheus_client's newer 1.0.0 too).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_DURATION_BUCKETS_S = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)
_DOWNTIME_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_BYTES_BUCKETS = tuple(float(1 << n) for n in range(20, 38, 2))  # 1 MiB .. 128 GiB
_ERROR_BUCKETS = (-0.75, -0.5, -0.25, -0.1, 0, 0.1, 0.25, 0.5, 1, 2, 4)
_API_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


def outcome(report: MigrationReport) -> str:
    """The ``result`` label of a report."""
    if report.status == "completed" and not report.is_success:
        return "unverified"
    return report.status


def _error_ratio(actual: int | None, predicted: int | None) -> float | None:
    if actual is None or predicted is None or predicted <= 0:
        return None
    return (actual - predicted) / predicted


class ServiceMetrics:
    """Every metric of one service, in a registry of its own (tests run several)."""

    def __init__(self) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # no ``_created`` series beside every counter (process-wide)
        self.registry = CollectorRegistry()
        r = self.registry
        self.migrations = Counter(
            "vmferry_migrations", "Migrations that ended", ["strategy", "result"], registry=r
        )
        self.duration = Histogram(
            "vmferry_migration_duration_seconds",
            "A migration's total time",
            ["strategy"],
            buckets=_DURATION_BUCKETS_S,
            registry=r,
        )
        self.downtime = Histogram(
            "vmferry_migration_downtime_seconds",
            "QEMU's downtime of a completed migration",
            ["strategy"],
            buckets=_DOWNTIME_BUCKETS_S,
            registry=r,
        )
        self.guest_downtime = Histogram(
            "vmferry_migration_guest_downtime_seconds",
            "The longest gap between guest heartbeats around a completed migration",
            ["strategy"],
            buckets=_DOWNTIME_BUCKETS_S,
            registry=r,
        )
        self.transferred = Histogram(
            "vmferry_migration_transferred_bytes",
            "Bytes a migration sent",
            ["strategy"],
            buckets=_BYTES_BUCKETS,
            registry=r,
        )
        self.prediction_error = Histogram(
            "vmferry_migration_prediction_error_ratio",
            "(actual - predicted) / predicted, per predicted quantity",
            ["quantity"],
            buckets=_ERROR_BUCKETS,
            registry=r,
        )
        self.recoveries = Counter(
            "vmferry_postcopy_recoveries", "Post-copy migrations recovered", registry=r
        )
        self.jobs = Gauge(
            "vmferry_jobs", "Jobs the service ran, by state", ["kind", "state"], registry=r
        )
        self.host_up = Gauge(
            "vmferry_host_up", "1 if the host's agent answered", ["host"], registry=r
        )
        self.host_capacity = Gauge(
            "vmferry_host_memory_capacity_bytes", "Memory a host offers VMs", ["host"], registry=r
        )
        self.host_used = Gauge(
            "vmferry_host_memory_used_bytes", "Memory a host's VMs take", ["host"], registry=r
        )
        self.events_dropped = Counter(
            "vmferry_events_dropped", "Events slow watchers lost (drop-oldest)", registry=r
        )
        self.requests = Counter(
            "vmferry_api_requests", "API requests", ["method", "route", "status"], registry=r
        )
        self.request_duration = Histogram(
            "vmferry_api_request_duration_seconds",
            "Time to answer an API request (to the first byte for event streams)",
            ["route"],
            buckets=_API_BUCKETS_S,
            registry=r,
        )

    def observe_report(self, report: MigrationReport) -> None:
        """Count a move that ended."""
        strategy = report.strategy
        self.migrations.labels(strategy, outcome(report)).inc()
        self.duration.labels(strategy).observe(report.total_ms / 1000)
        self.transferred.labels(strategy).observe(report.transferred_bytes)
        if report.status == "completed":
            if report.downtime_ms is not None:
                self.downtime.labels(strategy).observe(report.downtime_ms / 1000)
            if report.guest_downtime_ms is not None:
                self.guest_downtime.labels(strategy).observe(report.guest_downtime_ms / 1000)
        if report.recoveries:
            self.recoveries.inc(report.recoveries)
        predicted = report.predicted
        if predicted is None or report.status != "completed":
            return
        felt = predicted.guest_downtime_ms if report.guest_downtime_ms is not None else None
        for quantity, ratio in (
            ("total_time", _error_ratio(report.total_ms, predicted.total_ms)),
            (
                "downtime",
                _error_ratio(report.guest_downtime_ms, felt)
                if felt is not None
                else _error_ratio(report.downtime_ms, predicted.downtime_ms),
            ),
            (
                "transferred_bytes",
                _error_ratio(report.transferred_bytes, predicted.transferred_bytes),
            ),
        ):
            if ratio is not None:
                self.prediction_error.labels(quantity).observe(ratio)

    def set_jobs(self, counts: Mapping[tuple[str, str], int]) -> None:
        """The jobs by (kind, state), as the store has them now."""
        self.jobs.clear()
        for (kind, state), count in counts.items():
            self.jobs.labels(kind, state).set(count)

    def set_hosts(self, hosts: Iterable[str], infos: Mapping[str, HostInfo]) -> None:
        """Every host of the inventory; ``infos`` those whose agent answered."""
        for gauge in (self.host_up, self.host_capacity, self.host_used):
            gauge.clear()
        for host in hosts:
            info = infos.get(host)
            self.host_up.labels(host).set(0 if info is None else 1)
            if info is not None:
                self.host_capacity.labels(host).set(info.memory_bytes)
                self.host_used.labels(host).set(info.memory_used_bytes)

    def render(self) -> bytes:
        return generate_latest(self.registry)
