"""Pages rewritten unchanged: measured from a move's progress, learnt by the next plan, and what
the pre-copy model does with them (vmferry.core.blind, vmferry.core.precopy_loop)."""

from __future__ import annotations

import dataclasses
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from vmferry.controller.history import History
from vmferry.controller.plan import calibration_from, learnt_blind
from vmferry.core.blind import (
    BLIND_FLOOR_BPS,
    Learnt,
    learnt_rewrites,
    rewritten_unchanged_bps,
    stalled_on_rewrites,
)
from vmferry.core.calibration import Calibration
from vmferry.core.measurement import Measurement
from vmferry.core.model import MigrationReport
from vmferry.core.precopy_loop import first_pass_dirtied, simulate
from vmferry.core.predict import predict
from vmferry.core.strategy import Progress
from vmferry.core.transfer import Rates

_GIB = 1 << 30
_CAL = Calibration.default()


def _at(ms: int, syncs: int, zeros: int, postcopy: bool = False) -> Progress:
    return Progress(ms, 0, 0, 0, 0, syncs, None, is_postcopy=postcopy, zero_pages=zeros)


def _guest(blind_bps: int, **kwargs: object) -> Measurement:
    fields: dict[str, object] = {
        "ram_bytes": _GIB,
        "zero_fraction": 0.9,
        "compress_ratio": 3.0,
        "dirty_rate_bps": 100_000,
        "bandwidth_bps": 25_000_000,  # 200 Mbit/s
        "hot_bytes": 300_000,
        "blind_dirty_bps": blind_bps,
    }
    fields.update(kwargs)
    return Measurement(**fields)  # type: ignore[arg-type]


def test_the_zero_pages_resent_after_the_first_pass_are_the_rewrites() -> None:
    # The first pass's zero pages, and its tail sent after sync 2, do not count: 600k pages in
    # the 2 s from sync 3 on do.
    progress = [_at(9_000, 2, 0), _at(10_000, 3, 250_000), _at(12_000, 40, 850_000)]
    assert rewritten_unchanged_bps(progress) == 600_000 * 4096 // 2


@pytest.mark.parametrize(
    "progress",
    [
        [],
        [_at(9_000, 2, 100), _at(12_000, 2, 200)],  # the first pass's tail only
        [_at(9_000, 3, 100), _at(9_050, 4, 200)],  # iterated too briefly to tell
        [_at(9_000, 3, 100), _at(9_500, 3, 200)],  # no sync in between
        [_at(9_000, 3, 100), _at(12_000, 3, 900_000, postcopy=True)],  # post-copy pulls
    ],
)
def test_moves_that_did_not_iterate_tell_nothing(progress: list[Progress]) -> None:
    assert rewritten_unchanged_bps(progress) is None


def test_a_plan_takes_the_highest_recent_rate_over_the_floor() -> None:
    fast, slow = 1_200_000_000, BLIND_FLOOR_BPS - 1

    def rate(observed: list[tuple[float, int]]) -> int:
        return learnt_rewrites([(age_s, bps, False) for age_s, bps in observed]).rate_bps

    assert rate([]) == 0
    assert rate([(10.0, slow)]) == 0  # noise: the first pass's zero tail
    assert rate([(100.0, fast), (10.0, 50_000_000)]) == fast
    assert rate([(2 * 86_400.0, fast), (10.0, 0)]) == 0  # too old
    assert rate([(60.0, fast)] + [(10.0, 0)] * 5) == 0  # five newer moves say 0


def test_a_stall_on_rewrites_is_remembered_while_the_rate_is() -> None:
    assert stalled_on_rewrites(500_000_000, got_across=False)
    assert not stalled_on_rewrites(500_000_000, got_across=True)
    assert not stalled_on_rewrites(BLIND_FLOOR_BPS - 1, got_across=False)  # another cause
    assert not stalled_on_rewrites(None, got_across=False)
    stalled, converged = (60.0, 450_000_000, True), (30.0, 300_000_000, False)
    assert learnt_rewrites([stalled, converged]) == Learnt(450_000_000, True)
    assert learnt_rewrites([converged]) == Learnt(300_000_000, False)
    assert learnt_rewrites([(2 * 86_400.0, 450_000_000, True), converged]).keeps_pace is False


def test_rewrites_that_stalled_a_precopy_are_taken_at_qemus_pace_whatever_their_rate() -> None:
    # Under QEMU's rescan rate by half: the rate alone says they settle low.
    zeroing = _guest(int(0.3 * _CAL.zero_rescan_bps), dirty_is_cpu_bound=True)
    rates = Rates.plain(zeroing, _CAL)
    by_rate = simulate(zeroing, 150, rates)
    seen_stalling = dataclasses.replace(zeroing, blind_keeps_pace=True)
    stalled = simulate(seen_stalling, 150, rates)
    assert by_rate.converges
    assert stalled.converges
    assert stalled.unchanged_bytes > 2 * by_rate.unchanged_bytes
    note = predict("precopy", seen_stalling, downtime_limit_ms=150, cal=_CAL).note
    assert "rewritten unchanged" in note
    # A slow writer leaves well under a MiB a round (a CI run's 40 MiB/s): still named.
    slow = _guest(40 << 20, dirty_is_cpu_bound=True)
    assert "rewritten unchanged" in predict("precopy", slow, downtime_limit_ms=150, cal=_CAL).note
    # Multifd's channels find the zero pages: the rewrites do not hold it back.
    assert predict("multifd", seen_stalling, downtime_limit_ms=150, cal=_CAL).converges


def test_a_zeroing_loop_faster_than_qemu_costs_precopy_rounds_and_a_longer_pause() -> None:
    calm = _guest(0)
    zeroing = _guest(int(1.3 * _CAL.zero_rescan_bps), dirty_is_cpu_bound=True)
    quiet = predict("precopy", calm, downtime_limit_ms=250, cal=_CAL)
    busy = predict("precopy", zeroing, downtime_limit_ms=250, cal=_CAL)
    assert quiet.converges
    assert busy.converges
    assert (busy.iterations or 0) > (quiet.iterations or 0)
    assert (busy.downtime_ms or 0) > (quiet.downtime_ms or 0)
    assert "rewritten unchanged" in busy.note


def test_a_zeroing_loop_at_qemus_pace_converges_once_priced_with_a_round_pending() -> None:
    # QEMU's re-send rate is capped by its own: a move sees such a loop at about that rate.
    seen = _guest(int(0.98 * _CAL.zero_rescan_bps), dirty_is_cpu_bound=True)
    rates = Rates.plain(seen, _CAL)
    run = simulate(seen, 120, rates)
    calm = simulate(_guest(0), 120, rates)
    # QEMU's own threshold never lets it switch; vmferry tells it what they cost once three
    # syncs from the third show them (ZeroPricing), and it switches at the next.
    assert run.converges
    assert run.syncs >= 7 > calm.syncs
    # Paused, one round of them pending: ~20 ms at QEMU's rate (the lab: 21-26 ms in all).
    pending_ms = run.unchanged_bytes / rates.zero_rescan_bps * 1000
    assert 10 <= pending_ms <= 40, pending_ms
    assert run.final_s > calm.final_s
    # auto-converge's throttle slows the loop below QEMU's pace: it converges too.
    assert predict("auto-converge", seen, downtime_limit_ms=120, cal=_CAL).converges


def test_a_paced_zero_writer_converges_and_its_rewrites_cost_no_link_time() -> None:
    paced = _guest(25_000_000)  # zeros at the link's rate
    rates = Rates.plain(paced, _CAL)
    run = simulate(paced, 250, rates)
    assert run.converges
    assert run.unchanged_bytes > 0
    # Paused, they take QEMU's rescan, not the link: a few ms at most.
    assert run.unchanged_bytes / rates.zero_rescan_bps < 0.01
    assert run.final_s < simulate(_guest(0), 250, rates).final_s + 0.01


def test_rewrites_count_against_the_threshold_so_hybrid_switches() -> None:
    calm, paced = _guest(0), _guest(25_000_000)
    assert "finishes as a pre-copy" in predict("hybrid", calm, downtime_limit_ms=250, cal=_CAL).note
    switched = predict("hybrid", paced, downtime_limit_ms=250, cal=_CAL)
    assert "post-copy pulls" in switched.note
    # The guest faults on the pages rewritten during the pass too.
    first = first_pass_dirtied(paced, Rates.plain(paced, _CAL))
    assert (
        first.touched_share > 10 * first_pass_dirtied(calm, Rates.plain(calm, _CAL)).touched_share
    )
    # ... but they are zero pages, not in the queue it pulls behind: not a post-copy's stall.
    assert first.missing_share < 0.01
    assert switched.guest_downtime_ms is not None
    postcopy = predict("postcopy", paced, downtime_limit_ms=250, cal=_CAL).guest_downtime_ms
    assert postcopy is not None
    assert switched.guest_downtime_ms < postcopy / 2


def _report(vm: str, resent_zero_bps: int | None) -> MigrationReport:
    return MigrationReport(
        vm=vm, source="host-1", destination="host-2", running_on="host-2", strategy="precopy",
        status="completed", error=None, total_ms=5000, downtime_ms=20, guest_downtime_ms=None,
        transferred_bytes=1 << 20, iterations=3, predicted=None, integrity=None,
        guest_alive=True, resent_zero_bps=resent_zero_bps,
    )  # fmt: skip


def test_history_keeps_each_vms_rewrites_beside_its_moves(tmp_path: Path) -> None:
    history = History(tmp_path / "history.db")
    assert learnt_blind(history, "vm1") == Learnt(0, False)  # no database yet
    started = datetime.now(UTC) - timedelta(minutes=5)
    history.record(_report("vm1", 1_100_000_000), started)
    history.record(_report("vm1", None), started)  # a post-copy: measured nothing
    history.record(_report("vm2", 0), started)
    [(age_s, bps, stalled)] = history.resent_zero("vm1")
    assert bps == 1_100_000_000
    assert not stalled  # it got the guest across
    assert 290 <= age_s <= 330
    assert learnt_blind(history, "vm1") == Learnt(1_100_000_000, False)
    assert learnt_blind(history, "vm2") == Learnt(0, False)
    assert learnt_blind(None, "vm1") == Learnt(0, False)
    # A measurement of one VM, not a calibration sample.
    assert calibration_from(history, "lab") == Calibration.default()
    # A pre-copy cancelled with the guest still on the source stalled on them.
    cancelled = dataclasses.replace(
        _report("vm2", 400_000_000), status="failed", running_on="host-1"
    )
    history.record(cancelled, started)
    assert learnt_blind(history, "vm2") == Learnt(400_000_000, True)


def test_a_history_from_before_stalls_were_recorded_still_reads(tmp_path: Path) -> None:
    db = tmp_path / "history.db"
    with sqlite3.connect(db) as connection:
        connection.execute(
            "CREATE TABLE rewrites (vm TEXT NOT NULL, observed_at TEXT NOT NULL,"
            " resent_zero_bps BIGINT NOT NULL)"
        )
        connection.execute(
            "INSERT INTO rewrites VALUES ('vm1', ?, 900000000)",
            ((datetime.now(UTC) - timedelta(minutes=10)).isoformat(timespec="seconds"),),
        )
    history = History(db)
    assert learnt_blind(history, "vm1") == Learnt(900_000_000, False)
    history.record(_report("vm1", 800_000_000))
    assert [bps for _, bps, _ in history.resent_zero("vm1")] == [900_000_000, 800_000_000]


def test_reports_carry_the_rate() -> None:
    report = dataclasses.replace(_report("vm1", 123), iterations=9)
    assert report.to_json()["resent_zero_bps"] == 123
