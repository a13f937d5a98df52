"""What a controller does as it becomes the leader (PostgreSQL, :mod:`vmferry.service.lease`):
the jobs the previous leader was running go on, here, from their records.

:func:`take_over` first marks every controller job of an older lease epoch ``interrupted``
(the previous leader is gone: ownership follows the lease, not a pid). Each service job left
``running`` is then either taken over or closed:

- an evacuation or a balance with a controller job: taken over under the same service job and
  the same controller job, as ``vmferry job resume`` goes on with one
  (:func:`vmferry.service.host_jobs.resume_work`): claimed, its moves left in flight settled as
  ``reconcile`` does (one intact running copy each; a migration still under way followed to its
  end), what is left planned on fresh measurements and run, the job ended;
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

from vmferry.service.api import ErrorCode, JobState
from vmferry.service.host_jobs import resume_work
from vmferry.service.store import ServiceJob, ServiceStore
from vmferry.service.supervisor import Work

__all__ = ["RESUMABLE_KINDS", "hand_over", "take_over"]

logger = logging.getLogger(__name__)

RESUMABLE_KINDS = frozenset({"evacuate", "balance"})
_SETTLE_S = 300.0  # how long settling a job's moves may wait for migrations in flight


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
            start(job, resume_work(lab_dir, record.id, _SETTLE_S))
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
