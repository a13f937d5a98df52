"""The CLI's ``balance``: even out the hosts' load (memory and measured CPU) by moving VMs, as
one scheduled job.

Human output and progress go to stderr (``err``); tables and ``--json`` output to stdout
(``out``). Nothing to do exits 0 and says why. A refusal (bad numbers, another job running,
VMs whose goal no strategy meets) exits 2 with nothing moved.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from vmferry.cli.exits import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from vmferry.cli.job_view import JobView, plan_table, result_table
from vmferry.cli.render import print_json, status
from vmferry.controller.balancing import (
    BALANCE_HOST,
    BalanceJob,
    BalanceRequest,
    plan_balance_job,
)
from vmferry.controller.cluster import Cluster
from vmferry.controller.history import History
from vmferry.controller.inventory import Inventory
from vmferry.controller.job_runner import JobResult, run_plan
from vmferry.controller.jobs import JobStore
from vmferry.controller.placing import live_cluster
from vmferry.core.balance import HostLoad, spread

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from vmferry.controller.evacuation import JobPlan

__all__ = ["balance"]


def _request(args: argparse.Namespace) -> BalanceRequest:
    request = BalanceRequest(
        max_moves=args.max_moves,
        cool_down_min=args.cool_down,
        max_downtime_ms=args.max_downtime,
        bandwidth_mbps=args.bandwidth,
        max_outbound=args.max_outbound,
        max_inbound=args.max_inbound,
    )
    request.check()
    return request


def _share(load: HostLoad | None) -> str:
    if load is None:
        return "-"
    return f"{load.load:.2f} (mem {load.memory:.2f}, cpu {load.cpu:.2f})"


def loads_table(planned: BalanceJob, observed: Sequence[HostLoad] | None = None) -> Table:
    """Every balanced host's load now, predicted after the moves and (after a run) as seen."""
    from rich.table import Table

    plan = planned.balance
    title = f"host load: spread {plan.spread_before:.2f}"
    if plan.steps:
        title += f" → {plan.spread_after:.2f} predicted"
    seen = None if observed is None else {h.host: h for h in observed}
    if observed is not None:
        title += f", {spread(observed):.2f} seen"
    table = Table(title=title)
    for column in ("host", "before", "after (predicted)"):
        table.add_column(column)
    if seen is not None:
        table.add_column("after (seen)")
    after = {h.host: h for h in plan.after}
    for load in plan.before:
        row = [load.host, _share(load), _share(after.get(load.host))]
        if seen is not None:
            row.append(_share(seen.get(load.host)))
        table.add_row(*row)
    for host, why in planned.excluded:
        table.add_row(host, "[dim]left out[/]", why, *([""] if seen is not None else []))
    return table


async def _run(
    cluster: Cluster, store: JobStore, history: History, plan: JobPlan, err: Console
) -> JobResult:
    """Record the job, run it with its live view, record how it ended."""
    schedule = plan.require_movable()
    moves = [(m.name, m.source, m.destination) for m in plan.moves]
    job = store.begin(plan.kind, plan.host, moves, plan.to_json())
    err.print(
        f"job {job}: {len(moves)} move(s) to balance the cluster, "
        f"predicted makespan {schedule.makespan_s:.1f} s"
    )
    try:
        with JobView(err, plan) as view:
            result = await run_plan(cluster, plan, store, job, history=history, observer=view)
    except BaseException as error:  # recorded (one quick write, not awaited), then raised on
        interrupted = isinstance(error, (asyncio.CancelledError, KeyboardInterrupt))
        store.end(job, "interrupted" if interrupted else "failed", {"error": str(error)})
        raise
    store.end(job, "completed" if result.ok else "failed", result.to_json())
    return result


def _nothing(planned: BalanceJob, args: argparse.Namespace, out: Console, err: Console) -> int:
    err.print(planned.balance.reason())
    if args.json:
        print_json(
            out,
            {
                "schema": 1,
                "job": None,
                "kind": "balance",
                "host": BALANCE_HOST,
                "dry_run": bool(args.dry_run),
                "state": "completed",
                "makespan_s": 0.0,
                "moves": [],
                "balance": planned.to_json(),
            },
        )
    else:
        out.print(loads_table(planned))
    return EXIT_OK


def _dry_run(
    planned: BalanceJob, plan: JobPlan, args: argparse.Namespace, out: Console, err: Console
) -> int:
    if args.json:
        print_json(
            out, {"schema": 1, "dry_run": True, **plan.to_json(), "balance": planned.to_json()}
        )
    else:
        out.print(plan_table(plan))
        out.print(loads_table(planned))
    err.print(planned.balance.reason())
    if plan.schedule is not None:
        err.print(
            f"predicted makespan {plan.schedule.makespan_s:.1f} s for {len(plan.moves)} "
            "move(s); nothing moved (--dry-run)"
        )
    return EXIT_USAGE if plan.refused else EXIT_OK


async def balance(args: argparse.Namespace, err: Console, out: Console) -> int:
    """``balance``: plan from live loads, then run the moves as one job (or only show them)."""
    request = _request(args)
    inventory = Inventory.load()
    store = JobStore(inventory.history_db)
    history = History(inventory.history_db)
    async with Cluster(inventory) as cluster:
        live = await live_cluster(cluster, store)
        store.check_free([*live.hosts, BALANCE_HOST])  # loads in flux: no balance beside a job
        with status(err, "measuring the hosts' load and planning the moves…"):
            planned = await plan_balance_job(cluster, live, request, history)
        plan = planned.job
        if plan is None:
            return _nothing(planned, args, out, err)
        if args.dry_run:
            return _dry_run(planned, plan, args, out, err)
        result = await _run(cluster, store, history, plan, err)
        observed = planned.loads_of(await live_cluster(cluster, store))
    extra: dict[str, Any] = {"balance": planned.to_json(observed)}
    if args.json:
        print_json(out, {**result.to_json(), **extra})
    else:
        out.print(result_table(result))
        out.print(loads_table(planned, observed))
    return EXIT_OK if result.ok else EXIT_FAILED
