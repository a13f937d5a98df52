"""Benchmark matrix: every strategy against a grid of workloads, through the vmferry CLI.

In the spirit of QEMU's guestperf: a lab of two hosts (network namespaces joined by links shaped
to ``--link-mbps``, or loopback with the stream capped to the same rate), one lab guest per
workload *cell*, moved back and forth between host-1 and host-2 once per strategy with
``vmferry migrate NAME --to OTHER --strategy S --max-downtime MS --deadline S --json``.
What it measures is what a user gets: process start-up, pre-checks, measuring, verifying.

Cells: paced dirtying at {0.25, 1, 4} x the link's bytes/s x patterns {zero, compressible,
random}, plus CPU-bound dirtying (as fast as the vCPU goes) per pattern. Strategies: precopy
(QEMU's defaults, the baseline), multifd, xbzrle, auto-converge, postcopy, hybrid, cold and
auto (vmferry's choice; if it refuses the goal as unreachable, that is recorded and the run is
retried with ``--force``). A run that hits the deadline is cancelled by vmferry and counts as a
failure of that strategy.

    uv run python bench/matrix.py [--quick] [--dry-run] [--loopback] [--link-mbps 200]
        [--memory 512M] [--ws 128M] [--max-downtime 500] [--deadline 60]
        [--strategies precopy,auto] [--out bench/results/matrix.json] [--png …/matrix.png]

Writes the results JSON (per cell and strategy, plus a summary) after every run, and a PNG at
the end: the outcome grid and predicted-vs-actual total time. Root is needed unless
``--loopback``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster_cli import vmferry_json
from vmferry.core.workload import parse_size

STRATEGIES = ("precopy", "multifd", "xbzrle", "auto-converge", "postcopy", "hybrid", "cold", "auto")
RATE_MULTIPLES = (0.25, 1.0, 4.0)
PATTERNS = ("zero", "compressible", "random")
HOSTS = ("host-1", "host-2")
QUICK_CELLS = ("paced-0.25x-random", "paced-4x-random", "paced-1x-compressible", "cpu-random")
QUICK_DEADLINE_S = 30
DEFAULT_DEADLINE_S = 60
# Outcome of one run, in the order the PNG's colour map uses.
OUTCOMES = ("within-goal", "over-goal", "failed", "damaged", "refused", "error")
OUTCOME_COLOURS = ("#4caf50", "#ffb300", "#e53935", "#6a1b9a", "#9e9e9e", "#424242")
# Rough per-run costs for the start-up estimate (seconds), calibrated on this lab under TCG.
RUN_OVERHEAD_S = 4.0
CELL_OVERHEAD_S = 15.0
# A move sends about 1.8x the working set (kernel, page headers, re-sent pages).
COPY_FACTOR = 1.8


@dataclass(frozen=True, slots=True)
class Cell:
    """One workload of the matrix."""

    name: str
    pattern: str
    mode: str  # "paced" | "cpu"
    rate_multiple: float | None
    workload: str


@dataclass(frozen=True, slots=True)
class CliOutcome:
    """One ``vmferry … --json`` process."""

    exit_code: int | None  # None: killed after the bench's own timeout
    wall_ms: int
    data: Any
    stderr_tail: str


def _multiple_label(multiple: float) -> str:
    return f"{multiple:g}x"


def make_cells(link_bps: int, ws: str) -> list[Cell]:
    """All cells: paced rates x patterns, then one CPU-bound cell per pattern."""
    cells = []
    for multiple in RATE_MULTIPLES:
        for pattern in PATTERNS:
            rate = round(multiple * link_bps)
            cells.append(
                Cell(
                    name=f"paced-{_multiple_label(multiple)}-{pattern}",
                    pattern=pattern,
                    mode="paced",
                    rate_multiple=multiple,
                    workload=f"dirty:rate={rate},size={ws},pattern={pattern},mode=paced",
                )
            )
    for pattern in PATTERNS:
        cells.append(
            Cell(
                name=f"cpu-{pattern}",
                pattern=pattern,
                mode="cpu",
                rate_multiple=None,
                workload=f"dirty:size={ws},pattern={pattern},mode=cpu",
            )
        )
    return cells


def _likely_fails(cell: Cell, strategy: str) -> bool:
    """Crude guess for the estimate: pre-copy variants stall when dirtying outruns the link."""
    if cell.pattern == "zero" or strategy in ("postcopy", "hybrid", "cold", "auto"):
        return False
    busy = cell.mode == "cpu" or (cell.rate_multiple or 0) >= 1
    if strategy == "multifd":
        return busy and cell.pattern == "random"
    if strategy == "auto-converge":
        return busy and cell.mode == "paced"  # throttling does not slow a clock-paced guest
    return busy


def estimate_s(
    cells: list[Cell], strategies: list[str], link_bps: int, ws_bytes: int, deadline_s: float
) -> tuple[float, float]:
    """(likely, worst case) wall time of the whole matrix, in seconds."""
    copy_s = COPY_FACTOR * ws_bytes / link_bps
    factor = {"postcopy": 1.0, "hybrid": 1.5, "cold": 0.8, "auto": 1.1}
    likely = worst = CELL_OVERHEAD_S * len(cells)
    for cell in cells:
        for strategy in strategies:
            worst += deadline_s + RUN_OVERHEAD_S
            if _likely_fails(cell, strategy):
                likely += deadline_s + RUN_OVERHEAD_S
            else:
                likely += min(deadline_s, copy_s * factor.get(strategy, 1.0)) + RUN_OVERHEAD_S
    return likely, worst


# -- running the CLI ----------------------------------------------------------------------------


def cli(lab_dir: Path, *args: str, timeout_s: float = 300) -> CliOutcome:
    """Run ``python -m vmferry.cli.main ARGS --json`` against the lab in ``lab_dir``."""
    started = time.monotonic()
    try:
        result, wall = vmferry_json(lab_dir, *args, timeout_s=timeout_s)
    except subprocess.TimeoutExpired as err:
        stderr = err.stderr.decode(errors="replace") if isinstance(err.stderr, bytes) else ""
        wall_ms = round((time.monotonic() - started) * 1000)
        return CliOutcome(None, wall_ms, None, f"bench timeout after {timeout_s:.0f} s; {stderr}")
    wall_ms = round(wall)
    try:
        data = json.loads(result.stdout) if result.stdout.strip() else None
    except json.JSONDecodeError:
        data = None
    return CliOutcome(result.returncode, wall_ms, data, result.stderr.strip()[-600:])


def _locate(lab_dir: Path, vm: str) -> str | None:
    shown = cli(lab_dir, "vm", "show", vm)
    if shown.exit_code == 0 and isinstance(shown.data, dict):
        return str(shown.data.get("host"))
    return None


def _create(lab_dir: Path, vm: str, cell: Cell, memory: str, settle_s: float) -> CliOutcome:
    created = cli(
        lab_dir, "vm", "create", vm, "--host", HOSTS[0], "--memory", memory,
        "--workload", cell.workload,
    )  # fmt: skip
    if created.exit_code == 0:
        time.sleep(settle_s)  # let the guest fill its working set and reach its dirty rate
    return created


# -- one run ------------------------------------------------------------------------------------


def _ratio(numerator: float, denominator: float) -> float | None:
    return round(numerator / denominator, 4) if denominator > 0 else None


def classify(record: dict[str, Any], max_downtime_ms: int, deadline_s: float) -> str:
    """One of OUTCOMES for a run record."""
    status = record.get("status")
    if status is None:
        return "refused" if record.get("exit_code") == 2 else "error"
    integrity = record.get("integrity")
    if not record.get("guest_alive", True) or (integrity is not None and not integrity["ok"]):
        return "damaged"
    if status != "completed":
        return "failed"
    downtime = record.get("downtime_ms")
    within = (downtime is None or downtime <= max_downtime_ms) and record[
        "total_ms"
    ] <= deadline_s * 1000
    return "within-goal" if within else "over-goal"


def make_record(
    strategy: str,
    outcome: CliOutcome,
    refused: CliOutcome | None,
    max_downtime_ms: int,
    deadline_s: float,
) -> dict[str, Any]:
    """The result of one strategy on one cell, with prediction errors."""
    report = outcome.data if isinstance(outcome.data, dict) and "status" in outcome.data else {}
    record: dict[str, Any] = {
        "strategy": strategy,
        "chosen": report.get("strategy"),
        "exit_code": outcome.exit_code,
        "status": report.get("status"),
        "error": report.get("error") if report else outcome.stderr_tail or None,
        "source": report.get("source"),
        "destination": report.get("destination"),
        "running_on": report.get("running_on"),
        "total_ms": report.get("total_ms"),
        "downtime_ms": report.get("downtime_ms"),
        "guest_downtime_ms": report.get("guest_downtime_ms"),
        "transferred_bytes": report.get("transferred_bytes"),
        "iterations": report.get("iterations"),
        "predicted": report.get("predicted"),
        "integrity": report.get("integrity"),
        "guest_alive": report.get("guest_alive"),
        "wall_ms": outcome.wall_ms + (refused.wall_ms if refused else 0),
        "refused": None,
        "forced": refused is not None,
    }
    if refused is not None:
        record["refused"] = {"exit_code": refused.exit_code, "message": refused.stderr_tail}
    derive(record, max_downtime_ms, deadline_s)
    return record


def derive(record: dict[str, Any], max_downtime_ms: int, deadline_s: float) -> None:
    """(Re)compute a record's outcome and prediction errors from its report fields."""
    record["outcome"] = classify(record, max_downtime_ms, deadline_s)
    record["guest_within_goal"] = (
        record["outcome"] in ("within-goal", "over-goal")
        and record["guest_downtime_ms"] is not None
        and record["guest_downtime_ms"] <= max_downtime_ms
    )
    record.update(prediction_errors(record))
    record["predicted_finish_but_failed"] = _predicted_finish_but_failed(record, deadline_s)


def _predicted_finish_but_failed(record: dict[str, Any], deadline_s: float) -> bool | None:
    """A prediction of finishing within the deadline for a run that did not complete."""
    predicted = record.get("predicted")
    if not predicted or predicted.get("total_ms") is None or record.get("status") is None:
        return None
    return bool(record["status"] != "completed" and predicted["total_ms"] <= deadline_s * 1000)


def prediction_errors(record: dict[str, Any]) -> dict[str, Any]:
    """|predicted - actual| for a completed run (nulls when either side is missing)."""
    errors: dict[str, Any] = {
        "total_rel_err": None,
        "downtime_abs_err_ms": None,
        "downtime_rel_err": None,
        "downtime_pred_ok": None,
    }
    predicted = record.get("predicted")
    if not predicted or record.get("status") != "completed":
        return errors
    total = record.get("total_ms")
    if total is not None and predicted.get("total_ms") is not None:
        errors["total_rel_err"] = _ratio(abs(predicted["total_ms"] - total), total)
    downtime = record.get("downtime_ms")
    if downtime is not None and predicted.get("downtime_ms") is not None:
        delta = abs(predicted["downtime_ms"] - downtime)
        errors["downtime_abs_err_ms"] = delta
        errors["downtime_rel_err"] = _ratio(delta, downtime)
        errors["downtime_pred_ok"] = delta <= max(20.0, 0.3 * downtime)
    return errors


def run_strategy(
    lab_dir: Path, vm: str, here: str, strategy: str, args: argparse.Namespace
) -> dict[str, Any]:
    """Move ``vm`` from ``here`` to the other host with one strategy."""
    there = HOSTS[1] if here == HOSTS[0] else HOSTS[0]
    argv = [
        "migrate", vm, "--to", there, "--strategy", strategy,
        "--max-downtime", str(args.max_downtime), "--deadline", f"{args.deadline:g}",
    ]  # fmt: skip
    if args.loopback:
        argv += ["--bandwidth", str(args.link_mbps)]  # loopback: the cap stands in for the link
    timeout_s = args.deadline + 600  # post-copy cannot be cancelled once switched over
    outcome = cli(lab_dir, *argv, timeout_s=timeout_s)
    refused = None
    if strategy == "auto" and outcome.exit_code == 2:
        refused = outcome
        outcome = cli(lab_dir, *argv, "--force", timeout_s=timeout_s)
    record = make_record(strategy, outcome, refused, args.max_downtime, args.deadline)
    record["source"] = record["source"] or here
    record["destination"] = record["destination"] or there
    return record


def _seconds(ms: int | None) -> str:
    return "-" if ms is None else f"{ms / 1000:.1f}s"


def run_line(cell: Cell, record: dict[str, Any]) -> str:
    """One human line per run."""
    parts = [f"{cell.name:<24} {record['strategy']:<13} {record['outcome']:<11}"]
    if record["status"] is not None:
        chosen = record["chosen"] if record["chosen"] != record["strategy"] else ""
        parts.append(
            f"{record['status']:<9} total {_seconds(record['total_ms'])} "
            f"downtime {record['downtime_ms']} ms (guest {record['guest_downtime_ms']} ms) "
            f"moved {(record['transferred_bytes'] or 0) / 2**20:.0f} MiB "
            f"iters {record['iterations']}"
        )
        if chosen:
            parts.append(f"chose {chosen}{' (forced)' if record['forced'] else ''}")
        predicted = record["predicted"]
        if predicted:
            parts.append(
                f"pred {_seconds(predicted.get('total_ms'))}/{predicted.get('downtime_ms')} ms"
            )
    if record["error"]:
        parts.append(f"error: {' '.join(str(record['error']).split())[:160]}")
    parts.append(f"wall {_seconds(record['wall_ms'])}")
    return "  ".join(parts)


# -- the matrix ---------------------------------------------------------------------------------


def run_cell(
    lab_dir: Path,
    index: int,
    cell: Cell,
    args: argparse.Namespace,
    into: list[dict[str, Any]],
    on_run: Callable[[Cell, dict[str, Any]], None],
) -> None:
    """Create the cell's VM, run every strategy on it (appending to ``into``), delete it."""
    vm = f"mx{index:02d}"
    result: dict[str, Any] = {
        "cell": cell.name,
        "workload": cell.workload,
        "pattern": cell.pattern,
        "mode": cell.mode,
        "rate_multiple": cell.rate_multiple,
        "vm": vm,
        "notes": [],
        "runs": {},
    }
    into.append(result)  # partial cells are saved too
    created = _create(lab_dir, vm, cell, args.memory, args.settle)
    if created.exit_code != 0:
        note = f"vm create failed ({created.exit_code}): {created.stderr_tail}"
        result["notes"].append(note)
        print(f"{cell.name:<24} {note}", flush=True)
        for strategy in args.strategies:
            outcome = CliOutcome(created.exit_code, 0, None, f"not run: {note}")
            result["runs"][strategy] = make_record(
                strategy, outcome, None, args.max_downtime, args.deadline
            )
            on_run(cell, result["runs"][strategy])
        return
    here: str | None = HOSTS[0]
    try:
        for strategy in args.strategies:
            if here is None:
                note = f"{vm} lost: not found on any host; recreating it on {HOSTS[0]}"
                result["notes"].append(note)
                print(f"{cell.name:<24} {note}", flush=True)
                cli(lab_dir, "vm", "delete", vm)
                _create(lab_dir, vm, cell, args.memory, args.settle)
                here = _locate(lab_dir, vm)
            if here is None:
                outcome = CliOutcome(None, 0, None, "not run: the cell's VM could not be recreated")
                record = make_record(strategy, outcome, None, args.max_downtime, args.deadline)
            else:
                record = run_strategy(lab_dir, vm, here, strategy, args)
                here = record["running_on"] or _locate(lab_dir, vm)
                if record["outcome"] == "damaged":
                    # A damaged guest would taint every later strategy of this cell.
                    note = f"after {strategy}: guest damaged; recreating it"
                    result["notes"].append(note)
                    print(f"{cell.name:<24} {note}", flush=True)
                    cli(lab_dir, "vm", "delete", vm)
                    created = _create(lab_dir, vm, cell, args.memory, args.settle)
                    here = HOSTS[0] if created.exit_code == 0 else None
            result["runs"][strategy] = record
            on_run(cell, record)
    finally:
        deleted = cli(lab_dir, "vm", "delete", vm)
        if deleted.exit_code != 0:
            result["notes"].append(f"vm delete failed: {deleted.stderr_tail}")


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 4) if values else None


def summarize(cells: list[dict[str, Any]], strategies: list[str]) -> dict[str, Any]:
    """Per-strategy outcomes, how auto did, and how good the predictions were."""
    per_strategy: dict[str, Any] = {}
    for strategy in strategies:
        runs = [c["runs"][strategy] for c in cells if strategy in c["runs"]]
        counts = {o: sum(r["outcome"] == o for r in runs) for o in OUTCOMES}
        completed = [r["total_ms"] for r in runs if r["status"] == "completed"]
        per_strategy[strategy] = {
            "runs": len(runs),
            "succeeded": sum(
                r["status"] == "completed" and r["outcome"] != "damaged" for r in runs
            ),
            **counts,
            "median_total_ms": _median(completed),
        }
    autos = [c for c in cells if "auto" in c["runs"]]
    feasible = [
        c
        for c in autos
        if any(r["outcome"] == "within-goal" for s, r in c["runs"].items() if s != "auto")
    ]
    chosen: dict[str, int] = {}
    for c in autos:
        name = str(c["runs"]["auto"]["chosen"])
        chosen[name] = chosen.get(name, 0) + 1
    auto = {
        "cells": len(autos),
        "within_goal": sum(c["runs"]["auto"]["outcome"] == "within-goal" for c in autos),
        "within_goal_guest_downtime": sum(c["runs"]["auto"]["guest_within_goal"] for c in autos),
        "refused": sum(c["runs"]["auto"]["forced"] for c in autos),
        "refused_but_met_goal": sum(
            c["runs"]["auto"]["forced"] and c["runs"]["auto"]["outcome"] == "within-goal"
            for c in autos
        ),
        "cells_where_some_strategy_met_goal": len(feasible),
        "within_goal_where_some_strategy_did": sum(
            c["runs"]["auto"]["outcome"] == "within-goal" for c in feasible
        ),
        "chosen": chosen,
    }
    runs = [r for c in cells for r in c["runs"].values()]
    total_errs = [r["total_rel_err"] for r in runs if r["total_rel_err"] is not None]
    downtime_oks = [r["downtime_pred_ok"] for r in runs if r["downtime_pred_ok"] is not None]
    predictions = {
        "runs_with_prediction": sum(r["predicted"] is not None for r in runs),
        "predicted_finish_but_failed": sum(
            bool(r.get("predicted_finish_but_failed")) for r in runs
        ),
        "total_compared": len(total_errs),
        "median_total_rel_err": _median(total_errs),
        "downtime_compared": len(downtime_oks),
        "downtime_within_20ms_or_30pct": (
            round(sum(downtime_oks) / len(downtime_oks), 4) if downtime_oks else None
        ),
    }
    return {"per_strategy": per_strategy, "auto": auto, "predictions": predictions}


def table(cells: list[dict[str, Any]], strategies: list[str]) -> str:
    """Cells x strategies as text: total/downtime, or the outcome when it did not complete."""
    width = 14
    lines = [f"{'cell':<24}" + "".join(f"{s:>{width}}" for s in strategies)]
    for cell in cells:
        row = f"{cell['cell']:<24}"
        for strategy in strategies:
            record = cell["runs"].get(strategy)
            row += f"{square_text(record, compact=True):>{width}}"
        lines.append(row)
    return "\n".join(lines)


def square_text(record: dict[str, Any] | None, compact: bool = False) -> str:
    """What a square of the grid says."""
    if record is None:
        return "-"
    outcome: str = record["outcome"]
    if record["status"] == "completed" and outcome != "damaged":
        mark = "*" if record["forced"] else ""
        mark += "!" if outcome == "over-goal" else ""
        if compact:
            return f"{record['total_ms'] / 1000:.1f}s/{record['downtime_ms']}ms{mark}"
        guest = record["guest_downtime_ms"]
        return (
            f"{record['total_ms'] / 1000:.1f}s\n{record['downtime_ms']}ms{mark}"
            f"\n(guest {'-' if guest is None else guest}ms)"
        )
    if outcome == "failed" and record["total_ms"] is not None:
        return (
            f"FAIL {_seconds(record['total_ms'])}"
            if compact
            else f"failed\n{_seconds(record['total_ms'])}"
        )
    return outcome.upper() if compact else outcome


def write_json(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(path)


def plot(results: dict[str, Any], path: Path) -> None:
    """The outcome grid (left) and predicted vs actual total time, log-log (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, NullFormatter

    cells: list[dict[str, Any]] = results["cells"]
    strategies: list[str] = results["config"]["strategies"]
    grid = [
        [
            OUTCOMES.index(c["runs"][s]["outcome"]) if s in c["runs"] else OUTCOMES.index("error")
            for s in strategies
        ]
        for c in cells
    ]
    fig, (ax_grid, ax_pred) = plt.subplots(
        1,
        2,
        figsize=(1.3 * len(strategies) + 7, 0.62 * max(len(cells), 4) + 2.2),
        gridspec_kw={"width_ratios": [len(strategies), 5]},
    )
    ax_grid.imshow(
        grid, cmap=ListedColormap(OUTCOME_COLOURS), vmin=0, vmax=len(OUTCOMES) - 1, aspect="auto"
    )
    for row, cell in enumerate(cells):
        for col, strategy in enumerate(strategies):
            text = square_text(cell["runs"].get(strategy))
            colour = "black" if grid[row][col] in (0, 1, 4) else "white"
            ax_grid.text(col, row, text, ha="center", va="center", fontsize=7, color=colour)
    ax_grid.set_xticks(range(len(strategies)), strategies, rotation=30, ha="right")
    ax_grid.set_yticks(range(len(cells)), [c["cell"] for c in cells])
    config = results["config"]
    ax_grid.set_title(
        f"{config['link']}, guest {config['memory']} (ws {config['ws']}), goal ≤"
        f"{config['max_downtime_ms']} ms downtime, ≤{config['deadline_s']:g} s\n"
        "total / QEMU downtime (guest-seen); * = auto forced after refusing, ! = over the goal",
        fontsize=9,
    )
    fig.legend(
        handles=[Patch(color=c, label=o) for o, c in zip(OUTCOMES, OUTCOME_COLOURS, strict=True)],
        loc="lower center",
        ncol=len(OUTCOMES),
        fontsize=8,
    )

    colours = plt.get_cmap("tab10")
    points: list[float] = []
    for index, strategy in enumerate(strategies):
        pairs = [
            (
                c["runs"][strategy]["total_ms"] / 1000,
                c["runs"][strategy]["predicted"]["total_ms"] / 1000,
            )
            for c in cells
            if strategy in c["runs"]
            and c["runs"][strategy]["total_rel_err"] is not None
            and c["runs"][strategy]["predicted"]["total_ms"] > 0
        ]
        if pairs:
            actual, predicted = zip(*pairs, strict=True)
            ax_pred.scatter(actual, predicted, label=strategy, color=colours(index), s=24)
            points += [*actual, *predicted]
    if points:
        low, high = min(points) / 1.5, max(points) * 1.5
        ax_pred.plot([low, high], [low, high], color="black", linewidth=0.8, label="y = x")
        ax_pred.set_xscale("log")
        ax_pred.set_yscale("log")
        for axis in (ax_pred.xaxis, ax_pred.yaxis):
            axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            axis.set_minor_formatter(NullFormatter())
        ax_pred.legend(fontsize=7)
    else:
        ax_pred.text(
            0.5, 0.5, "no predictions to compare", ha="center", transform=ax_pred.transAxes
        )
    median = results["summary"]["predictions"]["median_total_rel_err"]
    ax_pred.set_title(
        f"predicted vs actual total time (completed runs)\nmedian rel. error {median}", fontsize=9
    )
    ax_pred.set_xlabel("actual total (s)")
    ax_pred.set_ylabel("predicted total (s)")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help=f"cells {', '.join(QUICK_CELLS)}")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, start nothing")
    parser.add_argument("--loopback", action="store_true", help="no netns; cap the stream instead")
    parser.add_argument("--link-mbps", type=int, default=200, help="link (or cap) in Mbit/s")
    parser.add_argument("--memory", default="512M", help="guest memory")
    parser.add_argument("--ws", default="128M", help="working set the guest dirties")
    parser.add_argument("--max-downtime", type=int, default=500, metavar="MS")
    parser.add_argument(
        "--deadline",
        type=float,
        default=None,
        metavar="S",
        help=f"default {DEFAULT_DEADLINE_S} ({QUICK_DEADLINE_S} with --quick)",
    )
    parser.add_argument("--settle", type=float, default=5.0, help="seconds after vm create")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated")
    parser.add_argument("--cells", default=None, help="comma-separated cell names (default all)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/matrix.json"))
    parser.add_argument("--png", type=Path, default=None, help="default: --out with .png")
    parser.add_argument(
        "--replot", action="store_true", help="recompute summary and PNG from --out; run nothing"
    )
    args = parser.parse_args()
    args.strategies = [s for s in args.strategies.split(",") if s]
    unknown = sorted(set(args.strategies) - set(STRATEGIES))
    if unknown:
        parser.error(f"unknown strategies {unknown}; known: {', '.join(STRATEGIES)}")
    if args.deadline is None:
        args.deadline = QUICK_DEADLINE_S if args.quick else DEFAULT_DEADLINE_S
    if args.png is None:
        args.png = args.out.with_suffix(".png")
    return args


def _select_cells(args: argparse.Namespace, link_bps: int) -> list[Cell]:
    cells = make_cells(link_bps, args.ws)
    wanted = args.cells.split(",") if args.cells else list(QUICK_CELLS) if args.quick else None
    if wanted is None:
        return cells
    by_name = {c.name: c for c in cells}
    missing = [name for name in wanted if name not in by_name]
    if missing:
        sys.exit(f"unknown cells {missing}; known: {', '.join(by_name)}")
    return [by_name[name] for name in wanted]


def replot(args: argparse.Namespace) -> int:
    """Recompute the summary and redraw the PNG of an existing results file."""
    results = json.loads(args.out.read_text())
    config = results["config"]
    strategies = config["strategies"]
    for cell in results["cells"]:
        for record in cell["runs"].values():
            derive(record, config["max_downtime_ms"], config["deadline_s"])
    results["summary"] = summarize(results["cells"], strategies)
    write_json(args.out, results)
    plot(results, args.png)
    print(table(results["cells"], strategies))
    print(json.dumps(results["summary"], indent=2))
    print(f"wrote {args.out} and {args.png}")
    return 0


def main() -> int:
    args = _parse_args()
    if args.replot:
        return replot(args)
    link_bps = args.link_mbps * 125_000
    cells = _select_cells(args, link_bps)
    likely_s, worst_s = estimate_s(
        cells, args.strategies, link_bps, parse_size(args.ws), args.deadline
    )
    link = (
        f"loopback capped at {args.link_mbps} Mbit/s"
        if args.loopback
        else f"netns link {args.link_mbps} Mbit/s"
    )
    print(
        f"matrix: {len(cells)} cells x {len(args.strategies)} strategies = "
        f"{len(cells) * len(args.strategies)} runs over {link} ({link_bps / 1e6:g} MB/s); "
        f"guest {args.memory}, ws {args.ws}; goal ≤{args.max_downtime} ms, ≤{args.deadline:g} s",
        flush=True,
    )
    print(
        f"estimate: ~{likely_s / 60:.0f} min (worst case, every run to the deadline: "
        f"{worst_s / 60:.0f} min)",
        flush=True,
    )
    if args.dry_run:
        for cell in cells:
            for strategy in args.strategies:
                print(f"  {cell.name:<24} {strategy:<13} {cell.workload}")
        return 0
    if not args.loopback and os.geteuid() != 0:
        sys.exit("netns labs need root; use --loopback")

    from vmferry.guest.image import build_image
    from vmferry.lab.cluster import lab_down, lab_up

    results: dict[str, Any] = {
        "benchmark": "matrix",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": {
            "link": link,
            "link_mbps": args.link_mbps,
            "link_bytes_per_s": link_bps,
            "netns": not args.loopback,
            "memory": args.memory,
            "ws": args.ws,
            "max_downtime_ms": args.max_downtime,
            "deadline_s": args.deadline,
            "quick": args.quick,
            "strategies": args.strategies,
        },
        "cells": [],
        "summary": {},
    }
    total_runs = len(cells) * len(args.strategies)
    done = 0
    started = time.monotonic()

    def on_run(cell: Cell, record: dict[str, Any]) -> None:
        nonlocal done
        done += 1
        print(f"[{done:>3}/{total_runs}] {run_line(cell, record)}", flush=True)
        results["summary"] = summarize(results["cells"], args.strategies)
        results["elapsed_s"] = round(time.monotonic() - started)
        write_json(args.out, results)

    # A TERM (or an INT while in the background, where INT is ignored) must still take the lab down.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    build_image()
    lab_dir = Path(tempfile.mkdtemp(prefix="vmf-matrix-"))
    # One loop for lab_up and lab_down: the agents' child watcher belongs to it. The runs
    # themselves are plain blocking subprocesses between the two.
    with asyncio.Runner() as runner:
        try:
            runner.run(
                lab_up(2, netns=not args.loopback,
                       link_mbps=None if args.loopback else args.link_mbps, lab_dir=lab_dir)
            )  # fmt: skip
            for index, cell in enumerate(cells, start=1):
                run_cell(lab_dir, index, cell, args, results["cells"], on_run)
        finally:
            runner.run(lab_down(lab_dir))
            shutil.rmtree(lab_dir, ignore_errors=True)
    results["elapsed_s"] = round(time.monotonic() - started)
    write_json(args.out, results)
    plot(results, args.png)
    print(table(results["cells"], args.strategies))
    print(json.dumps(results["summary"], indent=2))
    print(f"elapsed {results['elapsed_s'] / 60:.1f} min; wrote {args.out} and {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
