"""The CLI's job commands: ``job list``, ``job show ID`` and ``job resume ID``.

A job whose controller died is ``interrupted``. Resuming it (``job resume ID``, or
``host evacuate HOST`` / ``host maintenance enter HOST`` run again while HOST has one: see
:func:`interrupted_job`) takes it over under the same id, settles the moves its controller
left in flight as ``reconcile`` does (one intact running copy each, the move's record saying
where it ended up), plans what is left on fresh measurements, runs it, and ends the job; a
maintenance job's host is marked in maintenance only once it is empty. A resume that cannot
go on before its moves run (a host not answering, a VM that cannot move) gives the job back
``interrupted``, for a later resume.

Human output and progress go to stderr (``err``); tables and ``--json`` output to stdout
(``out``). Resuming an unknown job, a job that ended, or one whose controller is alive exits
2 with nothing moved.
"""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rich.table import Table

from vmferry.cli.exits import EXIT_FAILED, EXIT_OK
from vmferry.cli.job_view import JobView, result_table
from vmferry.cli.render import print_json, status
from vmferry.controller.cluster import Cluster
from vmferry.controller.evacuation import JobPlan, JobRequest
from vmferry.controller.history import History
from vmferry.controller.inventory import Inventory
from vmferry.controller.job_resume import Settled, recorded_request, replan, settle
from vmferry.controller.job_runner import JobResult, run_plan
from vmferry.controller.jobs import JobRecord, JobStore
from vmferry.controller.placing import live_cluster
from vmferry.core.errors import ConfigError
from vmferry.core.job_resume import EMPTYING_KINDS, Fate, job_outcome

if TYPE_CHECKING:
    from rich.console import Console

__all__ = [
    "interrupted_job",
    "job_list",
    "job_resume",
    "job_show",
    "resume",
    "show_job_list",
    "show_job_record",
]


def _store() -> tuple[Inventory, JobStore]:
    inventory = Inventory.load()
    return inventory, JobStore(inventory.history_db)


def _count(record: JobRecord) -> str:
    done = sum(m.state in ("completed", "gone") for m in record.moves)
    return f"{done}/{len(record.moves)}"


async def job_list(args: argparse.Namespace, err: Console, out: Console) -> int:
    """``job list``: every recorded job, newest first."""
    _, store = _store()
    return show_job_list(store.jobs(host=args.host, state=args.state), args, err, out)


def show_job_list(
    jobs: list[JobRecord], args: argparse.Namespace, err: Console, out: Console
) -> int:
    """``job list``'s output (in-process and in client mode alike)."""
    if args.json:
        print_json(out, [j.to_json() for j in jobs])
        return EXIT_OK
    if not jobs:
        err.print("no job recorded")
        return EXIT_OK
    table = Table(title="vmferry jobs")
    for column in ("job", "kind", "host", "state", "moves done", "updated"):
        table.add_column(column)
    for job in jobs:
        style = "yellow" if job.state == "interrupted" else None
        table.add_row(
            str(job.id), job.kind, job.host, job.state, _count(job), job.updated_at, style=style
        )
    out.print(table)
    if any(j.state == "interrupted" for j in jobs):
        err.print("an interrupted job's controller died: `vmferry job resume ID` goes on with it")
    return EXIT_OK


def _moves_table(record: JobRecord) -> Table:
    table = Table(title=f"job {record.id}: {record.kind} {record.host}, {record.state}")
    for column in ("VM", "from", "to", "state", "how"):
        table.add_column(column)
    for move in record.moves:
        report = move.report or {}
        resumed = report.get("resumed")
        how = (
            f"settled on resume: {resumed.get('reason')}"
            if isinstance(resumed, dict)
            else str(report.get("error") or (report.get("report") or {}).get("status") or "")
        )
        table.add_row(move.vm, move.source, move.destination, move.state, how)
    return table


async def job_show(args: argparse.Namespace, err: Console, out: Console) -> int:
    """``job show ID``: one job and each of its moves."""
    _, store = _store()
    return show_job_record(store.job(args.id), args, err, out)


def show_job_record(record: JobRecord, args: argparse.Namespace, err: Console, out: Console) -> int:
    """``job show``'s output (in-process and in client mode alike)."""
    if args.json:
        print_json(out, record.to_json(detail=True))
        return EXIT_OK
    out.print(_moves_table(record))
    err.print(
        f"created {record.created_at}, updated {record.updated_at}, controller pid {record.pid}"
    )
    if record.state == "interrupted":
        err.print(f"its controller died: `vmferry job resume {record.id}` goes on with it")
    return EXIT_OK


async def job_resume(args: argparse.Namespace, err: Console, out: Console) -> int:
    """``job resume ID``: take over an interrupted job and finish it."""
    if not 0 < args.wait <= 86_400:
        raise ConfigError("--wait must be in (0, 86400] seconds")
    inventory, store = _store()
    before = store.job(args.id)
    record = store.claim(args.id)
    err.print(
        f"job {record.id}: resuming {record.kind} {record.host} "
        f"(its controller, pid {before.pid}, is gone)"
    )
    return await resume(inventory, store, record, recorded_request(record), args, err, out)


def interrupted_job(store: JobStore, host: str) -> JobRecord | None:
    """The newest interrupted job emptying ``host`` (an evacuation or a maintenance enter), if
    there is one: running a host command again on ``host`` resumes it."""
    jobs = [j for j in store.jobs(host=host, state="interrupted") if j.kind in EMPTYING_KINDS]
    return jobs[0] if jobs else None


def _show_settled(settled: list[Settled], err: Console) -> None:
    for one in settled:
        r = one.resolution
        if r.fate is Fate.MOVED and one.reconciled is None:
            continue  # moved before the controller died: nothing to say
        done = "" if one.reconciled is None else f" ({'; '.join(one.reconciled.done)})"
        style = "red" if r.fate is Fate.LOST else None
        err.print(f"{r.vm}: {r.fate.value}: {r.reason}{done}", style=style)


def _give_back(store: JobStore, job: int, error: BaseException, *, ran: bool) -> None:
    """A resume stopped by ``error``: the job is ``interrupted`` again (another resume may
    take it) unless its moves ran and failed otherwise than by being interrupted."""
    stopped = not ran or isinstance(error, (asyncio.CancelledError, KeyboardInterrupt))
    report = {"error": str(error) or type(error).__name__}
    store.end(job, "interrupted" if stopped else "failed", report)


async def _run_rest(
    cluster: Cluster, store: JobStore, history: History, job: int, plan: JobPlan, err: Console
) -> JobResult:
    """Record the moves planned for what is left under ``job`` and run them."""
    schedule = plan.require_movable()
    store.extend(job, [(m.name, m.source, m.destination) for m in plan.moves], plan.to_json())
    err.print(
        f"job {job}: {len(plan.moves)} move(s) left, predicted makespan {schedule.makespan_s:.1f} s"
    )
    try:
        with JobView(err, plan) as view:
            return await run_plan(cluster, plan, store, job, history=history, observer=view)
    except BaseException as error:  # recorded (one quick write, not awaited), then raised on
        _give_back(store, job, error, ran=True)
        raise


@dataclass(frozen=True, slots=True)
class _Resumed:
    """What a resume did: each recorded move's fate, the run of what was left (None: nothing
    was), and, for a maintenance job, the VMs still on its host."""

    settled: list[Settled]
    result: JobResult | None
    left: list[str] | None


async def _carry_on(
    cluster: Cluster,
    store: JobStore,
    record: JobRecord,
    request: JobRequest,
    wait_s: float,
    err: Console,
) -> _Resumed:
    """Settle, plan what is left, run it; a maintenance job's host marked once empty."""
    history = History(cluster.inventory.history_db)
    try:
        with status(err, f"settling job {record.id}'s moves…"):
            settled = await settle(cluster, store, record, wait_s=wait_s)
        _show_settled(settled, err)
        with status(err, f"planning what job {record.id} has left…"):
            plan = await replan(cluster, store, record, request, history, settled)
    except BaseException as error:
        _give_back(store, record.id, error, ran=False)
        raise
    maintenance = record.kind == "maintenance-enter"
    result = None
    if plan is None:
        err.print(f"job {record.id}: nothing left to move")
    else:
        if maintenance:
            store.set_mark(record.host, "entering", record.id)
        result = await _run_rest(cluster, store, history, record.id, plan, err)
    if not maintenance:
        return _Resumed(settled, result, None)
    left = sorted(v.name for v in (await live_cluster(cluster, store)).vms_on(record.host))
    store.set_mark(record.host, "entering" if left else "maintenance", record.id)
    return _Resumed(settled, result, left)


def _report(
    record: JobRecord, result: JobResult | None, settled: list[Settled], state: str
) -> dict[str, Any]:
    ran: dict[str, Any] = (
        result.to_json()
        if result is not None
        else {"schema": 1, "job": record.id, "makespan_s": 0.0, "moves": []}
    )
    return {
        **ran,
        "kind": record.kind,
        "host": record.host,
        "state": state,
        "resumed": True,
        "settled": [s.to_json() for s in settled],
    }


async def resume(
    inventory: Inventory,
    store: JobStore,
    record: JobRecord,
    request: JobRequest,
    args: argparse.Namespace,
    err: Console,
    out: Console,
) -> int:
    """Finish the job ``record`` this controller claimed: settle, plan what is left (with
    ``request``), run it, end the job (and its host's maintenance mark)."""
    async with Cluster(inventory) as cluster:
        done = await _carry_on(cluster, store, record, request, getattr(args, "wait", 300.0), err)
    state = job_outcome([m.state for m in store.job(record.id).moves])
    report = _report(record, done.result, done.settled, state)
    if done.left is not None:
        report["host_state"] = "entering" if done.left else "maintenance"
        report["left_on_host"] = done.left
    store.end(record.id, state, report)
    if args.json:
        print_json(out, report)
    elif done.result is not None:
        out.print(result_table(done.result))
    if done.left:
        err.print(
            f"[red]{record.host} is not empty ({', '.join(done.left)}): "
            "still entering maintenance[/]"
        )
    elif done.left is not None:
        err.print(f"{record.host} is in maintenance (empty; no VM is placed there)")
    ok = state == "completed" and not done.left
    err.print(f"job {record.id} {state}" + ("" if ok else f" (`vmferry job show {record.id}`)"))
    return EXIT_OK if ok else EXIT_FAILED
