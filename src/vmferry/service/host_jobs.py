"""The service's jobs on a host's maintenance and on jobs whose controller died:
``host maintenance enter|exit`` and ``job resume``, run as the in-process commands run them
(:mod:`vmferry.cli.hosts`, :mod:`vmferry.cli.jobs`), with their ``--json`` output as result.

``maintenance enter`` empties the host as one scheduled job and marks it ``maintenance`` once
it is empty (``entering`` until then); on a host whose emptying job was interrupted it resumes
that job instead. ``maintenance exit`` clears the mark (``bring_back``: moving back the VMs
``enter`` moved off). ``resume`` takes over an ``interrupted`` job under the service's process,
settles the moves its controller left in flight, plans what is left on fresh measurements and
runs it; one that cannot go on before its moves run gives the job back ``interrupted``.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmferry.controller.cluster import Cluster
from vmferry.controller.evacuation import JobRequest, plan_bring_back, plan_evacuation
from vmferry.controller.history import History
from vmferry.controller.inventory import Inventory
from vmferry.controller.job_resume import Settled, recorded_request, replan, settle
from vmferry.controller.job_runner import JobResult, run_plan
from vmferry.controller.jobs import HostMark, JobNotResumable, JobRecord, JobStore
from vmferry.controller.placing import live_cluster
from vmferry.core.errors import ConfigError
from vmferry.core.job_resume import EMPTYING_KINDS, job_outcome
from vmferry.service.api import JobState, MaintenanceBody
from vmferry.service.supervisor import JobContext, Outcome, Work
from vmferry.service.work import (
    JobObserver,
    evacuation_request,
    lab_cluster,
    nothing_moved,
    run_job,
)

__all__ = ["check_resumable", "maintenance_request", "maintenance_work", "resume_work"]

logger = logging.getLogger(__name__)

_RESUME_WAIT_S = 300.0  # a maintenance enter that resumes waits this long for moves in flight


def maintenance_request(lab_dir: Path | None, body: MaintenanceBody) -> JobRequest:
    """Raises: ConfigError: an unknown host, numbers out of range."""
    Inventory.load(lab_dir).host(body.host)
    return evacuation_request(body)


def check_resumable(store: JobStore, job: int) -> JobRecord:
    """The job ``job``, if a resume may take it (nothing changes).

    Raises:
        UnknownJob: no such job. JobNotResumable: its controller is alive, or it ended.
    """
    record = store.job(job)
    if record.state != "interrupted":
        raise JobNotResumable(job, record.state, record.pid)
    return record


def maintenance_work(lab_dir: Path | None, body: MaintenanceBody, request: JobRequest) -> Work:
    """``host maintenance enter|exit`` (see the module docstring)."""

    async def work(ctx: JobContext) -> Outcome:
        if body.action == "exit":
            return await _exit(ctx, lab_dir, request, body.bring_back)
        store = ctx.store.job_store()
        pending = None if body.dry_run else _interrupted(store, request.host)
        if pending is not None:
            return await _resume(ctx, lab_dir, pending.id, request, _RESUME_WAIT_S)
        return await _enter(ctx, lab_dir, request, body.dry_run)

    return work


def resume_work(lab_dir: Path | None, job: int, wait_s: float) -> Work:
    """``job resume ID``, and a new leader's takeover (:mod:`vmferry.service.takeover`): its
    result is the resumed job's report, with what settling found (``settled``)."""

    async def work(ctx: JobContext) -> Outcome:
        return await _resume(ctx, lab_dir, job, None, wait_s)

    return work


def _interrupted(store: JobStore, host: str) -> JobRecord | None:
    """The newest interrupted job emptying ``host``: entering maintenance again resumes it."""
    jobs = [j for j in store.jobs(host=host, state="interrupted") if j.kind in EMPTYING_KINDS]
    return jobs[0] if jobs else None


async def _enter(
    ctx: JobContext, lab_dir: Path | None, request: JobRequest, dry_run: bool
) -> Outcome:
    store, history = ctx.store.job_store(), ctx.store.history(ctx.who.asked_by)
    async with lab_cluster(lab_dir) as cluster:
        live = await live_cluster(cluster, store)
        store.check_free([request.host])
        plan = await plan_evacuation(cluster, live, request, history, kind="maintenance-enter")
        if dry_run:
            state = JobState.REFUSED if plan.refused else JobState.COMPLETED
            return Outcome(state, {"schema": 1, "dry_run": True, **plan.to_json()})
        plan.require_movable()
        store.set_mark(request.host, "entering")
        result, job = None, None
        if plan.moves:
            result, job = await run_job(ctx, cluster, plan, history)
        left = sorted(v.name for v in (await live_cluster(cluster, store)).vms_on(request.host))
    earlier = live.marks.get(request.host)
    if job is None and earlier is not None:
        job = earlier.job
    mark = store.set_mark(request.host, "entering" if left else "maintenance", job)
    extra = {"host_state": mark.state, "left_on_host": left}
    data = (
        {**result.to_json(), **extra}
        if result is not None
        else nothing_moved(plan.kind, plan.host, **extra)
    )
    ok = not left and (result is None or result.ok)
    return Outcome(JobState.COMPLETED if ok else JobState.FAILED, data, job)


def _emptied_by(store: JobStore, mark: HostMark) -> list[str]:
    """The VMs ``maintenance enter`` moved off the host since it was marked."""
    jobs = store.jobs(host=mark.host, kind="maintenance-enter")
    since = [j for j in reversed(jobs) if j.created_at >= mark.since]
    return list(dict.fromkeys(m.vm for j in since for m in j.moves if m.state == "completed"))


async def _exit(
    ctx: JobContext, lab_dir: Path | None, request: JobRequest, bring_back: bool
) -> Outcome:
    store, history = ctx.store.job_store(), ctx.store.history(ctx.who.asked_by)
    mark = store.marks().get(request.host)
    if mark is None:
        raise ConfigError(f"{request.host} is not in maintenance")
    away = _emptied_by(store, mark)
    exited = {"schema": 1, "host": request.host, "host_state": "active", "was": mark.state,
              "moved_off": away, "job": None}  # fmt: skip
    if not bring_back:
        store.clear_mark(request.host)
        return Outcome(JobState.COMPLETED, exited)
    async with lab_cluster(lab_dir) as cluster:
        live = await live_cluster(cluster, store)
        store.check_free([request.host])
        plan = await plan_bring_back(cluster, live, request, away, history)
        plan.require_movable()
        store.clear_mark(request.host)
        if not plan.moves:
            return Outcome(JobState.COMPLETED, {**exited, "moves": []})
        result, job = await run_job(ctx, cluster, plan, history)
    data = {**result.to_json(), "host_state": "active", "was": mark.state}
    return Outcome(JobState.COMPLETED if result.ok else JobState.FAILED, data, job)


@dataclass(frozen=True, slots=True)
class _Resumed:
    """What a resume did (see :class:`vmferry.cli.jobs`)."""

    settled: list[Settled]
    result: JobResult | None
    left: list[str] | None


def _give_back(store: JobStore, job: int, error: BaseException, *, ran: bool) -> None:
    """A resume stopped by ``error``: ``interrupted`` again (another resume may take it)
    unless its moves ran and failed otherwise than by being interrupted."""
    stopped = not ran or isinstance(error, asyncio.CancelledError)
    store.end(
        job, "interrupted" if stopped else "failed", {"error": str(error) or type(error).__name__}
    )


async def _carry_on(
    ctx: JobContext, cluster: Cluster, record: JobRecord, request: JobRequest, wait_s: float
) -> _Resumed:
    """Settle, plan what is left, run it; a maintenance job's host marked once empty."""
    store = ctx.store.job_store()
    history: History = ctx.store.history(ctx.who.asked_by)
    try:
        settled = await settle(cluster, store, record, wait_s=wait_s)
        plan = await replan(cluster, store, record, request, history, settled)
    except BaseException as error:
        _give_back(store, record.id, error, ran=False)
        raise
    maintenance = record.kind == "maintenance-enter"
    result = None
    if plan is not None:
        if maintenance:
            store.set_mark(record.host, "entering", record.id)
        plan.require_movable()
        store.extend(record.id, [(m.name, m.source, m.destination) for m in plan.moves],
                     plan.to_json())  # fmt: skip
        try:
            result = await run_plan(
                cluster, plan, store, record.id, history=history, observer=JobObserver(ctx)
            )
        except BaseException as error:
            _give_back(store, record.id, error, ran=True)
            raise
    if not maintenance:
        return _Resumed(settled, result, None)
    left = sorted(v.name for v in (await live_cluster(cluster, store)).vms_on(record.host))
    store.set_mark(record.host, "entering" if left else "maintenance", record.id)
    return _Resumed(settled, result, left)


async def _resume(
    ctx: JobContext, lab_dir: Path | None, job: int, request: JobRequest | None, wait_s: float
) -> Outcome:
    """Claim ``job`` (interrupted), finish it, end it; its report as in-process."""
    store = ctx.store.job_store()
    record = store.claim(job)
    ctx.controller_job(record.id)
    logger.info("job.resuming %s: controller job %s", ctx.job, record.id)
    try:
        async with lab_cluster(lab_dir) as cluster:
            done = await _carry_on(
                ctx, cluster, record, request or recorded_request(record), wait_s
            )
    except BaseException as error:  # not given back yet (no lab, say): given back now
        if store.job(record.id).state == "running":
            _give_back(store, record.id, error, ran=False)
        raise
    state = job_outcome([m.state for m in store.job(record.id).moves])
    ran: dict[str, Any] = (
        done.result.to_json()
        if done.result is not None
        else {"schema": 1, "job": record.id, "makespan_s": 0.0, "moves": []}
    )
    report = {**ran, "kind": record.kind, "host": record.host, "state": state, "resumed": True,
              "settled": [s.to_json() for s in done.settled]}  # fmt: skip
    if done.left is not None:
        report["host_state"] = "entering" if done.left else "maintenance"
        report["left_on_host"] = done.left
    store.end(record.id, state, report)
    ok = state == "completed" and not done.left
    return Outcome(JobState.COMPLETED if ok else JobState.FAILED, report, record.id)
