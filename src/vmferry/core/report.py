"""The report of one move, built by the state machine from what it saw (pure).

Every ending of :class:`~vmferry.core.machine.MigrationMachine` becomes a
:class:`~vmferry.core.model.MigrationReport` here, with a one-paragraph ``error`` that says where
the guest is and what the user can do.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from vmferry.core.blind import rewritten_unchanged_bps
from vmferry.core.migration import Arrived, Instant, Move, SourceOutcome
from vmferry.core.migration_state import Arriving, Concluding, Flow
from vmferry.core.model import IntegrityReport, MigrationReport, MigrationStats, ReportStatus

__all__ = [
    "Reporter",
    "arrival_failed",
    "lost_in_postcopy",
    "rolled_back",
    "split_postcopy",
]


@dataclass(slots=True)
class Reporter:
    """Builds the reports of one move (``started`` is set when the machine starts)."""

    move: Move
    started: Instant = field(default_factory=lambda: Instant(0.0, 0.0))

    def build(
        self,
        flow: Flow,
        now: Instant,
        *,
        status: ReportStatus,
        error: str | None,
        running_on_destination: bool = False,
        guest_alive: bool = True,
        downtime_ms: int | None = None,
        integrity: IntegrityReport | None = None,
    ) -> MigrationReport:
        move, last = self.move, flow.last
        return MigrationReport(
            vm=move.vm,
            source=move.source,
            destination=move.destination,
            running_on=move.destination if running_on_destination else move.source,
            strategy=move.strategy,
            status=status,
            error=error,
            total_ms=round((now.mono_s - self.started.mono_s) * 1000),
            downtime_ms=downtime_ms,
            guest_downtime_ms=None,
            transferred_bytes=0
            if last is None
            else last.transferred_bytes + last.disk_copied_bytes,
            iterations=0 if last is None else last.iterations,
            predicted=None if move.prediction is None else move.prediction.to_prediction(),
            integrity=integrity,
            guest_alive=guest_alive,
            recoveries=flow.recoveries,
            # Attempted over TLS; a completed report says what QEMU really used.
            tls=move.tls,
            resent_zero_bps=rewritten_unchanged_bps(flow.progress),
        )

    def failed(
        self, flow: Flow, why: str, now: Instant, alive: bool, running_on_destination: bool
    ) -> MigrationReport:
        return self.build(
            flow,
            now,
            status="failed",
            error=why,
            guest_alive=alive,
            running_on_destination=running_on_destination,
        )

    def followed(self, flow: Flow, outcome: SourceOutcome, now: Instant) -> MigrationReport:
        """A followed migration's end, as QEMU reported it (reconcile settles the rest)."""
        return self.build(
            flow,
            now,
            status=outcome.status,
            error=outcome.error,
            running_on_destination=outcome.status == "completed",
        )

    def unrecovered(self) -> str:
        move = self.move
        return (
            f"post-copy broken and not recovered within {move.recovery.limit_s:g} s: the guest "
            f"is paused on {move.destination} with part of its memory still on {move.source}; "
            "both QEMUs are kept as they are (the source copy is never started). Restore the "
            "network and recover the migration (`vmferry reconcile`), or accept the loss."
        )

    def completed(
        self, arriving: Arriving, arrived: Arrived, handoff_error: str | None
    ) -> MigrationReport:
        """The guest runs on the destination and was checked there."""
        outcome = arriving.outcome
        # From the first request to the guest running on the destination with all its memory
        # there (post-copy keeps pulling pages after the guest already runs).
        first_ms = arrived.first_heartbeat_ms
        end_ms = max(first_ms or 0.0, arriving.completed_wall_ms)
        gap = switch_ms = None
        if outcome.last_heartbeat_ms is not None and first_ms is not None:
            switch_ms = round(first_ms - outcome.last_heartbeat_ms)
            gap = max(outcome.max_gap_ms or 0, switch_ms)
        report = self.build(
            arriving.flow,
            self.started,
            status="completed",
            error=None
            if handoff_error is None
            else f"source QEMU not cleaned up: {handoff_error} (`vmferry reconcile` removes it)",
            running_on_destination=True,
            downtime_ms=downtime_ms(self.move, arriving.final, arriving.flow.disk_ms),
            integrity=arrived.integrity,
        )
        total_ms = round(end_ms - self.started.wall_ms)
        return replace(
            report,
            total_ms=total_ms,
            guest_downtime_ms=gap,
            guest_stall_copy_ms=outcome.max_gap_ms,
            guest_stall_switch_ms=switch_ms,
            tls=outcome.tls,
            guest_agent=arrived.guest_agent,
            handoff=arriving.handoff,
        )

    def taken_back(
        self, arriving: Arriving, error: str, integrity: IntegrityReport | None, now: Instant
    ) -> MigrationReport:
        """The guest did not start on the destination and runs on the source again."""
        report = self.build(
            arriving.flow,
            now,
            status="failed",
            error=f"the guest did not start on {self.move.destination} ({error}); it runs on "
            f"{self.move.source} again",
            integrity=integrity,
            downtime_ms=downtime_ms(self.move, arriving.final, arriving.flow.disk_ms),
        )
        return replace(report, handoff=arriving.handoff)


def downtime_ms(move: Move, final: MigrationStats | None, disk_ms: int) -> int | None:
    """QEMU's downtime; for a cold move the guest was paused for the disk copy and QEMU's
    whole migration, which QEMU does not count as downtime (it did not pause the guest)."""
    if final is None:
        return None
    if move.strategy == "cold":
        return disk_ms + max(final.total_ms, final.downtime_ms or 0)
    return final.downtime_ms


def arrival_failed(
    reporter: Reporter, arriving: Arriving, error: str, now: Instant
) -> MigrationReport:
    """QEMU completed but the guest did not come up on the destination, and the source could
    not take it back: the report points at reconcile."""
    return reporter.build(
        arriving.flow,
        now,
        status="completed",
        error=f"guest did not come up on {reporter.move.destination}: {error} "
        "(see `vmferry reconcile`)",
        running_on_destination=True,
        guest_alive=False,
        downtime_ms=downtime_ms(reporter.move, arriving.final, arriving.flow.disk_ms),
    )


def lost_in_postcopy(move: Move, dead_host: str) -> str:
    """Why a post-copy whose QEMU on ``dead_host`` died is lost."""
    if dead_host == move.source:
        return (
            f"the source QEMU on {move.source} died during post-copy: the guest's pages that "
            f"were still there are lost. The guest on {move.destination} cannot go on (it "
            "waits for them, paused); its QEMU is kept for inspection. No copy runs."
        )
    return (
        f"the destination QEMU on {move.destination} died during post-copy, while it ran the "
        f"guest: the guest is lost. The source copy on {move.source} is older than what the "
        "guest had done and is never resumed; it is kept for inspection. No copy runs."
    )


def split_postcopy(move: Move, outcome: SourceOutcome) -> str:
    return (
        f"post-copy failed ({outcome.error or outcome.status}); the guest's memory is split "
        f"between {move.source} and {move.destination}"
    )


def rolled_back(move: Move, state: Concluding, source_dead: bool) -> str:
    """Why a migration that failed before post-copy failed, and where the guest is."""
    reason = state.reason or state.outcome.error or state.outcome.status
    if not source_dead:
        return reason
    return (
        f"the source QEMU on {move.source} died before the switchover ({reason}): the guest is "
        f"lost; no copy runs (nothing was started on {move.destination})"
    )
