"""Rendering for the CLI: tables of VMs, hosts, plans and reports, and ``--json`` output (Rich).

The live progress line of a move is :mod:`vmferry.cli.progress`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from rich.table import Table

if TYPE_CHECKING:  # only for annotations: a command imports what it shows, no more
    from rich.console import Console

    from vmferry.agent.api import VmInfo
    from vmferry.controller.history import HistoryEntry
    from vmferry.controller.reconcile import Reconciled
    from vmferry.core.model import MigrationReport
    from vmferry.lab.cluster import HostStatus

__all__ = [
    "format_bytes",
    "history_table",
    "hosts_table",
    "plan_table",
    "print_json",
    "report_table",
    "vm_table",
]


def print_json(out: Console, data: object) -> None:
    """``--json`` output: ``data`` as JSON on ``out``, highlighted on a terminal.

    Elsewhere (a pipe, a file) Rich prints no colours: its text is ``json.dumps``' with an
    indent of 2, written here without the ~10 ms Rich spends highlighting it.
    """
    if out.is_terminal:
        out.print_json(json.dumps(data))
    else:
        out.file.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        out.file.flush()


def status(console: Console, message: str) -> contextlib.AbstractContextManager[object]:
    """``console.status(message)``: a spinner while a step runs, on a terminal. Elsewhere Rich
    draws nothing either, but it would still load its spinners and start a refresh thread (a
    few ms of a ``plan``)."""
    if console.is_terminal:
        return console.status(message)
    return contextlib.nullcontext()


def format_bytes(value: int | None) -> str:
    """Human-readable binary size (``1.5 GiB``)."""
    if value is None:
        return "-"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def _ms(value: int | None) -> str:
    if value is None:
        return "-"
    return f"{value} ms" if value < 10_000 else f"{value / 1000:.1f} s"


def reconcile_table(results: Sequence[Reconciled]) -> Table:
    """One row per VM: what reconciling found and did."""
    table = Table(title="vmferry reconcile")
    table.add_column("VM")
    table.add_column("verdict")
    table.add_column("runs on")
    table.add_column("done / why")
    for result in results:
        done = "; ".join(result.done) or "nothing to do"
        why = result.error or result.reason
        bad = result.verdict in ("lost", "conflict", "failed", "in-flight")
        if result.integrity is not None:
            done += f" (verified: {'ok' if result.integrity.ok else 'BAD'})"
        table.add_row(
            result.vm,
            result.verdict,
            result.running_on or "-",
            f"{done} — {why}",
            style="red" if bad else None,
        )
    return table


def report_table(reports: Sequence[MigrationReport]) -> Table:
    """A summary table, one row per migration (fits 80 columns)."""
    names = sorted({report.vm for report in reports})
    table = Table(title=f"vmferry migrations of {', '.join(names)}")
    table.add_column("move")
    table.add_column("result")
    table.add_column("total", justify="right")
    table.add_column("downtime\nQEMU/guest", justify="right")
    table.add_column("sent", justify="right")
    table.add_column("passes", justify="right")
    table.add_column("checks")
    for report in reports:
        verdict = check_text(report)
        result = f"{report.status} ({report.strategy})"
        if report.recoveries:
            result += f", post-copy recovered {report.recoveries}x"
        if report.error is not None:
            result += f": {report.error}"
        table.add_row(
            f"{report.source} → {report.destination}",
            result,
            _ms(report.total_ms),
            f"{_ms(report.downtime_ms)} / {_ms(report.guest_downtime_ms)}",
            format_bytes(report.transferred_bytes),
            str(report.iterations),
            verdict,
            style=None if report.is_success else "red",
        )
    return table


def check_text(report: MigrationReport) -> str:
    """What vouched for the guest after a move: the lab guest's page check, the comparison
    of both copies at the handoff, the guest agent."""
    parts = []
    integrity = report.integrity
    if integrity is not None:
        blocks = (
            f", {integrity.bad_blocks} bad / {integrity.blocks_checked} blocks"
            if integrity.blocks_checked
            else ""
        )
        parts.append(
            f"pages {'ok' if integrity.ok else 'BAD'} {integrity.bad_pages} bad"
            f" / {integrity.pages_checked}{blocks}"
        )
    handoff = report.handoff
    if handoff is not None and handoff.ram is not None:
        compared = [c for c in (handoff.ram, handoff.disk) if c is not None]
        what = " + ".join(
            f"{c.kind} {format_bytes(c.bytes_compared)}"
            + ("" if c.ok else f" ({c.differing_chunks} chunks DIFFER)")
            for c in compared
        )
        parts.append(f"handoff {handoff.status} ({handoff.mode}: {what})")
    elif handoff is not None:
        parts.append("handoff not compared")
    agent = report.guest_agent
    if agent is not None:
        parts.append(
            "guest agent answered" + (", clock set" if agent.clock_synced else "")
            if agent.answered
            else "guest agent silent"
        )
    return "; ".join(parts) or "not checked"


def vm_table(vms: Sequence[VmInfo]) -> Table:
    """VMs of the cluster, one row each."""
    table = Table(title="VMs")
    for column in ("name", "host", "state", "memory", "vcpus", "disk", "workload", "pid"):
        table.add_column(column)
    for vm in vms:
        disk = vm.disk or {}
        table.add_row(
            vm.name,
            vm.host,
            vm.state,
            format_bytes(vm.memory_bytes),
            str(vm.vcpus),
            "-"
            if not disk
            else f"{format_bytes(int(str(disk.get('size_bytes', 0))))} "
            f"{disk.get('bus')} {disk.get('storage')}",
            vm.workload if vm.boot is None else "(own guest)",
            "-"
            if vm.pid is None
            else str(vm.pid) + ("" if vm.qemu_uid is None else f" (uid {vm.qemu_uid})"),
            style=None if vm.state == "running" else "yellow",
        )
    return table


def hosts_table(statuses: Sequence[HostStatus]) -> Table:
    """Lab hosts and whether their agents answer."""
    table = Table(title="lab hosts")
    for column in ("host", "agent", "reachable", "VMs", "memory used / offered"):
        table.add_column(column)
    for status in statuses:
        info = status.info or {}
        used, total = info.get("memory_used_bytes"), info.get("memory_bytes")
        table.add_row(
            status.name,
            status.url,
            "yes" if status.reachable else f"no: {status.error}",
            str(info.get("vms", "-")),
            (
                f"{format_bytes(used)} / {format_bytes(total)}"
                if isinstance(used, int) and isinstance(total, int)
                else "-"
            ),
            style=None if status.reachable else "red",
        )
    return table


def history_table(entries: Sequence[HistoryEntry]) -> Table:
    """Past migrations, oldest first."""
    table = Table(title="migration history")
    columns = ("#", "when", "VM", "move", "strategy", "status", "total", "downtime QEMU/guest")
    for column in (*columns, "check", "asked by"):
        table.add_column(column)
    for entry in entries:
        r = entry.report
        integrity = r.get("integrity")
        check = "-"
        if isinstance(integrity, dict):
            check = "ok" if integrity.get("ok") else f"BAD ({integrity.get('bad_pages')})"
        total, downtime, felt = r.get("total_ms"), r.get("downtime_ms"), r.get("guest_downtime_ms")
        table.add_row(
            str(entry.id),
            entry.started_at,
            str(r.get("vm")),
            f"{r.get('source')} → {r.get('destination')}",
            str(r.get("strategy")),
            str(r.get("status")),
            _ms(total if isinstance(total, int) else None),
            f"{_ms(downtime if isinstance(downtime, int) else None)} / "
            f"{_ms(felt if isinstance(felt, int) else None)}",
            check,
            entry.asked_by or "-",
        )
    return table


def plan_table(plan: Mapping[str, Any]) -> Table:
    """Predictions per strategy, recommended one first in bold (from the plan's JSON, so
    ``plan`` shows the same in-process and from a service)."""
    m = plan["measured"]
    title = (
        f"plan for {plan['vm']}: {plan['source']} → {plan['destination']}\n"
        f"RAM {format_bytes(m['ram_bytes'])}, {m['zero_fraction']:.0%} zero, compresses "
        f"{m['compress_ratio']:.1f}x"
        + (
            f" (the pages it changes {changed:.1f}x)"
            if (changed := m.get("dirty_compress_ratio")) is not None
            and abs(changed - m["compress_ratio"]) >= 0.1
            else ""
        )
        + f", dirties {format_bytes(m['dirty_rate_bps'])}/s"
        f"{' (CPU-bound)' if m['dirty_is_cpu_bound'] else ''}, "
        f"link {format_bytes(m['bandwidth_bps'])}/s"
        + (
            f"\nrewrites {format_bytes(unchanged)}/s of pages unchanged (QEMU counted them "
            "during its last moves"
            + ("; a pre-copy stalled on them)" if m.get("rewrites_keep_pace") else ")")
            if (unchanged := m.get("rewritten_unchanged_bps"))
            else ""
        )
        + (
            f"\ndisk {format_bytes(m['disk_copy_bytes'])} to copy, "
            f"guest writes {format_bytes(m['disk_write_bps'])}/s"
            if m["disk_copy_bytes"]
            else ""
        )
    )
    table = Table(title=title)
    for column in ("strategy", "total", "downtime\nQEMU/guest", "sent", "note"):
        table.add_column(column)
    for p in plan["predictions"]:
        chosen = p["strategy"] == plan["recommended"]
        table.add_row(
            p["strategy"] + (" ◀" if chosen else ""),
            (_ms(p["total_ms"]) if p["converges"] else "never")
            + (f"\n(disk {_ms(p['disk_ms'])})" if p["disk_ms"] else ""),
            f"{_ms(p['downtime_ms'])} / {_ms(p['guest_downtime_ms'])}",
            format_bytes(p["transferred_bytes"]),
            p["note"] + (f" Risk: {p['risk']}" if p["risk"] else ""),
            style="bold" if chosen else (None if p["converges"] else "dim"),
        )
    return table
