"""What a new leader does with the jobs the previous one left ``running`` (decisions only: the
store is SQLite here, where a dead pid orphans a job as an older lease epoch does on
PostgreSQL; tests/integration/test_serve_failover.py runs a real takeover)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from deadpid import dead_pid
from vmferry.service.api import JobState
from vmferry.service.auth import Principal, Role
from vmferry.service.store import ServiceJob, SqliteStore
from vmferry.service.supervisor import Work
from vmferry.service.takeover import hand_over, take_over

WHO = Principal("operator", Role.OPERATOR)


def test_the_new_leader_resumes_evacuations_and_closes_the_rest(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "history.db")
    jobs = store.job_store()
    dead = dead_pid()

    def service_job(kind: str, moves: list[tuple[str, str, str]] | None) -> tuple[int, int | None]:
        job = store.create_job(kind, {"host": "h1"}, WHO)
        if moves is None:
            return job.id, None
        controller = jobs.begin(kind, "h1", moves, {"request": None}, pid=dead)
        store.update_job(job.id, JobState.RUNNING, controller_job=controller)
        return job.id, controller

    evacuation, evacuating = service_job("evacuate", [("a", "h1", "h2")])
    balance, _ = service_job("balance", [("b", "h3", "h4")])
    migration, _ = service_job("migrate", None)
    ended, finished = service_job("evacuate", [("c", "h5", "h6")])
    assert finished is not None
    jobs.end(finished, "completed", {"state": "completed", "moves": []})
    finished_already = store.create_job("reconcile", {}, WHO)
    store.update_job(finished_already.id, JobState.COMPLETED, result=[])

    started: list[tuple[int, str]] = []

    def start(job: ServiceJob, work: Work) -> None:
        started.append((job.id, job.kind))

    taken = asyncio.run(take_over(store, start, None))
    assert taken == [balance, evacuation]  # newest first, as the store lists them
    assert started == [(balance, "balance"), (evacuation, "evacuate")]
    assert {j.id for j in store.jobs(state=JobState.RUNNING)} == {evacuation, balance}
    assert jobs.job(evacuating or 0).state == "interrupted"  # claimed by the work, not here
    closed = store.job(migration)
    assert closed.state is JobState.INTERRUPTED
    assert closed.error is not None
    assert "previous leader" in closed.error["message"]
    assert (store.job(ended).state, store.job(ended).result) == (
        JobState.COMPLETED,
        {"state": "completed", "moves": []},
    )
    assert store.job(finished_already.id).state is JobState.COMPLETED


def test_a_stopping_leader_hands_over_what_the_next_one_can_go_on_with(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "history.db")
    jobs = store.job_store()
    stopped = []
    for kind, controller_state in (
        ("evacuate", "interrupted"),  # handed over
        ("balance", "failed"),  # its moves failed: nothing to go on with
        ("migrate", None),  # no controller job: a single move is not resumed
    ):
        job = store.create_job(kind, {}, WHO)
        controller = None
        if controller_state is not None:
            controller = jobs.begin(kind, f"h-{kind}", [("a", f"h-{kind}", "h2")], {})
            jobs.end(controller, controller_state)
        error = {"code": "unavailable", "message": "the service stopped"}
        store.update_job(job.id, JobState.INTERRUPTED, error=error, controller_job=controller)
        stopped.append(job.id)
    ended = store.create_job("evacuate", {}, WHO)
    store.update_job(ended.id, JobState.COMPLETED, result={})
    stopped.append(ended.id)

    assert hand_over(store, stopped) == [stopped[0]]
    handed = store.job(stopped[0])
    assert (handed.state, handed.error) == (JobState.RUNNING, None)
    assert [store.job(i).state for i in stopped[1:]] == [
        JobState.INTERRUPTED,
        JobState.INTERRUPTED,
        JobState.COMPLETED,
    ]
    assert hand_over(store, stopped) == []  # once
