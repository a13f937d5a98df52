"""What reconciliation decides for each combination of copies a crash can leave."""

from __future__ import annotations

import pytest

from vmferry.core.reconcile import Copy, Step, StepKind, Verdict, decide


def _copies(**states: str) -> list[Copy]:
    return [Copy(host.replace("_", "-"), state) for host, state in states.items()]


def test_one_running_copy_is_left_alone() -> None:
    decision = decide("vm1", _copies(host_1="running"))
    assert decision.verdict is Verdict.OK
    assert decision.steps == ()
    assert decision.running_on == "host-1"


@pytest.mark.parametrize(
    ("states", "steps"),
    [
        # The source runs: a destination left waiting is dropped.
        ({"host_1": "running", "host_2": "incoming"}, [Step(StepKind.ABORT, "host-2")]),
        # The destination runs: the completed source is handed off.
        ({"host_1": "migrated", "host_2": "running"}, [Step(StepKind.HANDOFF, "host-1")]),
        # A QEMU that died next to a running copy: its record is forgotten.
        ({"host_1": "stopped", "host_2": "running"}, [Step(StepKind.FORGET, "host-1")]),
    ],
)
def test_leftovers_next_to_a_running_copy_are_removed(
    states: dict[str, str], steps: list[Step]
) -> None:
    decision = decide("vm1", _copies(**states))
    assert decision.verdict is Verdict.SETTLE
    assert list(decision.steps) == steps
    assert decision.running_on is not None


def test_completed_but_unfinished_migration_is_finished_before_the_handoff() -> None:
    decision = decide("vm1", _copies(host_1="migrated", host_2="incoming"))
    assert decision.verdict is Verdict.SETTLE
    assert list(decision.steps) == [
        Step(StepKind.FINISH, "host-2"),
        Step(StepKind.HANDOFF, "host-1"),
    ]


def test_completed_source_whose_destination_died_takes_the_guest_back() -> None:
    decision = decide("vm1", _copies(host_1="migrated", host_2="stopped"))
    assert list(decision.steps) == [
        Step(StepKind.RESUME, "host-1"),
        Step(StepKind.FORGET, "host-2"),
    ]


def test_destination_whose_source_died_is_finished_if_it_can_be() -> None:
    decision = decide("vm1", _copies(host_1="stopped", host_2="incoming"))
    assert list(decision.steps) == [
        Step(StepKind.FINISH, "host-2"),
        Step(StepKind.FORGET, "host-1"),
    ]


def test_migration_in_flight_is_waited_for_and_nothing_else_is_done() -> None:
    decision = decide("vm1", _copies(host_1="migrating", host_2="incoming"))
    assert decision.verdict is Verdict.IN_FLIGHT
    assert list(decision.steps) == [Step(StepKind.WAIT, "host-1")]


def test_no_copy_anywhere_is_reported_lost() -> None:
    decision = decide("vm1", _copies(host_1="stopped", host_2="stopped"))
    assert decision.verdict is Verdict.LOST
    assert decision.steps == ()
    assert "host-1" in decision.reason


@pytest.mark.parametrize(
    "states",
    [
        {"host_1": "running", "host_2": "running"},
        {"host_1": "incoming", "host_2": "incoming"},
        {"host_1": "migrated", "host_2": "migrated", "host_3": "incoming"},
    ],
)
def test_ambiguous_combinations_touch_nothing(states: dict[str, str]) -> None:
    decision = decide("vm1", _copies(**states))
    assert decision.verdict is Verdict.CONFLICT
    assert decision.steps == ()


def test_no_step_ever_starts_a_second_running_copy() -> None:
    """Across every combination of two hosts' states, a RESUME or FINISH is only decided when
    no copy runs, and only one of them."""
    states = ["running", "incoming", "migrating", "migrated", "stopped"]
    for a in states:
        for b in states:
            decision = decide("vm1", _copies(host_1=a, host_2=b))
            starts = [s for s in decision.steps if s.kind in (StepKind.RESUME, StepKind.FINISH)]
            if "running" in (a, b):
                assert not starts, (a, b, decision)
            assert len(starts) <= 1, (a, b, decision)
