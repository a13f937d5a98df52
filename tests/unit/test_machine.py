"""The migration state machine, driven by hand: a manual clock, no event loop, no QEMU.

Each test plays one branch of a move as the sequence of answers its agents give, and checks the
exact actions the machine asks for and the report it ends with.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from vmferry.core import migration as m
from vmferry.core.errors import StateError
from vmferry.core.handoff import VerifyMode
from vmferry.core.machine import MigrationMachine
from vmferry.core.model import IntegrityReport, MigrationReport, MigrationStats
from vmferry.core.phases import Phase
from vmferry.core.predict import StrategyPrediction
from vmferry.core.recovery import RecoveryPolicy
from vmferry.core.status import MigrationStatus as S
from vmferry.core.status import Stage
from vmferry.core.strategy import Goal

INTACT = IntegrityReport(ok=True, pages_checked=100, bad_pages=0)


def stats(
    status: S = S.ACTIVE,
    sent: int = 0,
    *,
    iterations: int = 1,
    stage: Stage = Stage.MIGRATION,
    remaining: int = 1 << 30,
    total_ms: int = 100,
    disk_copied: int = 0,
) -> MigrationStats:
    return MigrationStats(
        status=status,
        total_ms=total_ms,
        transferred_bytes=sent,
        remaining_bytes=remaining,
        total_bytes=1 << 30,
        dirty_pages_rate=0,
        page_size=4096,
        iterations=iterations,
        throughput_bps=100_000_000,
        expected_downtime_ms=None,
        downtime_ms=12 if status == S.COMPLETED else None,
        disk_copied_bytes=disk_copied,
        disk_total_bytes=1 << 20 if disk_copied else 0,
        stage=stage,
    )


class Driver:
    """Feeds a machine its answers on a manual clock and keeps what it asked for."""

    def __init__(self, move: m.Move | None = None, **changes: Any) -> None:
        base = m.Move("vm1", "host-1", "host-2", "precopy", Goal(300))
        self.move = replace(move or base, **changes)
        self.machine = MigrationMachine(self.move)
        self.mono_s = 100.0
        self.actions = self.machine.start(self.now())

    def now(self) -> m.Instant:
        return m.Instant(self.mono_s, 1_000_000 + self.mono_s * 1000)

    def feed(self, event: m.Event, *, after_s: float = 0.0) -> list[m.Action]:
        self.mono_s += after_s
        self.actions = self.machine.handle(event, self.now())
        return self.actions

    def request(self) -> m.Action:
        return self.actions[-1]

    def kinds(self) -> list[type]:
        return [type(a) for a in self.actions if not isinstance(a, m.Notify)]

    def started(self) -> Driver:
        assert isinstance(self.request(), m.PrepareDestination)
        assert isinstance(self.feed(m.DestinationPrepared())[-1], m.StartSource)
        assert isinstance(self.feed(m.SourceStarted())[-1], m.Poll)
        return self

    def samples(self, *samples: MigrationStats, after_s: float = 0.5) -> list[m.Action]:
        request = self.request()
        since = request.since if isinstance(request, m.Poll) else 0
        return self.feed(m.Progressed(samples, since + len(samples)), after_s=after_s)

    def outcome(self, status: str = "completed", **kw: object) -> list[m.Action]:
        done = m.SourceOutcome(status, stats=stats(S.COMPLETED, 1 << 30), **kw)  # type: ignore[arg-type]
        return self.feed(m.Progressed((), 0, done), after_s=0.5)

    @property
    def report(self) -> MigrationReport:
        report = self.machine.report
        assert report is not None
        assert isinstance(self.request(), m.Conclude)
        return report


def test_happy_precopy_reports_guest_felt_downtime() -> None:
    d = Driver().started()
    assert d.kinds() == [m.Poll]
    d.samples(stats(sent=100), stats(sent=200))
    assert d.kinds() == [m.Poll]
    d.outcome(last_heartbeat_ms=1_000_000 + 101_000, max_gap_ms=20)
    assert d.kinds() == [m.FinishDestination]
    d.feed(m.Arrived(first_heartbeat_ms=1_000_000 + 101_150, integrity=INTACT), after_s=0.2)
    assert d.kinds() == [m.Handoff]
    d.feed(m.HandedOff())
    report = d.report
    assert (report.status, report.running_on, report.error) == ("completed", "host-2", None)
    assert report.guest_downtime_ms == 150
    assert report.downtime_ms == 12
    assert report.integrity == INTACT
    assert report.is_success


def test_phases_shown_only_move_forward() -> None:
    d = Driver().started()
    d.samples(stats(S.ACTIVE, 1), stats(S.SETUP, 2))
    shown = [a.phase for a in d.actions if isinstance(a, m.Notify)]
    assert shown == [Phase.ACTIVE, Phase.ACTIVE]


def test_precopy_stall_cancels_and_keeps_guest_on_source() -> None:
    d = Driver().started()
    d.samples(stats(sent=100))
    d.samples(stats(sent=100), after_s=4.0)
    assert d.kinds() == [m.Poll]
    d.samples(stats(sent=100), after_s=1.0)
    assert d.kinds() == [m.CheckSides]  # quiet 5 s: is a QEMU dead?
    d.feed(m.SidesChecked(source_dead=False, destination_dead=False))
    assert d.kinds() == [m.Poll]
    d.samples(stats(sent=100), after_s=24.0)
    assert d.kinds() == [m.Poll]  # one check per quiet spell
    d.samples(stats(sent=100), after_s=2.0)
    assert d.kinds() == [m.CancelSource, m.Poll]
    d.outcome("cancelled")
    assert d.kinds() == [m.AbortDestination, m.CheckSides]
    d.feed(m.SidesChecked(source_dead=False, destination_dead=False))
    report = d.report
    assert (report.status, report.running_on, report.guest_alive) == ("failed", "host-1", True)
    assert report.error is not None
    assert "sent nothing for 30 s" in report.error


def test_quiet_copy_with_a_dead_destination_is_cancelled_at_once() -> None:
    d = Driver().started()
    d.samples(stats(S.NONE, stage=Stage.DISK_COPY, disk_copied=1 << 19))
    d.samples(stats(S.NONE, stage=Stage.DISK_COPY, disk_copied=1 << 19), after_s=5.0)
    assert d.kinds() == [m.CheckSides]
    d.feed(m.SidesChecked(source_dead=False, destination_dead=True))
    assert d.kinds() == [m.CancelSource, m.Poll]
    d.outcome("cancelled")
    d.feed(m.SidesChecked(False, True))
    report = d.report
    assert (report.status, report.running_on, report.guest_alive) == ("failed", "host-1", True)
    assert "destination QEMU on host-2 died during the disk copy" in (report.error or "")


def test_quiet_check_again_after_progress() -> None:
    d = Driver().started()
    d.samples(stats(sent=100))
    d.samples(stats(sent=100), after_s=5.0)
    d.feed(m.SidesChecked(False, False))
    d.samples(stats(sent=200), after_s=1.0)  # moved again
    d.samples(stats(sent=200), after_s=5.0)
    assert d.kinds() == [m.CheckSides]


def test_silence_outside_a_copy_is_not_checked() -> None:
    d = Driver().started()
    d.samples(stats(S.PRE_SWITCHOVER, 10))
    d.samples(stats(S.PRE_SWITCHOVER, 10), after_s=40.0)
    assert d.kinds() == [m.Poll]


def test_failed_precopy_with_dead_source_says_the_guest_is_lost() -> None:
    d = Driver().started()
    d.outcome("failed", error="socket closed")
    d.feed(m.SidesChecked(source_dead=True, destination_dead=False))
    assert d.report.guest_alive is False
    assert "died before the switchover (socket closed)" in (d.report.error or "")


def _prediction(strategy: str = "precopy") -> StrategyPrediction:
    return StrategyPrediction(strategy, True, 1000, 10, 1 << 30, 3, None, "")  # type: ignore[arg-type]


def test_deadline_missed_without_postcopy_cancels() -> None:
    d = Driver(goal=Goal(300, deadline_ms=1_000, allow_postcopy=False), prediction=_prediction())
    d.started()
    d.samples(stats(sent=100, total_ms=2_000, iterations=2))
    assert d.kinds() == [m.CancelSource, m.Poll]
    d.outcome("cancelled")
    d.feed(m.SidesChecked(False, False))
    assert "deadline" in (d.report.error or "")


def test_deadline_missed_with_postcopy_switches_once() -> None:
    d = Driver(goal=Goal(300, deadline_ms=1_000), prediction=_prediction(), uses_postcopy=True)
    d.started()
    d.samples(stats(sent=100, total_ms=2_000, iterations=2))
    assert d.kinds() == [m.StartPostcopy, m.Poll]
    d.samples(stats(sent=200, total_ms=2_500, iterations=2))
    assert d.kinds() == [m.Poll]


def test_a_switch_stalling_the_guest_past_the_goal_is_not_taken() -> None:
    """Switching would stall the guest ~900 ms against a 300 ms goal: auto cancels (the guest
    stays on the source); a move that cannot switch anyway runs on to its deadline."""
    stalling = replace(_prediction(), switch_felt_ms=900)
    d = Driver(goal=Goal(300, deadline_ms=1_000), prediction=stalling, uses_postcopy=True)
    d.started()
    d.samples(stats(sent=100, total_ms=2_000, iterations=2))
    assert d.kinds() == [m.CancelSource, m.Poll]
    d.outcome("cancelled")
    d.feed(m.SidesChecked(False, False))
    assert "would stall the guest ~900 ms" in (d.report.error or "")
    plain = Driver(goal=Goal(300, deadline_ms=1_000), prediction=stalling).started()
    plain.samples(stats(sent=100, total_ms=2_000, iterations=2))
    assert plain.kinds() == [m.Poll]


def test_a_switch_asked_for_as_qemu_completes_leaves_nothing_to_compare() -> None:
    """The held destination was released for the switch; QEMU completed before it said
    post-copy (the matrix, seed 55: a 2 GiB guest). The destination runs the guest already:
    comparing needs it paused, so the move finishes as after a post-copy."""
    d = Driver(
        goal=Goal(300, deadline_ms=1_000), prediction=_prediction(), uses_postcopy=True,
        held=True, verify=VerifyMode.SAMPLE,
    ).started()  # fmt: skip
    d.samples(stats(sent=100, total_ms=2_000, iterations=2))
    assert d.kinds() == [m.StartPostcopy, m.Poll]
    d.outcome()
    assert d.kinds() == [m.FinishDestination]
    d.feed(m.Arrived(1.0, INTACT))
    d.feed(m.HandedOff())
    assert d.report.status == "completed"
    assert d.report.handoff is not None
    assert "post-copy" in (d.report.handoff.note or "")


def test_a_held_precopy_is_compared() -> None:
    d = Driver(held=True, verify=VerifyMode.SAMPLE).started()
    d.samples(stats(sent=100))
    d.outcome()
    assert d.kinds() == [m.CompareCopies]


def test_hybrid_switches_after_the_first_pass() -> None:
    d = Driver(strategy="hybrid", uses_postcopy=True).started()
    d.samples(stats(sent=100, iterations=1))
    assert d.kinds() == [m.Poll]
    d.samples(stats(sent=200, iterations=2))
    assert d.kinds() == [m.StartPostcopy, m.Poll]
    d.samples(stats(sent=300, iterations=3))
    assert d.kinds() == [m.Poll]


def test_source_agent_lost_then_back() -> None:
    d = Driver().started()
    d.samples(stats(sent=100))
    d.feed(m.AgentLost("source", "connection refused"), after_s=1)
    assert d.kinds() == [m.Wait]
    d.feed(m.Tick(), after_s=1)
    assert d.request() == m.Poll(0, 0.5, None)  # a restarted agent numbers samples anew
    d.feed(m.AgentLost("source", "connection refused"), after_s=30)
    d.feed(m.Tick(), after_s=1)
    d.samples(stats(sent=200))
    d.feed(m.AgentLost("source", "refused"), after_s=50)  # away-time restarted by the answer
    assert d.kinds() == [m.Wait]


def test_source_agent_lost_for_good() -> None:
    d = Driver().started()
    d.feed(m.AgentLost("source", "refused"))
    d.feed(m.Tick(), after_s=1)
    d.feed(m.AgentLost("source", "refused"), after_s=61)
    report = d.report
    assert report.status == "failed"
    assert "did not answer for 60 s" in (report.error or "")
    assert m.AbortDestination not in d.kinds()  # the outcome is unknown: touch nothing


def test_disk_handover_then_completion() -> None:
    d = Driver().started()
    d.samples(stats(S.NONE, stage=Stage.DISK_COPY, disk_copied=1 << 19, total_ms=800))
    d.samples(stats(S.PRE_SWITCHOVER, 10, stage=Stage.DISK_SYNCED))
    assert d.kinds() == [m.HandOverDisk]
    d.feed(m.HandoverDone())
    assert d.kinds() == [m.Poll]
    d.samples(stats(S.PRE_SWITCHOVER, 10, stage=Stage.DISK_SYNCED))  # reported once more
    assert d.kinds() == [m.Poll]


def test_disk_handover_failure_cancels() -> None:
    d = Driver().started()
    d.samples(stats(S.PRE_SWITCHOVER, 10, stage=Stage.DISK_SYNCED))
    d.feed(m.HandoverFailed("export busy"))
    assert d.kinds() == [m.CancelSource, m.Poll]
    d.outcome("cancelled")
    d.feed(m.SidesChecked(False, False))
    assert d.report.error == "disk handover failed: export busy"
    assert d.report.running_on == "host-1"


def _in_postcopy(**changes: Any) -> Driver:
    """A post-copy past its switch: its first sample, then one that sent more."""
    d = Driver(strategy="postcopy", **changes).started()
    d.samples(stats(S.POSTCOPY_ACTIVE, 50), stats(S.POSTCOPY_ACTIVE, 100))
    return d


def test_the_switch_to_postcopy_may_be_quiet_longer() -> None:
    """QEMU reports post-copy while it still stops the guest and sends the discard bitmap and
    the device state (seconds on a big guest); a recovery begun then would fail the move."""
    d = Driver(strategy="postcopy").started()
    d.samples(stats(S.POSTCOPY_ACTIVE, 50))
    d.request()
    for _ in range(9):
        d.samples(stats(S.POSTCOPY_ACTIVE, 50), after_s=2.0)
        assert d.kinds() == [m.Poll]
    d.samples(stats(S.POSTCOPY_ACTIVE, 50), after_s=2.0)  # 20 s: a switch that hangs
    assert d.kinds() == [m.RecoverPostcopy]


def _completes_unrecovered(d: Driver) -> None:
    """QEMU completes, the guest arrives, the source is handed off; no recovery was needed."""
    d.outcome()
    d.feed(m.Arrived(1.0, INTACT))
    d.feed(m.HandedOff())
    assert d.report.status == "completed"
    assert d.report.recoveries == 0


def test_a_recovery_waits_for_a_switch_the_destination_has_not_finished() -> None:
    """The switch sent its first bytes (the discard bitmap), then went quiet while the
    destination loads the device state: pausing then fails the migration. Asked to recover, the
    sides find the destination not started yet; the machine waits another switch allowance."""
    d = Driver(strategy="postcopy").started()
    d.samples(stats(S.POSTCOPY_ACTIVE, 50))
    d.request()
    d.samples(stats(S.POSTCOPY_ACTIVE, 60), after_s=0.5)  # the switch's own bytes
    d.request()
    d.samples(stats(S.POSTCOPY_ACTIVE, 60), after_s=2.0)
    assert d.kinds() == [m.RecoverPostcopy]
    d.feed(m.NotBroken("the destination has not started the guest yet"))
    assert d.kinds() == [m.Poll]
    for _ in range(9):  # quiet again: the switch's allowance, not a broken link's
        d.samples(stats(S.POSTCOPY_ACTIVE, 60), after_s=2.0)
        assert d.kinds() == [m.Poll]
    d.samples(stats(S.POSTCOPY_ACTIVE, 5_000), after_s=1.0)  # the pull runs
    assert d.kinds() == [m.Poll]
    _completes_unrecovered(d)


def test_a_switch_that_never_ends_is_recovered_after_all() -> None:
    d = Driver(strategy="postcopy").started()
    d.samples(stats(S.POSTCOPY_ACTIVE, 50))
    d.request()
    d.samples(stats(S.POSTCOPY_ACTIVE, 50), after_s=20.0)
    for _ in range(5):
        assert d.kinds() == [m.RecoverPostcopy]
        d.feed(m.NotBroken("the source's link to the destination works"))
        assert d.kinds() == [m.Poll]
        d.samples(stats(S.POSTCOPY_ACTIVE, 50), after_s=20.0)
    assert d.kinds() == [m.RecoverPostcopy]
    d.feed(
        m.NotBroken("the source's link to the destination works")
    )  # the sixth: treated as a failed attempt
    assert d.kinds() == [m.CheckSides]


def test_postcopy_link_cut_recovers() -> None:
    d = _in_postcopy()
    assert d.request() == m.Poll(2, 0.5, 3.5)  # fails fast behind a broken link
    d.samples(stats(S.POSTCOPY_ACTIVE, 100), after_s=1.0)
    assert d.kinds() == [m.Poll]  # a second's silence is not yet a cut link
    d.samples(stats(S.POSTCOPY_ACTIVE, 100), after_s=1.0)
    assert d.kinds() == [m.RecoverPostcopy]
    assert d.request() == m.RecoverPostcopy(1, 3.0)
    d.feed(m.RecoveryTried(False, "timeout"), after_s=3)
    assert d.kinds() == [m.CheckSides]
    d.feed(m.SidesChecked(False, False))
    assert d.request() == m.Wait(0.5)
    d.feed(m.Tick(), after_s=0.5)
    assert d.request() == m.RecoverPostcopy(2, 3.0)
    d.feed(m.RecoveryTried(True))
    assert d.kinds() == [m.Poll]
    d.samples(stats(S.POSTCOPY_PAUSED, 100), after_s=0.2)  # queued before the recovery
    assert d.kinds() == [m.Poll]
    d.outcome()
    d.feed(m.Arrived(1.0, INTACT))
    d.feed(m.HandedOff())
    assert d.report.recoveries == 1
    assert d.report.status == "completed"


def test_postcopy_with_every_page_sent_is_quiet_not_broken() -> None:
    """The source sent every page and waits for the destination to finish: silence then is
    normal (a loaded TCG host took seconds), not a cut link."""
    d = _in_postcopy()
    d.request()
    d.samples(stats(S.POSTCOPY_ACTIVE, 100, remaining=0), after_s=5.0)
    assert d.kinds() == [m.Poll]
    _completes_unrecovered(d)


def test_postcopy_unrecovered_gives_up_and_keeps_both() -> None:
    d = _in_postcopy(recovery=RecoveryPolicy(limit_s=5.0))
    d.samples(stats(S.POSTCOPY_PAUSED, 100))
    while isinstance(request := d.request(), m.RecoverPostcopy | m.Wait):
        if isinstance(request, m.Wait):
            d.feed(m.Tick(), after_s=request.seconds)
        else:
            d.feed(m.RecoveryTried(False, "no route"), after_s=1)
            d.feed(m.SidesChecked(False, False))
    report = d.report
    assert (report.status, report.running_on, report.guest_alive) == ("failed", "host-2", False)
    assert "not recovered within 5 s" in (report.error or "")
    kinds = {type(a) for a in d.actions}
    assert m.AbortDestination not in kinds


@pytest.mark.parametrize(
    ("source_dead", "dead_host"), [(True, "host-1"), (False, "host-2")], ids=["src", "dst"]
)
def test_postcopy_side_dies_during_recovery(source_dead: bool, dead_host: str) -> None:
    d = _in_postcopy()
    d.samples(stats(S.POSTCOPY_PAUSED, 100))
    d.feed(m.RecoveryTried(False, "refused"))
    d.feed(m.SidesChecked(source_dead=source_dead, destination_dead=not source_dead))
    assert d.machine.lost_host == dead_host
    assert d.report.guest_alive is False
    assert f"QEMU on {dead_host} died during post-copy" in (d.report.error or "")


def test_source_agent_away_while_postcopy_runs_on() -> None:
    d = _in_postcopy()
    d.feed(m.AgentLost("source", "refused"))
    assert d.request() == m.QueryIncoming(3.0)
    d.feed(m.IncomingStatus(S.POSTCOPY_ACTIVE))
    assert d.kinds() == [m.Wait]
    d.feed(m.Tick(), after_s=1)
    d.feed(m.AgentLost("source", "refused"))
    d.feed(m.IncomingStatus(S.COMPLETED))
    assert d.kinds() == [m.FinishDestination]


def test_failed_postcopy_keeps_both_halves() -> None:
    d = _in_postcopy()
    d.outcome("failed", error="boom")
    assert d.kinds() == [m.CheckSides]  # no abort: the destination holds the guest
    d.feed(m.SidesChecked(False, False))
    assert "split between host-1 and host-2" in (d.report.error or "")


def test_destination_dies_after_completion_source_takes_guest_back() -> None:
    d = Driver().started()
    d.outcome()
    d.feed(m.ArrivalFailed("QEMU exited"))
    assert d.kinds() == [m.DropDestination]
    d.feed(m.DestinationDropped(True))
    assert d.kinds() == [m.ResumeSource]
    d.feed(m.SourceResumed(INTACT))
    report = d.report
    assert (report.status, report.running_on, report.integrity) == ("failed", "host-1", INTACT)


def test_destination_kept_after_completion_points_at_reconcile() -> None:
    d = Driver().started()
    d.outcome()
    d.feed(m.ArrivalFailed("verify timed out"))
    d.feed(m.DestinationDropped(False))
    report = d.report
    assert (report.status, report.guest_alive) == ("completed", False)
    assert "reconcile" in (report.error or "")


def test_destination_agent_restarting_at_arrival_is_waited_for() -> None:
    d = Driver().started()
    d.outcome()
    d.feed(m.AgentLost("destination", "refused"))
    assert d.kinds() == [m.Wait]
    d.feed(m.Tick(), after_s=1)
    assert d.kinds() == [m.FinishDestination]
    d.feed(m.Arrived(1.0, INTACT))
    assert d.kinds() == [m.Handoff]


def test_postcopy_arrival_failure_never_drops_the_destination() -> None:
    d = _in_postcopy()
    d.outcome()
    d.feed(m.ArrivalFailed("verify failed"))
    assert d.kinds() == [m.Conclude]
    assert d.report.running_on == "host-2"


@pytest.mark.parametrize("where", ["preparing", "starting"])
def test_interrupt_before_copying_removes_the_destination(where: str) -> None:
    d = Driver()
    if where == "starting":
        d.feed(m.DestinationPrepared())
    d.feed(m.Interrupted())
    assert d.kinds() == [m.AbortDestination, m.Conclude]
    assert d.report.status == "cancelled"


def test_interrupt_during_precopy_cancels_and_rolls_back() -> None:
    d = Driver().started()
    d.samples(stats(sent=100))
    d.feed(m.Interrupted())
    assert d.kinds() == [m.CancelSource, m.Poll]
    d.outcome("cancelled")
    assert d.kinds() == [m.AbortDestination, m.CheckSides]
    d.feed(m.SidesChecked(False, False))
    assert d.report.running_on == "host-1"


def test_interrupt_during_precopy_that_completed_anyway_finishes_the_switch() -> None:
    d = Driver().started()
    d.feed(m.Interrupted())
    d.outcome()
    assert d.kinds() == [m.FinishDestination]
    d.feed(m.Arrived(1.0, INTACT))
    d.feed(m.HandedOff())
    assert d.report.running_on == "host-2"


def test_interrupt_during_postcopy_never_cancels() -> None:
    d = _in_postcopy()
    d.feed(m.Interrupted())
    assert d.kinds() == [m.Poll]
    d.outcome()
    assert d.kinds() == [m.FinishDestination]


def test_interrupt_during_recovery_reports_and_touches_nothing() -> None:
    d = _in_postcopy()
    d.samples(stats(S.POSTCOPY_PAUSED, 100))
    d.feed(m.Interrupted())
    assert d.kinds() == [m.Conclude]
    assert "reconcile" in (d.report.error or "")


def test_interrupt_at_arrival_finishes_the_arrival() -> None:
    d = Driver().started()
    d.outcome()
    assert d.feed(m.Interrupted()) == [m.FinishDestination()]  # asked again, shielded
    d.feed(m.Arrived(1.0, INTACT))
    assert d.kinds() == [m.Handoff]
    assert d.feed(m.Interrupted()) == [m.Handoff()]
    d.feed(m.HandedOff())
    assert d.report.status == "completed"


def test_interrupt_while_concluding_checks_the_sides_again() -> None:
    d = Driver().started()
    d.outcome("failed", error="boom")
    assert d.feed(m.Interrupted())[-1] == m.CheckSides(3.0)
    d.feed(m.SidesChecked(False, False))
    assert d.report.running_on == "host-1"


def test_follow_mode_ends_at_qemus_outcome() -> None:
    d = Driver(mode=m.Mode.FOLLOW, first_attempt=10_000)
    assert d.kinds() == [m.Poll]
    d.samples(stats(S.POSTCOPY_PAUSED, 100))
    assert d.request() == m.RecoverPostcopy(10_000, 3.0)
    d.feed(m.RecoveryTried(True))
    d.outcome()
    assert d.kinds() == [m.Conclude]
    assert (d.report.status, d.report.running_on, d.report.recoveries) == (
        "completed",
        "host-2",
        1,
    )


def test_an_answer_to_no_request_is_refused() -> None:
    d = Driver()
    with pytest.raises(StateError):
        d.feed(m.HandoverDone())


def test_done_refuses_more_events() -> None:
    d = Driver()
    d.feed(m.Interrupted())
    with pytest.raises(StateError):
        d.feed(m.Tick())
