"""The evacuation lab bench's summary and tables: per policy the makespan (median over the
rounds), its ratio to the best fixed-concurrency policy's, per VM QEMU's and the guest-felt
downtime, goal misses (guest-felt downtime over the goal), and whether every VM was verified
(completed, running on its destination, every page checked intact, the guest alive)."""

from __future__ import annotations

import statistics
from typing import Any

from rich.console import Console
from rich.table import Table

GAIN_TARGET = 0.30


def _moves(run: dict[str, Any]) -> list[dict[str, Any]]:
    job = run.get("job") or {}
    return list(job.get("moves", []))


def is_verified(move: dict[str, Any]) -> bool:
    report = move.get("report") or {}
    integrity = report.get("integrity") or {}
    return bool(
        move.get("ok")
        and report.get("status") == "completed"
        and report.get("running_on") == move.get("destination")
        and integrity.get("ok")
        and integrity.get("bad_pages") == 0
        and report.get("guest_alive")
    )


def most_at_once(moves: list[dict[str, Any]]) -> int:
    """The most moves in flight at one instant."""
    edges = sorted(
        [(m["start_s"], 1) for m in moves] + [(m["end_s"], -1) for m in moves],
        key=lambda edge: (edge[0], edge[1]),
    )
    now = best = 0
    for _, step in edges:
        now += step
        best = max(best, now)
    return best


def run_summary(run: dict[str, Any], goal_ms: int, vms: int) -> dict[str, Any]:
    """One evacuation's figures."""
    moves = _moves(run)
    reports = [m.get("report") or {} for m in moves]
    felt = [r.get("guest_downtime_ms") for r in reports]
    job = run.get("job") or {}
    return {
        "round": run.get("round"),
        "cpu_busy": run.get("cpu_busy_during_evacuation"),
        "makespan_s": job.get("makespan_s"),
        "predicted_makespan_s": job.get("predicted_makespan_s"),
        "moves": len(moves),
        "verified": sum(is_verified(m) for m in moves),
        "all_verified": len(moves) == vms and all(is_verified(m) for m in moves),
        "goal_misses": sum(f is not None and f > goal_ms for f in felt),
        "unmeasured": sum(f is None for f in felt),
        "qemu_over_goal": sum((r.get("downtime_ms") or 0) > goal_ms for r in reports),
        "most_at_once": most_at_once(moves) if moves else 0,
        "transferred_bytes": sum(r.get("transferred_bytes") or 0 for r in reports),
        "per_vm": {
            m["vm"]: {
                "destination": m.get("destination"),
                "strategy": r.get("strategy"),
                "status": r.get("status"),
                "start_s": m.get("start_s"),
                "end_s": m.get("end_s"),
                "cap_mbps": [
                    None if c is None else round(c * 8 / 1e6, 1) for _, c in m.get("cap_bps", [])
                ],
                "total_ms": r.get("total_ms"),
                "qemu_downtime_ms": r.get("downtime_ms"),
                "guest_downtime_ms": r.get("guest_downtime_ms"),
                "transferred_bytes": r.get("transferred_bytes"),
                "verified": is_verified(m),
            }
            for m, r in zip(moves, reports, strict=True)
        },
    }


def summarize(runs: list[dict[str, Any]], goal_ms: int) -> dict[str, Any]:
    """Per policy: every run's figures and the medians; the issue's targets."""
    vms = max((len(_moves(r)) for r in runs), default=0)
    policies: dict[str, dict[str, Any]] = {}
    for run in runs:
        entry = policies.setdefault(run["policy"], {"runs": []})
        entry["runs"].append(run_summary(run, goal_ms, vms))
    for entry in policies.values():
        spans = [r["makespan_s"] for r in entry["runs"]]
        entry["makespan_s"] = statistics.median(spans) if None not in spans else None
        predicted = [r["predicted_makespan_s"] for r in entry["runs"]]
        entry["predicted_makespan_s"] = None if None in predicted else statistics.median(predicted)
        entry["goal_misses"] = sum(r["goal_misses"] for r in entry["runs"])
        entry["all_verified"] = all(r["all_verified"] for r in entry["runs"])
    best = _best_fixed(policies)
    for name, entry in policies.items():
        entry["ratio_vs_best_fixed"] = (
            None
            if best is None or entry["makespan_s"] is None
            else round(entry["makespan_s"] / policies[best]["makespan_s"], 3)
        )
        entry["policy"] = name
    return {"best_fixed": best, "summary": policies, "targets": _targets(policies, best)}


def _best_fixed(policies: dict[str, dict[str, Any]]) -> str | None:
    fixed = [
        (entry["makespan_s"], name)
        for name, entry in policies.items()
        if name != "ours" and entry["makespan_s"] is not None
    ]
    return min(fixed)[1] if fixed else None


def _targets(policies: dict[str, dict[str, Any]], best: str | None) -> dict[str, Any]:
    ours = policies.get("ours")
    ratio = None if ours is None else ours["ratio_vs_best_fixed"]
    gain = None if ratio is None else round(1.0 - ratio, 3)
    return {
        "gain_vs_best_fixed": gain,
        "gain_target": GAIN_TARGET,
        "gain_met": gain is not None and gain >= GAIN_TARGET,
        "ours_goal_misses": None if ours is None else ours["goal_misses"],
        "all_verified": bool(policies) and all(p["all_verified"] for p in policies.values()),
        "best_fixed": best,
        "best_fixed_without_misses": _best_fixed(
            {n: p for n, p in policies.items() if p["goal_misses"] == 0}
        ),
    }


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def summary_table(results: dict[str, Any]) -> Table:
    goal = results["config"]["max_downtime_ms"]
    table = Table(title=f"evacuation of {results['config']['source']}: per policy")
    for column in ("policy", "makespan", "predicted", "vs best fixed", "at once",
                   f"goal misses (>{goal} ms felt)", "verified", "moved", "CPU busy"):  # fmt: skip
        table.add_column(column, justify="right" if column != "policy" else "left")
    for name, entry in results["summary"].items():
        runs = entry["runs"]
        ratio = entry["ratio_vs_best_fixed"]
        table.add_row(
            name,
            " / ".join(_seconds(r["makespan_s"]) for r in runs),
            _seconds(entry["predicted_makespan_s"]),
            "-" if ratio is None else f"{ratio:.2f} ({(ratio - 1) * 100:+.0f} %)",
            " / ".join(str(r["most_at_once"]) for r in runs),
            str(entry["goal_misses"]),
            " / ".join(f"{r['verified']}/{r['moves']}" for r in runs),
            " / ".join(f"{r['transferred_bytes'] / 2**20:.0f} MiB" for r in runs),
            " / ".join("-" if r["cpu_busy"] is None else f"{r['cpu_busy']:.0%}" for r in runs),
        )
    return table


def downtime_table(results: dict[str, Any]) -> Table:
    """Per VM (rows) and policy (columns): strategy, QEMU / guest-felt downtime, its span."""
    table = Table(title="per VM: strategy  QEMU / guest-felt downtime (ms)  [start-end s]")
    table.add_column("VM")
    names = list(results["summary"])
    for name in names:
        table.add_column(name)
    vms = [g["name"] for g in results["config"]["guests"]]
    for vm in vms:
        cells = []
        for name in names:
            parts = []
            for run in results["summary"][name]["runs"]:
                m = run["per_vm"].get(vm)
                if m is None:
                    parts.append("-")
                    continue
                mark = "" if m["verified"] else " NOT VERIFIED"
                parts.append(
                    f"{m['strategy']} {m['qemu_downtime_ms']}/{m['guest_downtime_ms']} "
                    f"[{m['start_s']:.0f}-{m['end_s']:.0f}]{mark}"
                )
            cells.append("\n".join(parts))
        table.add_row(vm, *cells)
    return table


def print_tables(results: dict[str, Any]) -> None:
    console = Console(width=180)
    console.print(summary_table(results))
    console.print(downtime_table(results))
    console.print(f"targets: {results['targets']}")
