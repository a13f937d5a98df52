"""The CLI's host commands: ``host list``, ``host maintenance enter|exit`` and
``host evacuate``.

Human output and progress go to stderr (``err``); tables and ``--json`` output to stdout
(``out``). A refusal (unknown host, the only host, VMs that cannot move, a deadline the
schedule misses, a host another job holds) exits 2 with nothing moved. ``host evacuate`` and
``maintenance enter`` on a host whose emptying job was interrupted (its controller died)
resume that job (:mod:`vmferry.cli.jobs`) instead of starting a new one.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import TYPE_CHECKING, Any

from vmferry.cli.exits import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from vmferry.cli.job_view import JobView, plan_table, result_table
from vmferry.cli.jobs import interrupted_job, resume
from vmferry.cli.render import format_bytes, print_json, status
from vmferry.controller.cluster import Cluster
from vmferry.controller.evacuation import JobPlan, JobRequest, plan_bring_back, plan_evacuation
from vmferry.controller.history import History
from vmferry.controller.inventory import Inventory
from vmferry.controller.job_runner import JobResult, run_plan
from vmferry.controller.jobs import HostMark, JobStore
from vmferry.controller.placing import LiveCluster, live_cluster
from vmferry.core.errors import ConfigError
from vmferry.core.model import validate_name

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["host_evacuate", "host_list", "host_maintenance", "show_host_rows"]


def _request(args: argparse.Namespace) -> JobRequest:
    to = getattr(args, "to", None)
    request = JobRequest(
        host=validate_name(args.host, "host name"),
        to=None if not to else tuple(validate_name(h, "host name") for h in to),
        deadline_s=getattr(args, "deadline", None),
        bandwidth_mbps=args.bandwidth,
        max_downtime_ms=args.max_downtime,
        max_outbound=args.max_outbound,
        max_inbound=args.max_inbound,
        policy=getattr(args, "policy", "ours"),
    )
    request.check()
    return request


class _Session:
    """What every host command opens: the inventory, the state store and the history."""

    def __init__(self, host: str) -> None:
        self.inventory = Inventory.load()
        self.inventory.host(host)  # an unknown host is refused before any agent is asked
        self.store = JobStore(self.inventory.history_db)
        self.history = History(self.inventory.history_db)


async def _plan(
    cluster: Cluster,
    session: _Session,
    live: LiveCluster,
    request: JobRequest,
    kind: str,
    err: Console,
) -> JobPlan:
    session.store.check_free([request.host])
    with status(err, f"planning the moves off {request.host}…"):
        return await plan_evacuation(cluster, live, request, session.history, kind=kind)


async def _resumed(
    session: _Session, request: JobRequest, args: argparse.Namespace, err: Console, out: Console
) -> int | None:
    """Resume the interrupted job emptying ``request.host``, if it has one (the exit status;
    None: it has none, or this is a dry run)."""
    pending = interrupted_job(session.store, request.host)
    if pending is None:
        return None
    if args.dry_run:
        err.print(
            f"job {pending.id} ({pending.kind} {request.host}) was interrupted: "
            "without --dry-run this resumes it"
        )
        return None
    record = session.store.claim(pending.id)
    err.print(
        f"job {pending.id} ({pending.kind} {request.host}) was interrupted (its controller, "
        f"pid {pending.pid}, died): resuming it instead of starting a new job"
    )
    return await resume(session.inventory, session.store, record, request, args, err, out)


def _dry_run(plan: JobPlan, args: argparse.Namespace, out: Console, err: Console) -> int:
    if args.json:
        print_json(out, {"schema": 1, "dry_run": True, **plan.to_json()})
    else:
        out.print(plan_table(plan))
        if plan.schedule is not None:
            err.print(
                f"predicted makespan {plan.schedule.makespan_s:.1f} s for {len(plan.moves)} "
                "move(s); nothing moved (--dry-run)"
            )
    return EXIT_USAGE if plan.refused else EXIT_OK


async def _run(cluster: Cluster, session: _Session, plan: JobPlan, err: Console) -> JobResult:
    """Record the job, run it with its live view, record how it ended."""
    schedule = plan.require_movable()
    moves = [(m.name, m.source, m.destination) for m in plan.moves]
    job = session.store.begin(plan.kind, plan.host, moves, plan.to_json())
    err.print(
        f"job {job}: {len(moves)} move(s) off {plan.host}"
        if plan.kind != "bring-back"
        else f"job {job}: {len(moves)} move(s) back to {plan.host}",
        end="",
    )
    err.print(f", predicted makespan {schedule.makespan_s:.1f} s")
    try:
        with JobView(err, plan) as view:
            result = await run_plan(
                cluster, plan, session.store, job, history=session.history, observer=view
            )
    except BaseException as error:  # recorded (one quick write, not awaited), then raised on
        interrupted = isinstance(error, (asyncio.CancelledError, KeyboardInterrupt))
        state = "interrupted" if interrupted else "failed"
        session.store.end(job, state, {"error": str(error) or type(error).__name__})
        raise
    session.store.end(job, "completed" if result.ok else "failed", result.to_json())
    return result


def _show_result(
    result: JobResult, extra: dict[str, Any], args: argparse.Namespace, out: Console
) -> None:
    if args.json:
        print_json(out, {**result.to_json(), **extra})
    else:
        out.print(result_table(result))


async def host_evacuate(args: argparse.Namespace, err: Console, out: Console) -> int:
    """``host evacuate HOST``: move every VM of HOST elsewhere, as one scheduled job."""
    request = _request(args)
    session = _Session(request.host)
    resumed = await _resumed(session, request, args, err, out)
    if resumed is not None:
        return resumed
    async with Cluster(session.inventory) as cluster:
        live = await live_cluster(cluster, session.store)
        plan = await _plan(cluster, session, live, request, "evacuate", err)
        if args.dry_run:
            return _dry_run(plan, args, out, err)
        if not plan.moves and not plan.refused:
            err.print(f"{request.host} runs no VM: nothing to move")
            if args.json:
                print_json(out, {"schema": 1, "job": None, "kind": plan.kind, "host": plan.host,
                                 "state": "completed", "makespan_s": 0.0, "moves": []})  # fmt: skip
            return EXIT_OK
        result = await _run(cluster, session, plan, err)
    _show_result(result, {}, args, out)
    return EXIT_OK if result.ok else EXIT_FAILED


async def host_maintenance(args: argparse.Namespace, err: Console, out: Console) -> int:
    """``host maintenance enter|exit HOST``."""
    if args.action == "enter":
        return await _enter(args, err, out)
    return await _exit(args, err, out)


async def _enter(args: argparse.Namespace, err: Console, out: Console) -> int:
    """Empty HOST and mark it in maintenance once it is empty (``entering`` until then)."""
    request = _request(args)
    session = _Session(request.host)
    resumed = await _resumed(session, request, args, err, out)
    if resumed is not None:
        return resumed
    async with Cluster(session.inventory) as cluster:
        live = await live_cluster(cluster, session.store)
        plan = await _plan(cluster, session, live, request, "maintenance-enter", err)
        if args.dry_run:
            return _dry_run(plan, args, out, err)
        plan.require_movable()
        session.store.set_mark(request.host, "entering")
        result = None
        if plan.moves:
            result = await _run(cluster, session, plan, err)
        left = sorted(
            v.name for v in (await live_cluster(cluster, session.store)).vms_on(request.host)
        )
    earlier = live.marks.get(request.host)
    job = result.job if result is not None else (None if earlier is None else earlier.job)
    mark = (
        session.store.set_mark(request.host, "maintenance", job)
        if not left
        else session.store.set_mark(request.host, "entering", job)
    )
    extra = {"host_state": mark.state, "left_on_host": left}
    if result is not None:
        _show_result(result, extra, args, out)
    elif args.json:
        print_json(
            out,
            {
                "schema": 1,
                "job": None,
                "kind": plan.kind,
                "host": plan.host,
                "state": "completed",
                "makespan_s": 0.0,
                "moves": [],
                **extra,
            },
        )
    if left:
        err.print(
            f"[red]{request.host} is not empty ({', '.join(left)}): still entering maintenance[/]"
        )
        return EXIT_FAILED
    err.print(f"{request.host} is in maintenance (empty; no VM is placed there)")
    return EXIT_OK if result is None or result.ok else EXIT_FAILED


def _emptied_by(store: JobStore, mark: HostMark) -> list[str]:
    """The VMs ``maintenance enter`` moved off the host since it was marked (an ``enter``
    run again after a failed move adds its own)."""
    jobs = store.jobs(host=mark.host, kind="maintenance-enter")
    since = [j for j in reversed(jobs) if j.created_at >= mark.since]
    return list(dict.fromkeys(m.vm for j in since for m in j.moves if m.state == "completed"))


def _exited_json(host: str, was: str, away: list[str]) -> dict[str, Any]:
    """``maintenance exit`` with no job run: the host takes VMs again."""
    return {
        "schema": 1,
        "host": host,
        "host_state": "active",
        "was": was,
        "moved_off": away,
        "job": None,
    }


async def _exit(args: argparse.Namespace, err: Console, out: Console) -> int:
    """Take HOST out of maintenance; with ``--bring-back`` move its VMs back to it."""
    request = _request(args)
    session = _Session(request.host)
    mark = session.store.marks().get(request.host)
    if mark is None:
        raise ConfigError(f"{request.host} is not in maintenance")
    away = _emptied_by(session.store, mark)
    if not args.bring_back:
        session.store.clear_mark(request.host)
        if args.json:
            print_json(out, _exited_json(request.host, mark.state, away))
        else:
            err.print(f"{request.host} takes VMs again")
            if away:
                err.print(
                    f"{len(away)} VM(s) left it: {', '.join(away)} (--bring-back moves them back)"
                )
        return EXIT_OK
    async with Cluster(session.inventory) as cluster:
        live = await live_cluster(cluster, session.store)
        session.store.check_free([request.host])
        with status(err, f"planning the moves back to {request.host}…"):
            plan = await plan_bring_back(cluster, live, request, away, session.history)
        plan.require_movable()
        session.store.clear_mark(request.host)
        if not plan.moves:
            err.print(f"{request.host} takes VMs again; no VM to bring back")
            if args.json:
                print_json(out, {**_exited_json(request.host, mark.state, away), "moves": []})
            return EXIT_OK
        result = await _run(cluster, session, plan, err)
    _show_result(result, {"host_state": "active", "was": mark.state}, args, out)
    return EXIT_OK if result.ok else EXIT_FAILED


async def host_list(args: argparse.Namespace, err: Console, out: Console) -> int:
    """``host list``: every host's room, VMs and maintenance state."""
    from vmferry.service.views import host_rows

    inventory = Inventory.load()
    store = JobStore(inventory.history_db)
    async with Cluster(inventory) as cluster:
        live = await live_cluster(cluster, store)
    return show_host_rows(host_rows(live, [h.name for h in inventory.hosts]), args, out)


def show_host_rows(rows: list[dict[str, Any]], args: argparse.Namespace, out: Console) -> int:
    """``host list``'s output (in-process and in client mode alike)."""
    if args.json:
        print_json(out, rows)
        return EXIT_OK
    from rich.table import Table

    table = Table()
    for column in ("host", "state", "VMs", "memory free", "vCPUs free", "disk free"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            str(row["host"]),
            str(row["state"]),
            ", ".join(row["vms"]) or "-",
            format_bytes(row["memory_free_bytes"]),
            "-" if row["vcpus_free"] is None else str(row["vcpus_free"]),
            format_bytes(row["disk_free_bytes"]),
        )
    out.print(table)
    return EXIT_OK
