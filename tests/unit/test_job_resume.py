"""Resuming a job whose controller died: what becomes of each recorded move given the copies
the agents hold (pure), and the job store's take-over of an interrupted job (one transaction:
only an interrupted job, only once, never onto another running job's hosts)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from deadpid import dead_pid
from vmferry.controller.evacuation import JobRequest
from vmferry.controller.job_resume import recorded_request
from vmferry.controller.jobs import JobConflict, JobNotResumable, JobStore, UnknownJob
from vmferry.core.errors import ConfigError
from vmferry.core.job_resume import (
    Fate,
    RecordedMove,
    given_up,
    job_outcome,
    resolve_move,
    resolve_moves,
)
from vmferry.core.reconcile import Copy


def _copies(spec: str) -> list[Copy]:
    """``"h1=migrated h2=incoming"`` as copies."""
    return [Copy(*part.split("=")) for part in spec.split()]


@pytest.mark.parametrize(
    ("kind", "recorded", "copies", "fate", "running_on", "record_state"),
    [
        # In flight when the controller died: reconcile settles it first.
        ("evacuate", "running", "h1=migrating h2=incoming", Fate.SETTLE, None, None),
        ("evacuate", "running", "h1=migrated h2=incoming", Fate.SETTLE, None, None),
        ("evacuate", "running", "h1=running h2=incoming", Fate.SETTLE, "h1", None),
        ("evacuate", "running", "h1=migrated h2=running", Fate.SETTLE, "h2", None),
        # Settled: where it runs says whether the move is done.
        ("evacuate", "running", "h2=running", Fate.MOVED, "h2", "completed"),
        ("evacuate", "running", "h1=running", Fate.AGAIN, "h1", "waiting"),
        ("evacuate", "completed", "h2=running", Fate.MOVED, "h2", None),
        ("evacuate", "completed", "h3=running", Fate.MOVED, "h3", None),
        ("maintenance-enter", "waiting", "h1=running", Fate.AGAIN, "h1", None),
        ("maintenance-enter", "failed", "h1=running", Fate.AGAIN, "h1", "waiting"),
        # Bringing VMs back to h1: done once they run there.
        ("bring-back", "running", "h1=running", Fate.MOVED, "h1", "completed"),
        ("bring-back", "running", "h2=running", Fate.AGAIN, "h2", "waiting"),
        # Nothing runs, or two copies do: the job cannot finish this move.
        ("evacuate", "running", "h1=stopped", Fate.LOST, None, "failed"),
        ("evacuate", "running", "h1=running h2=running", Fate.LOST, None, "failed"),
        ("evacuate", "waiting", "", Fate.GONE, None, "gone"),
    ],
)
def test_each_recorded_move_gets_a_fate(
    kind: str,
    recorded: str,
    copies: str,
    fate: Fate,
    running_on: str | None,
    record_state: str | None,
) -> None:
    host = "h1"
    destination = "h2" if kind != "bring-back" else "h1"
    source = "h1" if kind != "bring-back" else "h2"
    move = RecordedMove("a", source, destination, recorded)
    resolution = resolve_move(kind, host, move, _copies(copies))
    assert (resolution.fate, resolution.running_on, resolution.record_state) == (
        fate,
        running_on,
        record_state,
    )
    assert resolution.reason


def test_a_move_settled_elsewhere_than_planned_says_so() -> None:
    [r] = resolve_moves(
        "evacuate", "h1", [RecordedMove("a", "h1", "h2", "running")], {"a": _copies("h3=running")}
    )
    assert r.reason == "runs on h3 (planned: h2)"
    assert r.to_json()["fate"] == "moved"


def test_a_vm_no_agent_lists_is_gone() -> None:
    moves = [RecordedMove("a", "h1", "h2", "completed"), RecordedMove("b", "h1", "h2", "waiting")]
    fates = [r.fate for r in resolve_moves("evacuate", "h1", moves, {"a": _copies("h2=running")})]
    assert fates == [Fate.MOVED, Fate.GONE]


@pytest.mark.parametrize(
    ("states", "outcome"),
    [
        (["completed", "completed"], "completed"),
        (["completed", "gone"], "completed"),
        ([], "completed"),
        (["completed", "failed"], "failed"),
        (["completed", "waiting"], "failed"),
    ],
)
def test_the_job_ends_completed_only_when_every_move_did(states: list[str], outcome: str) -> None:
    assert job_outcome(states) == outcome


def test_only_an_interrupted_job_is_claimed_and_only_once(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "history.db")
    moves = [("a", "h1", "h2"), ("b", "h1", "h3")]
    dead = store.begin("evacuate", "h1", moves, {"request": {"bandwidth_mbps": 40}}, pid=dead_pid())
    alive = store.begin("evacuate", "h4", [("c", "h4", "h5")], {})
    with pytest.raises(UnknownJob, match="no job 99"):
        store.claim(99)
    with pytest.raises(JobNotResumable, match=rf"job {alive} is running: its controller \(pid"):
        store.claim(alive)
    store.move_state(dead, "a", "running")
    record = store.claim(dead)
    assert (record.state, record.pid) == ("running", os.getpid())
    assert [(m.vm, m.state) for m in record.moves] == [("a", "running"), ("b", "waiting")]
    with pytest.raises(JobNotResumable, match="is running"):
        store.claim(dead)  # a second resume while this one runs
    store.end(alive, "completed")
    with pytest.raises(JobNotResumable, match=f"job {alive} is completed: only an interrupted"):
        store.claim(alive)
    assert issubclass(JobNotResumable, ConfigError)  # exit 2: nothing moved
    assert issubclass(UnknownJob, ConfigError)
    assert recorded_request(record) == JobRequest("h1", bandwidth_mbps=40)


def test_a_claim_waits_for_the_hosts_another_job_took(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "history.db")
    dead = store.begin("evacuate", "h1", [("a", "h1", "h2")], {}, pid=dead_pid())
    other = store.begin("evacuate", "h3", [("c", "h3", "h2")], {})  # h2 is free again
    with pytest.raises(JobConflict, match=f"job {other} "):
        store.claim(dead)
    assert store.job(dead).state == "interrupted"
    store.end(other, "completed")
    assert store.claim(dead).state == "running"


def test_moves_planned_on_resume_join_the_same_job(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "history.db")
    job = store.begin("evacuate", "h1", [("a", "h1", "h2"), ("b", "h1", "h2")], {}, pid=dead_pid())
    store.move_state(job, "a", "completed", {"status": "completed"})
    store.move_state(job, "b", "failed", {"status": "failed"})
    store.claim(job)
    store.extend(job, [("b", "h1", "h3"), ("n", "h1", "h2")], {"moves": 2})
    record = store.job(job)
    assert [(m.vm, m.destination, m.state, m.report) for m in record.moves] == [
        ("a", "h2", "completed", {"status": "completed"}),
        ("b", "h3", "waiting", None),
        ("n", "h2", "waiting", None),
    ]
    assert record.hosts == ("h1", "h2", "h3")
    assert record.plan == {"moves": 2}
    held = store.begin("evacuate", "h5", [("x", "h5", "h6")], {})
    store.end(held, "completed")
    busy = store.begin("evacuate", "h7", [("y", "h7", "h8")], {})
    with pytest.raises(JobConflict):
        store.extend(job, [("b", "h1", "h8")], {})
    assert store.job(job).moves[1].destination == "h3"  # nothing recorded
    store.end(busy, "completed")
    shown = store.job(job).to_json(detail=True)
    assert shown["plan"] == {"moves": 2}
    assert shown["moves"][0] == {  # type: ignore[index]
        "vm": "a",
        "source": "h1",
        "destination": "h2",
        "state": "completed",
        "report": {"status": "completed"},
    }


def test_a_move_reconcile_gave_up_on_is_lost_for_the_job() -> None:
    [r] = resolve_moves(
        "evacuate", "h1", [RecordedMove("a", "h1", "h2", "running")], {"a": _copies("h2=incoming")}
    )
    assert r.fate is Fate.SETTLE
    lost = given_up(r, "the copy on h2 did not come up intact")
    assert (lost.fate, lost.record_state, lost.running_on) == (Fate.LOST, "failed", None)


@pytest.mark.parametrize(
    ("copies", "fate"),
    [
        ("h2=running", Fate.MOVED),  # where the balance sent it
        ("h1=running", Fate.AGAIN),  # the move did not happen: planned again, to h2
        ("h3=running", Fate.MOVED),  # moved off its source meanwhile: left there
    ],
)
def test_a_balance_wants_each_vm_off_its_source(copies: str, fate: Fate) -> None:
    move = RecordedMove("a", "h1", "h2", "running")
    assert resolve_move("balance", "cluster", move, _copies(copies)).fate is fate
