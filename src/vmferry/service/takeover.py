"""What a controller does as it becomes the leader (PostgreSQL, :mod:`vmferry.service.lease`):
the jobs the previous leader was running go on, here, from their records.

:func:`take_over` first marks every controller job of an older lease epoch ``interrupted``
(the previous leader is gone: ownership follows the lease, not a pid). Each service job left
``running`` is then either taken over or closed:

- an evacuation or a balance with a controller job: taken over under the same service job and
  the same controller job (:func:`resume_work`): claimed, its moves left in flight settled as
  ``reconcile`` does (one intact running copy each; a migration still under way followed to its
  end), what is left planned on fresh measurements and run, the job ended as the CLI's
  ``vmferry job resume`` ends it;
- one whose controller job ended (the leader died before it said so): ended as that job;
- anything else (a single migration, a reconcile, a job still planning): ``interrupted``, as a
  restarted embedded service leaves it (``vmferry reconcile`` settles a move it left).

A leader stopped on purpose (SIGTERM) winds its moves down as any service does, then hands its
evacuations and balances over (:func:`hand_over`): ``running`` again in the shared database,
and its lease given up, so the next leader goes on with them at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vmferry.controller.cluster import Cluster
from vmferry.controller.inventory import Inventory
from vmferry.controller.job_resume import Settled, recorded_request, replan, settle
from vmferry.controller.job_runner import JobResult, MoveResult, run_plan
from vmferry.controller.jobs import JobRecord, JobStore
from vmferry.core.cluster_model import Move
from vmferry.core.job_resume import job_outcome
from vmferry.core.model import MigrationStats
from vmferry.core.phases import Phase
from vmferry.service.api import ErrorCode, JobState
from vmferry.service.store import ServiceJob, ServiceStore
from vmferry.service.supervisor import JobContext, Outcome, Work

__all__ = ["RESUMABLE_KINDS", "hand_over", "resume_work", "take_over"]

logger = logging.getLogger(__name__)

RESUMABLE_KINDS = frozenset({"evacuate", "balance"})
_SETTLE_S = 300.0  # how long settling a job's moves may wait for migrations in flight


class _Observer:
    """A resumed job's moves as events and metrics (a job runner's observer)."""

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx

    def started(self, move: Move, cap_bps: float | None, at_s: float) -> None:
        self.ctx.progress(move.name, Phase.PREPARING, None)

    def progress(self, vm: str, phase: Phase, stats: MigrationStats | None) -> None:
        self.ctx.progress(vm, phase, stats)

    def ended(self, result: MoveResult) -> None:
        if result.report is not None:
            self.ctx.metrics.observe_report(result.report)


def _give_back(store: JobStore, job: int, error: BaseException, *, ran: bool) -> None:
    """A resume stopped by ``error``: ``interrupted`` again (a later leader takes it over)
    unless its moves ran and failed otherwise than by being interrupted."""
    stopped = not ran or isinstance(error, asyncio.CancelledError)
    store.end(job, "interrupted" if stopped else "failed", {"error": str(error) or repr(error)})


async def _carry_on(
    ctx: JobContext, cluster: Cluster, store: JobStore, record: JobRecord
) -> tuple[list[Settled], JobResult | None]:
    """Settle the moves ``record`` left in flight, plan what is left, run it."""
    history = ctx.store.history(ctx.who.asked_by)
    try:
        settled = await settle(cluster, store, record, wait_s=_SETTLE_S)
        plan = await replan(cluster, store, record, recorded_request(record), history, settled)
    except BaseException as error:  # recorded (one quick write), then raised on
        _give_back(store, record.id, error, ran=False)
        raise
    if plan is None:
        return settled, None
    store.extend(record.id, [(m.name, m.source, m.destination) for m in plan.moves], plan.to_json())
    try:
        result = await run_plan(
            cluster, plan, store, record.id, history=history, observer=_Observer(ctx)
        )
    except BaseException as error:
        _give_back(store, record.id, error, ran=True)
        raise
    return settled, result


def resume_work(lab_dir: Path | None, controller_job: int) -> Work:
    """Go on with the interrupted controller job ``controller_job`` (see the module
    docstring); its result is the job result, with what settling found (``settled``)."""

    async def work(ctx: JobContext) -> Outcome:
        store = ctx.store.job_store()
        record = store.claim(controller_job)
        logger.info("job.resuming %s: controller job %s", ctx.job, record.id)
        try:
            async with Cluster(Inventory.load(lab_dir)) as cluster:
                settled, result = await _carry_on(ctx, cluster, store, record)
        except BaseException as error:  # not given back yet (no lab, say): given back now
            if store.job(record.id).state == "running":
                _give_back(store, record.id, error, ran=False)
            raise
        state = job_outcome([m.state for m in store.job(record.id).moves])
        ran: dict[str, Any] = (
            result.to_json()
            if result is not None
            else {"schema": 1, "job": record.id, "makespan_s": 0.0, "moves": []}
        )
        report = {
            **ran,
            "kind": record.kind,
            "host": record.host,
            "state": state,
            "resumed": True,
            "settled": [s.to_json() for s in settled],
        }
        store.end(record.id, state, report)
        done = JobState.COMPLETED if state == "completed" else JobState.FAILED
        return Outcome(done, report, record.id)

    return work


def _close(store: ServiceStore, job: ServiceJob, why: str) -> None:
    store.update_job(
        job.id, JobState.INTERRUPTED, error={"code": str(ErrorCode.UNAVAILABLE), "message": why}
    )


async def take_over(
    store: ServiceStore,
    start: Callable[[ServiceJob, Work], None],
    lab_dir: Path | None,
) -> list[int]:
    """Take over the jobs the previous leader left (see the module docstring).

    Args:
        start: runs a work for a service job (:meth:`Supervisor.take_over`).

    Returns:
        The service jobs taken over.

    Raises:
        FerryError: the database cannot be written (or the lease was lost meanwhile).
    """
    jobs = store.job_store()
    orphans = await asyncio.to_thread(jobs.settle_orphans)
    if orphans:
        logger.warning("service.orphaned controller job(s) %s: their leader is gone", orphans)
    taken = []
    for job in await asyncio.to_thread(store.jobs, 1_000_000, JobState.RUNNING):
        record = None if job.controller_job is None else jobs.job(job.controller_job)
        if job.kind in RESUMABLE_KINDS and record is not None and record.state == "interrupted":
            start(job, resume_work(lab_dir, record.id))
            taken.append(job.id)
        elif record is not None and record.state in ("completed", "failed"):
            # It ended, and its leader died before it said so in the service's own record.
            ended = JobState.COMPLETED if record.state == "completed" else JobState.FAILED
            store.update_job(job.id, ended, result=record.report)
        else:
            _close(store, job, "its controller (the previous leader) died; nothing resumes it")
    return taken


def hand_over(store: ServiceStore, stopped: Sequence[int]) -> list[int]:
    """Of the service jobs a stopping leader just wound down (``stopped``), those the next
    leader can go on with (an evacuation or a balance whose controller job is ``interrupted``)
    are ``running`` again; their ids.

    Raises:
        FerryError: the database cannot be written (or the lease is no longer this one's).
    """
    controller = store.job_store()
    handed = []
    for job in (store.job(i) for i in stopped):
        if job.state is not JobState.INTERRUPTED or job.kind not in RESUMABLE_KINDS:
            continue
        if job.controller_job is None:
            continue
        if controller.job(job.controller_job).state == "interrupted" and store.reopen(job.id):
            handed.append(job.id)
    return handed
