"""The CLI as a client of ``vmferry serve``: ``vm list|show|create|delete`` (``create``: the
lab guest), ``verify``, ``plan``,
``host list|evacuate|maintenance``, ``job list|show|resume``, ``history``, ``migrate``,
``balance`` and ``reconcile`` through the service, with the in-process commands' ``--json``
output and exit statuses (0 done, 1 failed, 2 refused).

Client mode is on when ``--server URL`` or ``$VMFERRY_URL`` is set; the token is
``$VMFERRY_TOKEN``; an ``https://`` service is verified against ``$VMFERRY_CA``, else the lab's
CA (if this machine has the lab), else the system's CAs. A job the service runs outlives this
command: interrupted (Ctrl-C), the command says so and the move goes on.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from vmferry.agent.api import VmInfo, integrity_from_json, stats_from_json
from vmferry.cli.exits import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from vmferry.cli.render import format_bytes, history_table, print_json, status, vm_table
from vmferry.controller.history import HistoryEntry
from vmferry.controller.jobs import JobMove, JobRecord
from vmferry.core.errors import ConfigError, FerryError
from vmferry.core.eta import EtaHints
from vmferry.core.model import validate_name
from vmferry.core.phases import Phase
from vmferry.service.api import API_PREFIX, JobState
from vmferry.service.client import ServiceClient, ServiceUnreachable

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

__all__ = [
    "balance",
    "client_mode",
    "history",
    "host_evacuate",
    "host_list",
    "host_maintenance",
    "job_list",
    "job_resume",
    "job_show",
    "migrate",
    "plan",
    "reconcile",
    "verify",
    "vm_create",
    "vm_delete",
    "vm_list",
    "vm_show",
]

_EXIT_BY_STATE = {
    JobState.COMPLETED: EXIT_OK,
    JobState.FAILED: EXIT_FAILED,
    JobState.REFUSED: EXIT_USAGE,
}


def client_mode(args: argparse.Namespace) -> bool:
    """Whether the command talks to a service (``--server`` or ``$VMFERRY_URL``)."""
    return bool(getattr(args, "server", None) or os.environ.get("VMFERRY_URL"))


def _ca_file() -> Path | None:
    given = os.environ.get("VMFERRY_CA")
    if given:
        return Path(given)
    from vmferry.controller.inventory import Inventory

    try:
        return Inventory.load().ca_file
    except ConfigError:
        return None


def _client(args: argparse.Namespace) -> ServiceClient:
    """Raises: ConfigError: no token."""
    url = getattr(args, "server", None) or os.environ["VMFERRY_URL"]
    token = os.environ.get("VMFERRY_TOKEN", "").strip()
    if not token:
        raise ConfigError(f"{url}: set VMFERRY_TOKEN to a token of the service")
    return ServiceClient(url, token, _ca_file() if url.startswith("https://") else None)


async def vm_list(args: argparse.Namespace, err: Console, out: Console) -> int:
    async with _client(args) as client:
        listing = await client.get(f"{API_PREFIX}/vms")
    if args.json:
        print_json(out, listing)
    else:
        out.print(vm_table([VmInfo.from_json(v) for v in listing["vms"]]))
        for host in listing["unreachable"]:
            err.print(f"[yellow]warning:[/] {host} did not answer")
    return EXIT_OK if not listing["unreachable"] else EXIT_FAILED


async def host_list(args: argparse.Namespace, err: Console, out: Console) -> int:
    from vmferry.cli.hosts import show_host_rows

    async with _client(args) as client:
        rows = await client.get(f"{API_PREFIX}/hosts")
    return show_host_rows(rows, args, out)


async def history(args: argparse.Namespace, err: Console, out: Console) -> int:
    if not 1 <= args.limit <= 100_000:
        raise ConfigError("--limit must be 1..100000")
    params = {"limit": str(args.limit)}
    if args.vm is not None:
        params["vm"] = args.vm
    async with _client(args) as client:
        entries = await client.get(f"{API_PREFIX}/history", params)
    if args.json:
        print_json(out, entries)
        return EXIT_OK
    rebuilt = []
    for entry in entries:
        data = dict(entry)
        key, when, who = data.pop("id"), data.pop("started_at"), data.pop("asked_by", None)
        rebuilt.append(HistoryEntry(int(key), str(when), data, who))
    out.print(history_table(rebuilt))
    return EXIT_OK


# -- jobs ---------------------------------------------------------------------------------------


async def _poll(client: ServiceClient, job: int) -> dict[str, Any]:
    """The job once it ended, asked every second (the event stream broke)."""
    while True:
        record: dict[str, Any] = await client.get(f"{API_PREFIX}/jobs/{job}")
        if JobState(record["state"]).is_final:
            return record
        await asyncio.sleep(1.0)


async def _follow(
    client: ServiceClient, job: int, err: Console, title: Mapping[str, str]
) -> dict[str, Any]:
    """Show the job's progress until it ends; the job's final record.

    Args:
        title: the progress line's title per VM (one move: a live progress line; several:
            a line per change of phase).
    """
    from vmferry.cli.progress import ProgressLine

    lines = {vm: ProgressLine(err, text) for vm, text in title.items()} if len(title) == 1 else {}
    for line in lines.values():
        line.__enter__()
    phases: dict[str, str] = {}
    try:
        async with contextlib.aclosing(client.events(job)) as events:
            async for event in events:
                data = event.data
                if event.kind == "job" and JobState(data["state"]).is_final:
                    break
                vm = data.get("vm")
                if event.kind == "plan" and vm in lines:
                    lines[vm].hint(EtaHints(data["zero_fraction"], data["dirty_rate_bps"],
                                            data["dirty_set_bytes"]))  # fmt: skip
                elif event.kind == "progress" and isinstance(vm, str):
                    stats = None if data["stats"] is None else stats_from_json(data["stats"])
                    if vm in lines:
                        lines[vm].update(Phase(data["phase"]), stats)
                    elif phases.get(vm) != data["phase"]:
                        phases[vm] = data["phase"]
                        err.print(f"{vm}: {data['phase']}", highlight=False)
    except ServiceUnreachable:
        pass  # the stream broke: ask for the outcome
    except asyncio.CancelledError:
        err.print(f"job {job} goes on in the service (GET {API_PREFIX}/jobs/{job})")
        raise
    finally:
        for line in lines.values():
            line.__exit__(None, None, None)
    return await _poll(client, job)


def _ended(record: Mapping[str, Any]) -> tuple[int, Any]:
    """The exit status and the result to print of a job that ended.

    Raises:
        ConfigError: refused with nothing to show (bad input, unknown VM, no room…).
        FerryError: failed, cancelled or interrupted with nothing to show.
    """
    state = JobState(record["state"])
    result, error = record.get("result"), record.get("error")
    if result is not None and state in _EXIT_BY_STATE:
        return _EXIT_BY_STATE[state], result
    message = error["message"] if isinstance(error, dict) else f"job {record['id']} {state}"
    if state is JobState.REFUSED:
        raise ConfigError(message)
    raise FerryError(f"job {record['id']} {state}: {message}")


async def _run_job(
    args: argparse.Namespace, err: Console, path: str, body: dict[str, Any],
    title: Mapping[str, str],
) -> tuple[int, Any]:  # fmt: skip
    async with _client(args) as client:
        job = await client.post(path, body)
        err.print(f"job {job['id']} ({job['kind']}) started by the service", highlight=False)
        record = await _follow(client, int(job["id"]), err, title)
    return _ended(record)


async def migrate(args: argparse.Namespace, err: Console, out: Console) -> int:
    body = {
        "vm": args.name, "to": args.to, "strategy": args.strategy,
        "max_downtime_ms": args.max_downtime, "deadline_s": args.deadline,
        "bandwidth_mbps": args.bandwidth, "force": args.force,
        "allow_postcopy": not args.no_postcopy, "plan": not args.no_plan,
        "recovery_limit_s": args.recovery_limit, "tls": args.tls, "verify": args.verify,
    }  # fmt: skip
    title = {args.name: f"{args.name} → {args.to}"}
    code, report = await _run_job(args, err, f"{API_PREFIX}/migrations", body, title)
    if args.json:
        print_json(out, report)
    else:
        out.print(_reports_table([report]))
    return code


def _job_body(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "bandwidth_mbps": args.bandwidth, "max_downtime_ms": args.max_downtime,
        "max_outbound": args.max_outbound, "max_inbound": args.max_inbound,
        "dry_run": args.dry_run,
    }  # fmt: skip


async def host_evacuate(args: argparse.Namespace, err: Console, out: Console) -> int:
    body = {**_job_body(args), "host": args.host, "to": args.to, "deadline_s": args.deadline}
    code, result = await _run_job(args, err, f"{API_PREFIX}/evacuations", body, {})
    _show_job(result, args, out)
    return code


async def balance(args: argparse.Namespace, err: Console, out: Console) -> int:
    body = {**_job_body(args), "max_moves": args.max_moves, "cool_down_min": args.cool_down}
    code, result = await _run_job(args, err, f"{API_PREFIX}/balance", body, {})
    _show_job(result, args, out)
    return code


async def reconcile(args: argparse.Namespace, err: Console, out: Console) -> int:
    from vmferry.cli.render import reconcile_table
    from vmferry.controller.reconcile import Reconciled

    code, results = await _run_job(args, err, f"{API_PREFIX}/reconcile", {"wait_s": args.wait}, {})
    if args.json:
        print_json(out, results)
        return code
    rebuilt = [
        Reconciled(
            vm=r["vm"], verdict=r["verdict"], reason=r["reason"], done=list(r["done"]),
            running_on=r["running_on"], error=r["error"],
            integrity=None if r["integrity"] is None else integrity_from_json(r["integrity"]),
        )
        for r in results
    ]  # fmt: skip
    out.print(reconcile_table(rebuilt))
    return code


# -- VMs, plans, jobs of many moves, maintenance --------------------------------------------------

_VERIFY_TIMEOUT_S = 600.0  # a guest checks every page: minutes for a large one
_PLAN_TIMEOUT_S = 120.0  # a plan may measure the guest and the path first


def _vm_path(name: str, action: str = "") -> str:
    return f"{API_PREFIX}/vms/{quote(validate_name(name), safe='')}{action}"


async def vm_show(args: argparse.Namespace, err: Console, out: Console) -> int:
    async with _client(args) as client:
        info = await client.get(_vm_path(args.name))
    if args.json:
        print_json(out, info)
    else:
        out.print(vm_table([VmInfo.from_json(info)]))
    return EXIT_OK


_OWN_GUEST = ("image", "kernel", "initrd", "append", "nic", "heartbeat")


async def vm_create(args: argparse.Namespace, err: Console, out: Console) -> int:
    given = [f"--{o}" for o in _OWN_GUEST if getattr(args, o) not in (None, False)]
    if given or args.firmware != "bios":
        raise ConfigError(
            f"{', '.join(given) or '--firmware'}: your own guest's files are on this machine, "
            "so `vm create` of your own guest runs in-process (unset VMFERRY_URL)"
        )
    body = {"name": validate_name(args.name), "host": args.host, "group": args.group,
            "memory": args.memory, "vcpus": args.vcpus, "disk": args.disk,
            "disk_bus": args.disk_bus, "storage": args.storage, "workload": args.workload,
            "dry_run": args.dry_run}  # fmt: skip
    code, info = await _run_job(args, err, f"{API_PREFIX}/vms", body, {})
    if args.json:
        print_json(out, info)
    elif info.get("dry_run"):
        err.print(f"{info['vm']} would go to {info['host']}: {info['reason']} "
                  "(--dry-run: nothing created)")  # fmt: skip
        for verdict in info["hosts"][1:]:
            err.print(f"  not {verdict['host']}: {verdict['why_not']}" if not verdict["fits"]
                      else f"  {verdict['host']} fits too ({verdict['free_memory_bytes'] >> 20} "
                      f"MiB, {verdict['free_vcpus']} vCPUs free)")  # fmt: skip
    else:
        err.print(f"{info['name']} running on {info['host']} (pid {info['pid']})")
    return code


async def vm_delete(args: argparse.Namespace, err: Console, out: Console) -> int:
    async with _client(args) as client:
        deleted = await client.delete(_vm_path(args.name))
    if args.json:
        print_json(out, deleted)
    else:
        err.print(f"deleted {deleted['deleted']} from {deleted['host']}")
    return EXIT_OK


async def verify(args: argparse.Namespace, err: Console, out: Console) -> int:
    async with _client(args) as client:
        with status(err, f"verifying {args.name}…"):
            data = await client.post(_vm_path(args.name, "/verify"), {}, _VERIFY_TIMEOUT_S)
    if args.json:
        print_json(out, data)
    else:
        verdict = "intact" if data["ok"] else "DAMAGED"
        err.print(
            f"{data['vm']} on {data['host']}: {verdict} — {data['pages_checked']} pages checked, "
            f"{data['bad_pages']} bad"
        )
    return EXIT_OK if data["ok"] else EXIT_FAILED


async def plan(args: argparse.Namespace, err: Console, out: Console) -> int:
    from vmferry.cli.plan import request_from, show_plan

    request = request_from(args)  # refused here as in-process, before the service is asked
    params = {"to": request.destination, "max_downtime_ms": str(request.max_downtime_ms),
              "allow_postcopy": "true" if request.allow_postcopy else "false"}  # fmt: skip
    if request.deadline_s is not None:
        params["deadline_s"] = repr(request.deadline_s)
    if request.bandwidth_mbps is not None:
        params["bandwidth_mbps"] = str(request.bandwidth_mbps)
    async with _client(args) as client:
        with status(err, f"planning {request.vm}'s move to {request.destination}…"):
            made = await client.get(_vm_path(request.vm, "/plan"), params, _PLAN_TIMEOUT_S)
    return show_plan(made, args, err, out)


def _record(data: Mapping[str, Any]) -> JobRecord:
    """A job of many moves from its JSON (``JobRecord.to_json``)."""
    moves = tuple(
        JobMove(str(m["vm"]), str(m["source"]), str(m["destination"]), str(m["state"]),
                m.get("report"))
        for m in data["moves"]
    )  # fmt: skip
    return JobRecord(
        id=int(data["job"]), kind=str(data["kind"]), host=str(data["host"]),
        hosts=tuple(data["hosts"]), state=str(data["state"]), pid=int(data["pid"]),
        created_at=str(data["created_at"]), updated_at=str(data["updated_at"]),
        plan=dict(data.get("plan") or {}), report=data.get("report"), moves=moves,
    )  # fmt: skip


async def job_list(args: argparse.Namespace, err: Console, out: Console) -> int:
    from vmferry.cli.jobs import show_job_list

    params = {k: v for k, v in (("host", args.host), ("state", args.state)) if v is not None}
    async with _client(args) as client:
        rows = await client.get(f"{API_PREFIX}/controller-jobs", params)
    return show_job_list([_record(r) for r in rows], args, err, out)


async def job_show(args: argparse.Namespace, err: Console, out: Console) -> int:
    from vmferry.cli.jobs import show_job_record

    async with _client(args) as client:
        record = await client.get(f"{API_PREFIX}/controller-jobs/{int(args.id)}")
    return show_job_record(_record(record), args, err, out)


async def job_resume(args: argparse.Namespace, err: Console, out: Console) -> int:
    if not 0 < args.wait <= 86_400:
        raise ConfigError("--wait must be in (0, 86400] seconds")
    path = f"{API_PREFIX}/controller-jobs/{int(args.id)}/resume"
    code, report = await _run_job(args, err, path, {"wait_s": args.wait}, {})
    _show_job(report, args, out)
    _host_state(report, err)
    err.print(f"job {report.get('job')} {report.get('state')}", highlight=False)
    return code


async def host_maintenance(args: argparse.Namespace, err: Console, out: Console) -> int:
    body = {**_job_body(args), "host": args.host, "action": args.action,
            "bring_back": args.bring_back, "to": args.to, "deadline_s": args.deadline}  # fmt: skip
    code, result = await _run_job(args, err, f"{API_PREFIX}/maintenance", body, {})
    if args.json or result.get("moves"):
        _show_job(result, args, out)
    if args.action == "enter":
        _host_state(result, err)
    elif not result.get("moves"):
        err.print(f"{args.host} takes VMs again")
        away = result.get("moved_off") or []
        if away and not args.bring_back:
            err.print(
                f"{len(away)} VM(s) left it: {', '.join(away)} (--bring-back moves them back)"
            )
    return code


def _host_state(result: Mapping[str, Any], err: Console) -> None:
    """What became of a host a job emptied for maintenance (nothing: another kind of job)."""
    left, host = result.get("left_on_host"), result.get("host")
    if left:
        err.print(f"[red]{host} is not empty ({', '.join(left)}): still entering maintenance[/]")
    elif result.get("host_state") == "maintenance":
        err.print(f"{host} is in maintenance (empty; no VM is placed there)")


# -- tables of JSON results ---------------------------------------------------------------------


def _ms(value: object) -> str:
    return "-" if not isinstance(value, int) else f"{value} ms"


def _checks(report: Mapping[str, Any]) -> str:
    parts = []
    integrity, handoff, agent = (
        report.get("integrity"),
        report.get("handoff"),
        report.get("guest_agent"),
    )
    if isinstance(integrity, dict):
        verdict = "ok" if integrity.get("ok") else "BAD"
        parts.append(
            f"pages {verdict} {integrity.get('bad_pages')} bad / {integrity.get('pages_checked')}"
        )
    if isinstance(handoff, dict):
        parts.append(f"handoff {handoff.get('status')} ({handoff.get('mode')})")
    if isinstance(agent, dict):
        parts.append("guest agent answered" if agent.get("answered") else "guest agent silent")
    return "; ".join(parts) or "not checked"


def _reports_table(reports: list[Mapping[str, Any]]) -> Table:
    """``report_table``'s columns, from the reports' JSON."""
    from rich.table import Table

    names = sorted({str(r.get("vm")) for r in reports})
    table = Table(title=f"vmferry migrations of {', '.join(names)}")
    for column in ("move", "result", "total", "downtime\nQEMU/guest", "sent", "passes", "checks"):
        table.add_column(column)
    for r in reports:
        result = f"{r.get('status')} ({r.get('strategy')})"
        if r.get("recoveries"):
            result += f", post-copy recovered {r['recoveries']}x"
        if r.get("error") is not None:
            result += f": {r['error']}"
        table.add_row(
            f"{r.get('source')} → {r.get('destination')}", result, _ms(r.get("total_ms")),
            f"{_ms(r.get('downtime_ms'))} / {_ms(r.get('guest_downtime_ms'))}",
            format_bytes(r.get("transferred_bytes")), str(r.get("iterations")), _checks(r),
        )  # fmt: skip
    return table


def _show_job(result: Mapping[str, Any], args: argparse.Namespace, out: Console) -> None:
    """A job's result: its JSON, or a table of its moves."""
    if args.json:
        print_json(out, result)
        return
    from rich.table import Table

    table = Table(title=f"job {result.get('job')}: {result.get('kind')} {result.get('host')}"
                  + (" (dry run)" if result.get("dry_run") else ""))  # fmt: skip
    for column in ("VM", "from", "to", "status", "downtime", "felt", "verified"):
        table.add_column(column)
    for move in result.get("moves", []):
        report = move.get("report") or {}
        table.add_row(
            str(move.get("vm")), str(move.get("source")), str(move.get("destination")),
            str(report.get("status", "planned" if result.get("dry_run") else move.get("error"))),
            _ms(report.get("downtime_ms")), _ms(report.get("guest_downtime_ms")),
            "-" if "ok" not in move else ("yes" if move["ok"] else "no"),
        )  # fmt: skip
    for refused in result.get("refused", []):
        table.add_row(str(refused["vm"]), "", "[red]cannot move[/]", refused["reason"], "", "", "")
    out.print(table)
