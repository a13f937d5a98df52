"""What a job of many moves shows: its plan (a table), its progress (one line per move and one
ETA for the whole job: live on a terminal, whole lines in a pipe or a log) and its result."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from vmferry.cli.render import format_bytes
from vmferry.core.eta import EtaEstimator
from vmferry.core.job_progress import job_remaining_s

if TYPE_CHECKING:
    from rich.console import Console

    from vmferry.controller.evacuation import JobPlan
    from vmferry.controller.job_runner import JobResult, MoveResult
    from vmferry.core.cluster_model import Move
    from vmferry.core.model import MigrationStats
    from vmferry.core.phases import Phase

__all__ = ["JobView", "plan_table", "result_table"]


def _rate(cap_bps: float | None) -> str:
    return "uncapped" if cap_bps is None else f"{cap_bps * 8 / 1e6:.0f} Mbit/s"


def plan_table(plan: JobPlan) -> Table:
    """The planned moves: destination, why, predicted start, end and cap."""
    table = Table(title=f"{plan.kind} {plan.host}: planned moves")
    for column in ("VM", "to", "memory", "dirty", "strategy", "start", "end", "cap"):
        table.add_column(column)
    records = {} if plan.schedule is None else {r.move.name: r for r in plan.schedule.records}
    for move in plan.moves:
        record = records.get(move.name)
        table.add_row(
            move.name,
            move.destination,
            format_bytes(move.vm.memory_bytes),
            f"{format_bytes(move.vm.dirty_rate_bps)}/s",
            plan.strategy_of(move.name),
            "-" if record is None else f"{record.start_s:.1f} s",
            "-" if record is None else f"{record.end_s:.1f} s",
            "-" if record is None else _rate(record.caps[0][1]),
        )
    for vm, why in plan.refused:
        table.add_row(vm, "[red]cannot move[/]", "", "", "", "", "", why)
    return table


def result_table(result: JobResult) -> Table:
    """Every move as it ran, against its prediction."""
    schedule = result.plan.require_movable()
    predicted = {r.move.name: r for r in schedule.records}
    table = Table(
        title=f"job {result.job}: {result.plan.kind} {result.plan.host}, "
        f"{result.makespan_s:.1f} s (predicted {schedule.makespan_s:.1f} s)"
    )
    for column in ("VM", "to", "status", "took", "predicted", "downtime", "felt", "verified"):
        table.add_column(column)
    for move in result.moves:
        report, p = move.report, predicted.get(move.move.name)
        took = f"{move.end_s - move.start_s:.1f} s"
        planned = "-" if p is None else f"{p.end_s - p.start_s:.1f} s"
        if report is None:
            table.add_row(
                move.move.name,
                move.move.destination,
                "[red]refused[/]",
                took,
                planned,
                "",
                "",
                move.error or "",
            )
            continue
        ok = report.integrity is not None and report.integrity.ok
        table.add_row(
            move.move.name,
            move.move.destination,
            report.status if report.status != "completed" else "[green]completed[/]",
            took,
            planned,
            "-" if report.downtime_ms is None else f"{report.downtime_ms} ms",
            "-" if report.guest_downtime_ms is None else f"{report.guest_downtime_ms} ms",
            "yes" if move.ok else ("no" if ok is False else "-"),
        )
    return table


class JobView:
    """The live view of a running job (a :class:`~vmferry.controller.job_runner.JobObserver`).

    On a terminal every move has a line redrawn in place, and a last line gives the job's ETA.
    Elsewhere a line is printed when a move starts, changes phase (at most every ``every_s``
    in between) and ends, each followed by the job's ETA when it changed.
    """

    def __init__(
        self,
        console: Console,
        plan: JobPlan,
        *,
        every_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.console = console
        schedule = plan.require_movable()
        self._planned: dict[str, tuple[float, float]] = {
            r.move.name: (r.start_s, r.end_s) for r in schedule.records
        }
        self._order: list[str] = [r.move.name for r in schedule.records]
        self._dest: dict[str, str] = {m.name: m.destination for m in plan.moves}
        self._lines: dict[str, Text] = {
            vm: Text(f"{vm} → {self._dest[vm]}: waiting") for vm in self._order
        }
        self._eta: dict[str, EtaEstimator] = {}
        self._started: dict[str, float] = {}
        self._ended: dict[str, float] = {}
        self._shown: dict[str, tuple[str, float]] = {}
        self._clock, self._every_s = clock, every_s
        self._began = clock()
        self._live = Live(self._render(), console=console) if console.is_terminal else None

    def __enter__(self) -> JobView:
        if self._live is not None:
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.update(self._render())
            self._live.__exit__(None, None, None)

    def _now_s(self) -> float:
        return self._clock() - self._began

    def job_line(self) -> Text:
        running = {
            vm: (start, None if (eta := self._eta[vm].eta_ms()) is None else eta / 1000)
            for vm, start in self._started.items()
            if vm not in self._ended
        }
        left = job_remaining_s(self._planned, self._now_s(), ended=self._ended, running=running)
        line = Text("job ", style="bold")
        line.append(
            f"{len(self._ended)}/{len(self._order)} done, {len(running)} moving, "
            f"{self._now_s():.1f} s elapsed, ETA {left:.1f} s"
        )
        return line

    def _render(self) -> Group:
        return Group(*(self._lines[vm] for vm in self._order), self.job_line())

    def _show(self, vm: str, key: str, *, force: bool) -> None:
        if self._live is not None:
            self._live.update(self._render())
            return
        now = self._clock()
        shown = self._shown.get(vm)
        if force or shown is None or shown[0] != key or now - shown[1] >= self._every_s:
            self.console.print(self._lines[vm])
            self._shown[vm] = (key, now)
            if force:
                self.console.print(self.job_line())

    def started(self, move: Move, cap_bps: float | None, at_s: float) -> None:
        self._started[move.name] = at_s
        self._eta[move.name] = EtaEstimator()
        self._lines[move.name] = Text(
            f"{move.name} → {move.destination}: started, {_rate(cap_bps)}"
        )
        self._show(move.name, "started", force=True)

    def progress(self, vm: str, phase: Phase, stats: MigrationStats | None) -> None:
        line = Text(f"{vm} → {self._dest[vm]}: ", style="bold")
        line.append(phase.value, style="cyan")
        if stats is not None:
            self._eta[vm].add(stats)
            eta = self._eta[vm].eta_ms()
            line.append(
                f" {format_bytes(stats.transferred_bytes)} sent"
                f", {format_bytes(stats.remaining_bytes)} left"
                f", {format_bytes(stats.throughput_bps)}/s"
                f", {stats.total_ms / 1000:.1f} s"
                + (f", ETA {eta / 1000:.1f} s" if eta is not None else "")
            )
        self._lines[vm] = line
        self._show(vm, phase.value, force=False)

    def ended(self, result: MoveResult) -> None:
        vm = result.move.name
        self._ended[vm] = result.end_s
        report = result.report
        line = Text(f"{vm} → {result.move.destination}: ")
        if report is None:
            line.append(f"refused: {result.error}", style="red")
        elif result.ok:
            line.append("completed", style="green")
            line.append(
                f" in {result.end_s - result.start_s:.1f} s, downtime {report.downtime_ms} ms, "
                f"felt {report.guest_downtime_ms} ms, verified"
            )
        else:
            line.append(f"{report.status}: {report.error or 'not verified'}", style="red")
        self._lines[vm] = line
        self._show(vm, "ended", force=True)
