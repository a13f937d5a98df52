"""What each kind of job does: a migration, an evacuation, a balance, a reconcile, run by the
controller exactly as the in-process CLI runs them, with progress published on the event bus,
moves counted in the metrics, and who asked recorded in the history and the job tables.

Each job's result is the JSON the in-process command prints with ``--json``, so the CLI in
client mode prints the same.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from vmferry.controller.balancing import BALANCE_HOST, BalanceRequest, plan_balance_job
from vmferry.controller.cluster import Cluster
from vmferry.controller.evacuation import JobPlan, JobRequest, plan_evacuation
from vmferry.controller.history import History
from vmferry.controller.inventory import Inventory
from vmferry.controller.job_runner import JobResult, MoveResult, run_plan
from vmferry.controller.migrate import MigrationRequest, migrate
from vmferry.controller.placing import live_cluster
from vmferry.controller.plan import Plan, make_plan
from vmferry.core.cluster_model import Move
from vmferry.core.errors import ConfigError
from vmferry.core.handoff import VerifyMode
from vmferry.core.model import MigrationStats
from vmferry.core.phases import Phase
from vmferry.service.api import (
    BalanceBody,
    EvacuateBody,
    JobState,
    MaintenanceBody,
    MigrateBody,
    ReconcileBody,
)
from vmferry.service.supervisor import JobContext, Outcome, Work

__all__ = [
    "JobObserver",
    "balance_work",
    "delete_vm",
    "evacuation_request",
    "evacuation_work",
    "lab_cluster",
    "migration_request",
    "migration_work",
    "nothing_moved",
    "plan_move",
    "reconcile_work",
    "run_job",
    "verify_vm",
]


def migration_request(body: MigrateBody) -> MigrationRequest:
    """The controller's request for ``body``, checked (nothing asked of any agent).

    Raises:
        ConfigError: values the controller refuses (e.g. ``plan: false`` with ``auto``).
    """
    request = MigrationRequest(
        vm=body.vm,
        destination=body.to,
        strategy=body.strategy,
        max_downtime_ms=body.max_downtime_ms,
        deadline_s=body.deadline_s,
        bandwidth_mbps=body.bandwidth_mbps,
        force=body.force,
        allow_postcopy=body.allow_postcopy,
        plan=body.plan,
        recovery_limit_s=body.recovery_limit_s,
        tls=body.tls,
        verify=VerifyMode(body.verify),
    )
    request.resolve()
    return request


def evacuation_request(body: EvacuateBody | MaintenanceBody) -> JobRequest:
    """The job request of an evacuation (or of entering maintenance: the same fields).

    Raises:
        ConfigError: numbers out of range.
    """
    request = JobRequest(
        host=body.host,
        to=None if body.to is None else tuple(body.to),
        deadline_s=body.deadline_s,
        bandwidth_mbps=body.bandwidth_mbps,
        max_downtime_ms=body.max_downtime_ms,
        max_outbound=body.max_outbound,
        max_inbound=body.max_inbound,
    )
    request.check()
    return request


@asynccontextmanager
async def lab_cluster(lab_dir: Path | None) -> AsyncIterator[Cluster]:
    """The cluster as the inventory says now (read again per job: ``lab restart`` moves an
    agent to another port)."""
    async with Cluster(Inventory.load(lab_dir)) as cluster:
        yield cluster


async def plan_move(lab_dir: Path | None, request: MigrationRequest, history: History) -> Plan:
    """What each strategy would cost for ``request`` (``vmferry plan``; changes nothing).

    Raises:
        NotFound: no such VM. ConfigError: an unknown host, or the VM already runs there.
    """
    async with lab_cluster(lab_dir) as cluster:
        info = await cluster.locate(request.vm)
        cluster.client(request.destination)
        if info.host == request.destination:
            raise ConfigError(f"VM {request.vm!r} already runs on {request.destination}")
        cap = None if request.bandwidth_mbps is None else request.bandwidth_mbps * 125_000
        return await make_plan(
            cluster, info, request.destination, request.goal, cap_bps=cap, history=history
        )


async def verify_vm(lab_dir: Path | None, vm: str) -> dict[str, Any]:
    """The guest's check of every page of its memory (``vmferry verify --json``).

    Raises:
        NotFound: no such VM.
    """
    async with lab_cluster(lab_dir) as cluster:
        info = await cluster.locate(vm)
        integrity = await cluster.client(info.host).verify(info.name)
    return {"vm": info.name, "host": info.host, **integrity.to_json()}


async def delete_vm(lab_dir: Path | None, vm: str) -> dict[str, Any]:
    """Stop ``vm`` and remove it from its host (``vmferry vm delete --json``).

    Raises:
        NotFound: no such VM.
    """
    async with lab_cluster(lab_dir) as cluster:
        info = await cluster.locate(vm)
        await cluster.client(info.host).delete_vm(info.name)
    return {"deleted": info.name, "host": info.host}


def migration_work(lab_dir: Path | None, request: MigrationRequest) -> Work:
    """One move (``vmferry migrate``); its result is the migration report."""

    async def work(ctx: JobContext) -> Outcome:
        history = ctx.store.history(ctx.who.asked_by)

        def progress(phase: Phase, stats: MigrationStats | None) -> None:
            ctx.progress(request.vm, phase, stats)

        def planned(plan: Any) -> None:
            m = plan.measurement
            ctx.plan(request.vm, m.zero_fraction, m.dirty_rate_bps, m.dirty_set_bytes)

        async with lab_cluster(lab_dir) as cluster:
            report = await migrate(
                cluster, request, history=history, on_progress=progress, on_plan=planned
            )
        ctx.metrics.observe_report(report)
        state = JobState.COMPLETED if report.is_success else JobState.FAILED
        return Outcome(state, report.to_json())

    return work


class JobObserver:
    """A job's moves as events and metrics (a job runner's observer)."""

    __slots__ = ("ctx",)

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx

    def started(self, move: Move, cap_bps: float | None, at_s: float) -> None:
        self.ctx.progress(move.name, Phase.PREPARING, None)

    def progress(self, vm: str, phase: Phase, stats: MigrationStats | None) -> None:
        self.ctx.progress(vm, phase, stats)

    def ended(self, result: MoveResult) -> None:
        if result.report is not None:
            self.ctx.metrics.observe_report(result.report)


async def run_job(
    ctx: JobContext, cluster: Cluster, plan: JobPlan, history: History
) -> tuple[JobResult, int]:
    """Record the controller's job (who asked in its plan), run it, record how it ended."""
    plan.require_movable()
    store = ctx.store.job_store()
    moves = [(m.name, m.source, m.destination) for m in plan.moves]
    record = {**plan.to_json(), "asked_by": ctx.who.asked_by}
    job = store.begin(plan.kind, plan.host, moves, record)
    ctx.controller_job(job)
    try:
        result = await run_plan(
            cluster, plan, store, job, history=history, observer=JobObserver(ctx)
        )
    except BaseException as error:  # recorded (one quick write), then raised on
        interrupted = isinstance(error, asyncio.CancelledError)
        state = "interrupted" if interrupted else "failed"
        store.end(job, state, {"error": str(error) or type(error).__name__})
        raise
    store.end(job, "completed" if result.ok else "failed", result.to_json())
    return result, job


def nothing_moved(kind: str, host: str, **extra: Any) -> dict[str, Any]:
    return {"schema": 1, "job": None, "kind": kind, "host": host, "state": "completed",
            "makespan_s": 0.0, "moves": [], **extra}  # fmt: skip


def evacuation_work(lab_dir: Path | None, request: JobRequest, dry_run: bool) -> Work:
    """Empty a host (``vmferry host evacuate``); its result is the job result."""

    async def work(ctx: JobContext) -> Outcome:
        history = ctx.store.history(ctx.who.asked_by)
        store = ctx.store.job_store()
        async with lab_cluster(lab_dir) as cluster:
            cluster.inventory.host(request.host)
            live = await live_cluster(cluster, store)
            store.check_free([request.host])
            plan = await plan_evacuation(cluster, live, request, history, kind="evacuate")
            if dry_run:
                state = JobState.REFUSED if plan.refused else JobState.COMPLETED
                return Outcome(state, {"schema": 1, "dry_run": True, **plan.to_json()})
            if not plan.moves and not plan.refused:
                return Outcome(JobState.COMPLETED, nothing_moved(plan.kind, plan.host))
            result, job = await run_job(ctx, cluster, plan, history)
        state = JobState.COMPLETED if result.ok else JobState.FAILED
        return Outcome(state, result.to_json(), job)

    return work


def balance_work(lab_dir: Path | None, body: BalanceBody) -> Work:
    """Even out the hosts' load (``vmferry balance``); its result is the job result."""
    request = BalanceRequest(
        max_moves=body.max_moves,
        cool_down_min=body.cool_down_min,
        max_downtime_ms=body.max_downtime_ms,
        bandwidth_mbps=body.bandwidth_mbps,
        max_outbound=body.max_outbound,
        max_inbound=body.max_inbound,
    )
    request.check()

    async def work(ctx: JobContext) -> Outcome:
        history = ctx.store.history(ctx.who.asked_by)
        store = ctx.store.job_store()
        async with lab_cluster(lab_dir) as cluster:
            live = await live_cluster(cluster, store)
            store.check_free([*live.hosts, BALANCE_HOST])
            planned = await plan_balance_job(cluster, live, request, history)
            plan = planned.job
            if plan is None:
                extra = {"dry_run": body.dry_run, "balance": planned.to_json()}
                return Outcome(JobState.COMPLETED, nothing_moved("balance", BALANCE_HOST, **extra))
            if body.dry_run:
                data = {
                    "schema": 1,
                    "dry_run": True,
                    **plan.to_json(),
                    "balance": planned.to_json(),
                }
                return Outcome(JobState.REFUSED if plan.refused else JobState.COMPLETED, data)
            result, job = await run_job(ctx, cluster, plan, history)
            observed = planned.loads_of(await live_cluster(cluster, store))
        state = JobState.COMPLETED if result.ok else JobState.FAILED
        return Outcome(state, {**result.to_json(), "balance": planned.to_json(observed)}, job)

    return work


def reconcile_work(lab_dir: Path | None, body: ReconcileBody) -> Work:
    """One running copy per VM again (``vmferry reconcile``); its result is every VM's."""

    async def work(ctx: JobContext) -> Outcome:
        from vmferry.controller.reconcile import reconcile

        async with lab_cluster(lab_dir) as cluster:
            results = await reconcile(cluster, wait_s=body.wait_s)
        bad = [r for r in results if r.verdict in ("lost", "conflict", "failed", "in-flight")]
        state = JobState.FAILED if bad else JobState.COMPLETED
        return Outcome(state, [r.to_json() for r in results])

    return work
