"""The matrix bench's judgement: each run's outcome by the guest's clock, prediction errors,
and the summary per strategy and for ``auto`` against issue 13's targets.

A run is *within the goal* when it completed, the guest is intact and alive, the downtime the
guest felt (``guest_downtime_ms``, its longest heartbeat gap as seen from the hosts) is at most
the cell's goal and the total time at most its deadline. QEMU's own figure is kept beside it
(``qemu_within_goal``) to show what judging by it would have said.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

# Outcome of one run, in the order the PNG's colour map uses.
OUTCOMES = ("within-goal", "over-goal", "unmeasured", "failed", "damaged", "refused", "error")
FIXED_STRATEGIES = ("precopy", "multifd", "xbzrle", "auto-converge", "postcopy", "hybrid", "cold")
STRATEGIES = (*FIXED_STRATEGIES, "auto")
HALVES = ("fit", "held-out")
TOTAL_ERR_TARGET = 0.15
GUEST_ABS_FLOOR_MS = 20.0
GUEST_REL_TARGET = 0.30


def classify(record: dict[str, Any], goal_ms: int, deadline_s: float) -> str:
    """One of OUTCOMES for a run record (by the guest's clock)."""
    status = record.get("status")
    if status is None:
        # Exit 2 is a refusal by a pre-check; only auto's (the goal) is a verdict on the cell.
        refused = record.get("exit_code") == 2 and record.get("strategy") == "auto"
        return "refused" if refused else "error"
    integrity = record.get("integrity")
    if not record.get("guest_alive", True) or (integrity is not None and not integrity["ok"]):
        return "damaged"
    if status != "completed":
        return "failed"
    guest = record.get("guest_downtime_ms")
    if guest is None:
        return "unmeasured"
    within = guest <= goal_ms and record["total_ms"] <= deadline_s * 1000
    return "within-goal" if within else "over-goal"


def _ratio(numerator: float, denominator: float) -> float | None:
    return round(numerator / denominator, 4) if denominator > 0 else None


def guest_allowance_ms(actual_ms: float) -> float:
    """How far a guest-felt prediction may be off: max(20 ms, 30 %)."""
    return max(GUEST_ABS_FLOOR_MS, GUEST_REL_TARGET * actual_ms)


def prediction_errors(record: dict[str, Any]) -> dict[str, Any]:
    """Errors of a completed run's prediction (nulls when either side is missing)."""
    errors: dict[str, Any] = {
        "total_rel_err": None,
        "downtime_abs_err_ms": None,
        "guest_pred_ms": None,
        "guest_abs_err_ms": None,
        "guest_err_over_allowance": None,
        "guest_pred_ok": None,
        "qemu_pred_vs_guest_abs_err_ms": None,
    }
    predicted = record.get("predicted")
    if not predicted or record.get("status") != "completed":
        return errors
    total = record.get("total_ms")
    if total and predicted.get("total_ms") is not None:
        errors["total_rel_err"] = _ratio(abs(predicted["total_ms"] - total), total)
    downtime = record.get("downtime_ms")
    if downtime is not None and predicted.get("downtime_ms") is not None:
        errors["downtime_abs_err_ms"] = abs(predicted["downtime_ms"] - downtime)
    guest = record.get("guest_downtime_ms")
    if guest is None:
        return errors
    if predicted.get("downtime_ms") is not None:
        # What judging by QEMU's predicted figure misses of what the guest feels.
        errors["qemu_pred_vs_guest_abs_err_ms"] = abs(predicted["downtime_ms"] - guest)
    guest_pred = predicted.get("guest_downtime_ms")
    if guest_pred is not None:
        delta = abs(guest_pred - guest)
        errors["guest_pred_ms"] = guest_pred
        errors["guest_abs_err_ms"] = delta
        errors["guest_err_over_allowance"] = round(delta / guest_allowance_ms(guest), 4)
        errors["guest_pred_ok"] = delta <= guest_allowance_ms(guest)
    return errors


def derive(record: dict[str, Any], goal_ms: int, deadline_s: float) -> None:
    """(Re)compute a record's outcome and prediction errors from its report fields."""
    record["outcome"] = classify(record, goal_ms, deadline_s)
    record["guest_within_goal"] = record["outcome"] == "within-goal"
    downtime = record.get("downtime_ms")
    record["qemu_within_goal"] = (
        record["outcome"] in ("within-goal", "over-goal", "unmeasured")
        and downtime is not None
        and downtime <= goal_ms
        and record["total_ms"] <= deadline_s * 1000
    )
    record.update(prediction_errors(record))


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 4) if values else None


def _p99(values: list[float]) -> float | None:
    """Nearest-rank 99th percentile (the maximum below 100 values)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


def _errors(runs: list[dict[str, Any]]) -> dict[str, Any]:
    total = [r["total_rel_err"] for r in runs if r["total_rel_err"] is not None]
    guest = [r["guest_abs_err_ms"] for r in runs if r["guest_abs_err_ms"] is not None]
    over = [
        r["guest_err_over_allowance"] for r in runs if r["guest_err_over_allowance"] is not None
    ]
    oks = [r["guest_pred_ok"] for r in runs if r["guest_pred_ok"] is not None]
    qemu_vs_guest = [
        r["qemu_pred_vs_guest_abs_err_ms"]
        for r in runs
        if r["qemu_pred_vs_guest_abs_err_ms"] is not None
    ]
    return {
        "total_compared": len(total),
        "median_total_rel_err": _median(total),
        "guest_compared": len(guest),
        "median_guest_abs_err_ms": _median(guest),
        "median_guest_err_over_allowance": _median(over),
        "guest_within_20ms_or_30pct": round(sum(oks) / len(oks), 4) if oks else None,
        "median_qemu_pred_vs_guest_abs_err_ms": _median(qemu_vs_guest),
    }


def strategy_summary(cells: list[dict[str, Any]], strategy: str) -> dict[str, Any]:
    """One strategy over every cell: outcomes, downtimes (QEMU vs guest), prediction errors."""
    runs = [c["runs"][strategy] for c in cells if strategy in c["runs"]]
    completed = [r for r in runs if r["status"] == "completed"]
    qemu = [r["downtime_ms"] for r in completed if r["downtime_ms"] is not None]
    guest = [r["guest_downtime_ms"] for r in completed if r["guest_downtime_ms"] is not None]
    by_half = {
        half: _errors(
            [c["runs"][strategy] for c in cells if c["half"] == half and strategy in c["runs"]]
        )
        for half in HALVES
    }
    return {
        "runs": len(runs),
        "within_goal_guest_clock": sum(r["guest_within_goal"] for r in runs),
        "within_goal_qemu_figure": sum(r["qemu_within_goal"] for r in runs),
        **{o: sum(r["outcome"] == o for r in runs) for o in OUTCOMES},
        "qemu_downtime_ms": {"median": _median(qemu), "p99": _p99(qemu)},
        "guest_downtime_ms": {"median": _median(guest), "p99": _p99(guest)},
        "median_total_ms": _median([r["total_ms"] for r in completed]),
        "predictions": by_half,
    }


def auto_summary(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """How auto did per cell, and the issue's two targets for it."""
    rows = []
    for cell in cells:
        auto = cell["runs"].get("auto")
        if auto is None:
            continue
        fixed_met = [s for s, r in cell["runs"].items() if s != "auto" and r["guest_within_goal"]]
        refused = bool(auto["forced"])
        met = not refused and auto["guest_within_goal"]
        rows.append(
            {
                "cell": cell["cell"],
                "half": cell["half"],
                "chosen": auto["chosen"],
                "retried_from": (auto.get("retried_from") or {}).get("strategy"),
                "refused": refused,
                "met_goal_guest_clock": met,
                "forced_run_met_goal": refused and auto["guest_within_goal"],
                "fixed_strategies_that_met_goal": fixed_met,
                "ok": met or refused,
                "refused_a_feasible_cell": refused and bool(fixed_met),
            }
        )
    chosen: dict[str, int] = {}
    for row in rows:
        chosen[str(row["chosen"])] = chosen.get(str(row["chosen"]), 0) + 1
    return {
        "cells": len(rows),
        "met_goal_guest_clock": sum(r["met_goal_guest_clock"] for r in rows),
        "refused": sum(r["refused"] for r in rows),
        "retried": sum(r["retried_from"] is not None for r in rows),
        "met_or_refused": sum(r["ok"] for r in rows),
        "refused_a_feasible_cell": sum(r["refused_a_feasible_cell"] for r in rows),
        "cells_some_fixed_strategy_met": sum(
            bool(r["fixed_strategies_that_met_goal"]) for r in rows
        ),
        "chosen": chosen,
        "per_cell": rows,
    }


def summarize(cells: list[dict[str, Any]], strategies: list[str]) -> dict[str, Any]:
    """Per strategy, auto, predictions per half, and the issue's targets."""
    per_strategy = {s: strategy_summary(cells, s) for s in strategies}
    auto = auto_summary(cells)
    runs = {
        half: [r for c in cells if c["half"] == half for r in c["runs"].values()] for half in HALVES
    }
    predictions = {half: _errors(rs) for half, rs in runs.items()}
    held = predictions["held-out"]
    targets = {
        "auto_met_or_refused_share": (
            round(auto["met_or_refused"] / auto["cells"], 4) if auto["cells"] else None
        ),
        "auto_met_or_refused_ok": auto["cells"] > 0 and auto["met_or_refused"] == auto["cells"],
        "auto_refused_feasible_cells": auto["refused_a_feasible_cell"],
        "auto_never_refused_feasible_ok": auto["refused_a_feasible_cell"] == 0,
        "held_out_median_total_rel_err": held["median_total_rel_err"],
        "held_out_total_ok": (
            held["median_total_rel_err"] is not None
            and held["median_total_rel_err"] <= TOTAL_ERR_TARGET
        ),
        "held_out_median_guest_err_over_allowance": held["median_guest_err_over_allowance"],
        "held_out_guest_ok": (
            None
            if held["median_guest_err_over_allowance"] is None
            else held["median_guest_err_over_allowance"] <= 1.0
        ),
    }
    return {
        "per_strategy": per_strategy,
        "auto": auto,
        "predictions": predictions,
        "targets": targets,
    }


def square_text(record: dict[str, Any] | None, compact: bool = False) -> str:
    """What a square of the grid says: total / QEMU downtime / guest-felt downtime."""
    if record is None:
        return "-"
    outcome: str = record["outcome"]
    if record["status"] == "completed" and outcome != "damaged":
        mark = "*" if record["forced"] else ""
        mark += "!" if outcome == "over-goal" else ""
        guest = "-" if record["guest_downtime_ms"] is None else record["guest_downtime_ms"]
        if compact:
            return f"{record['total_ms'] / 1000:.1f}s/{record['downtime_ms']}/{guest}{mark}"
        return f"{record['total_ms'] / 1000:.1f}s\n{record['downtime_ms']}ms\n(g {guest}ms){mark}"
    if outcome == "failed" and record["total_ms"] is not None:
        return f"FAIL {record['total_ms'] / 1000:.0f}s" if compact else "failed"
    return outcome.upper() if compact else outcome


def table(cells: list[dict[str, Any]], strategies: list[str]) -> str:
    """Cells x strategies as text: total / QEMU ms / guest ms, or the outcome."""
    width = 18
    lines = [f"{'cell':<54}" + "".join(f"{s:>{width}}" for s in strategies)]
    for cell in cells:
        row = f"{cell['cell']:<54}"
        for strategy in strategies:
            row += f"{square_text(cell['runs'].get(strategy), compact=True):>{width}}"
        lines.append(row)
    return "\n".join(lines)


def summary_table(summary: dict[str, Any]) -> str:
    """Per strategy: within goal (guest clock / QEMU figure), downtimes, held-out errors."""
    head = (
        f"{'strategy':<14}{'runs':>5}{'ok(guest)':>10}{'ok(qemu)':>9}"
        f"{'qemu med/p99 ms':>17}{'guest med/p99 ms':>18}"
        f"{'held-out total err':>19}{'held-out guest err ms':>22}"
    )
    lines = [head]
    for strategy, row in summary["per_strategy"].items():
        held = row["predictions"]["held-out"]
        qemu = "{median}/{p99}".format(**row["qemu_downtime_ms"])
        guest = "{median}/{p99}".format(**row["guest_downtime_ms"])
        lines.append(
            f"{strategy:<14}{row['runs']:>5}{row['within_goal_guest_clock']:>10}"
            f"{row['within_goal_qemu_figure']:>9}{qemu:>17}{guest:>18}"
            f"{held['median_total_rel_err']!s:>19}{held['median_guest_abs_err_ms']!s:>22}"
        )
    return "\n".join(lines)
