"""Benchmark: what a CLI move costs beyond the migration itself, and how fast ``plan`` answers.

One run, one loopback lab of two hosts (agents as processes, as users run them), one lab guest:

* **moves** — ``vmferry migrate NAME --to OTHER --json`` ``--moves`` times back and forth, each
  timed as a whole process (interpreter start, imports, connecting, pre-checks, plan, the move,
  verify, history). Against the report's ``total_ms`` (first request to the guest running on
  the destination): ``ratio = cli_wall_ms / total_ms``, the issue's target being ≤ 1.3.
* **where the rest goes** — the same wall time split by cheaper commands of the same run:
  ``startup`` (``vmferry --version``: interpreter and imports), ``connect`` (``vm list``: the
  agents answer), ``plan`` (``vmferry plan``), and what is left (pre-checks, handoff, history).
* **plan latency** — ``vmferry plan NAME --to OTHER --json`` ``--plans`` times (median, p95),
  with the age of the data it planned from.

The CLI runs as installed: its bytecode compiled first (pip and ``uv sync --compile-bytecode``
do so at install; without it every start compiles vmferry's sources again, ~120 ms more
here, e.g. under ``PYTHONDONTWRITEBYTECODE``).

``--compare DIR`` runs the whole bench twice in one go, first with the vmferry sources in
``DIR`` (agents and CLI; e.g. ``git archive BASE src | tar -x -C DIR``), then with this tree's,
each on a fresh lab, and prints both summaries side by side.

    uv run python bench/cli_overhead.py [--memory 512M] [--moves 4] [--plans 10]
        [--workload SPEC] [--settle 4] [--pause 4] [--label after] [--compare DIR]
        [--out bench/results/cli_overhead.json]
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import vmferry
from vmferry.lab.cluster import lab_down, lab_up

WORKLOAD = "dirty:rate=8M,size=128M,pattern=random,mode=paced"


def cli(lab_dir: Path, *args: str, json_out: bool = True) -> tuple[float, Any]:
    """Run ``python -m vmferry.cli.main ARGS [--json]``; its wall time (ms) and parsed output.

    Raises:
        RuntimeError: it exited with a status other than 0 or 1.
    """
    argv = [sys.executable, "-m", "vmferry.cli.main", *args, *(["--json"] if json_out else [])]
    env = {**os.environ, "VMFERRY_LAB_DIR": str(lab_dir)}
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, check=False, env=env, timeout=600)
    wall_ms = (time.monotonic() - started) * 1000
    if done.returncode not in (0, 1):
        raise RuntimeError(f"vmferry {' '.join(args)}: rc={done.returncode} {done.stderr}")
    return wall_ms, json.loads(done.stdout) if json_out and done.stdout.strip() else None


def percentile(values: list[float], share: float) -> float:
    """The ``share`` quantile of ``values`` (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * (len(ordered) - 1))))]


def _plans(lab_dir: Path, vm: str, to: str, count: int) -> list[dict[str, Any]]:
    plans = []
    for _ in range(count):
        wall_ms, plan = cli(lab_dir, "plan", vm, "--to", to)
        plans.append(
            {
                "wall_ms": round(wall_ms),
                "recommended": plan.get("recommended"),
                "profile_age_s": (plan.get("profile") or {}).get("age_s"),
            }
        )
        print("plan", plans[-1], flush=True)
    return plans


def _moves(lab_dir: Path, vm: str, count: int, pause_s: float) -> list[dict[str, Any]]:
    moves = []
    hosts = ["host-2", "host-1"]
    for index in range(count):
        wall_ms, report = cli(lab_dir, "migrate", vm, "--to", hosts[index % 2])
        total = report["total_ms"]
        moves.append(
            {
                "cli_wall_ms": round(wall_ms),
                "total_ms": total,
                "ratio": round(wall_ms / total, 3) if total else None,
                "overhead_ms": round(wall_ms - total),
                "strategy": report["strategy"],
                "status": report["status"],
                "downtime_ms": report["downtime_ms"],
                "guest_downtime_ms": report["guest_downtime_ms"],
                "verified": (report.get("integrity") or {}).get("ok"),
            }
        )
        print("move", moves[-1], flush=True)
        time.sleep(pause_s)  # between one user's moves; the new host profiles the guest
    return moves


def _fixed_costs(lab_dir: Path, repeat: int = 3) -> dict[str, float]:
    startup = [cli(lab_dir, "--version", json_out=False)[0] for _ in range(repeat)]
    connect = [cli(lab_dir, "vm", "list")[0] for _ in range(repeat)]
    return {
        "startup_ms": round(statistics.median(startup)),
        "vm_list_ms": round(statistics.median(connect)),
    }


def summarize(
    moves: list[dict[str, Any]], plans: list[dict[str, Any]], fixed: dict[str, float]
) -> dict[str, Any]:
    """Medians of the moves and the plans, and the overhead split."""
    ratios = [m["ratio"] for m in moves if m["ratio"] is not None]
    plan_ms = [float(p["wall_ms"]) for p in plans]
    overhead = statistics.median(m["overhead_ms"] for m in moves)
    plan_median = statistics.median(plan_ms)
    return {
        "moves": len(moves),
        "cli_wall_ms_median": statistics.median(m["cli_wall_ms"] for m in moves),
        "total_ms_median": statistics.median(m["total_ms"] for m in moves),
        "ratio_median": round(statistics.median(ratios), 3),
        "ratio_p95": percentile(ratios, 0.95),
        "ratio_max": max(ratios),
        "overhead_ms_median": overhead,
        "overhead_split_ms": {
            "startup": fixed["startup_ms"],
            "connect": round(fixed["vm_list_ms"] - fixed["startup_ms"]),
            "plan_beyond_connect": round(plan_median - fixed["vm_list_ms"]),
            "rest": round(overhead - plan_median),
        },
        "plan_ms_median": round(plan_median),
        "plan_ms_p95": round(percentile(plan_ms, 0.95)),
    }


def compile_bytecode() -> None:
    """Compile vmferry and its dependencies as an installer would (once; then up to date)."""
    roots = {Path(vmferry.__file__).parent, *(Path(p) for p in sys.path if "site-packages" in p)}
    for root in sorted(roots):
        compileall.compile_dir(root, quiet=2, workers=0)


def compare(before_src: Path, argv: list[str]) -> None:
    """The bench with ``before_src``'s vmferry, then with this tree's; both summaries."""
    runs = []
    for label, src in (("before", before_src), ("after", None)):
        out = Path(tempfile.mkstemp(prefix=f"vmf-ovh-{label}-", suffix=".json")[1])
        env = dict(os.environ)
        if src is not None:
            env["PYTHONPATH"] = os.pathsep.join([str(src), env.get("PYTHONPATH", "")])
        run = [sys.executable, __file__, *argv, "--label", label, "--out", str(out)]
        subprocess.run(run, check=True, env=env)
        runs.append(json.loads(out.read_text()))
        out.unlink()
    keys = [k for k, v in runs[0]["summary"].items() if not isinstance(v, dict)]
    print(f"{'':24} {'before':>10} {'after':>10}")
    for key in [*keys, "startup_ms", "vm_list_ms"]:
        values = [r["summary"].get(key, r["fixed"].get(key)) for r in runs]
        print(f"{key:24} {values[0]!s:>10} {values[1]!s:>10}")
    for r in runs:
        print(r["label"], "overhead split (ms):", r["summary"]["overhead_split_ms"])


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--memory", default="512M")
    parser.add_argument("--workload", default=WORKLOAD)
    parser.add_argument("--moves", type=int, default=4)
    parser.add_argument("--plans", type=int, default=10)
    parser.add_argument("--settle", type=float, default=4.0, help="seconds after boot")
    parser.add_argument("--pause", type=float, default=4.0, help="seconds between moves")
    parser.add_argument("--label", default="")
    parser.add_argument("--out", type=Path, default=Path("bench/results/cli_overhead.json"))
    parser.add_argument("--compare", type=Path, help="vmferry sources to measure first")
    args = parser.parse_args()
    if args.compare is not None:
        argv = sys.argv[1:]
        at = argv.index("--compare")
        compare(args.compare.resolve(), argv[:at] + argv[at + 2 :])
        return
    compile_bytecode()

    lab_dir = Path(tempfile.mkdtemp(prefix="vmf-ovh-"))
    try:
        await lab_up(2, lab_dir=lab_dir)
        cli(lab_dir, "vm", "create", "ovh", "--host", "host-1", "--memory", args.memory,
            "--workload", args.workload)  # fmt: skip
        await asyncio.sleep(args.settle)
        fixed = _fixed_costs(lab_dir)
        plans = _plans(lab_dir, "ovh", "host-2", args.plans)
        moves = _moves(lab_dir, "ovh", args.moves, args.pause)
    finally:
        await lab_down(lab_dir)
    summary = summarize(moves, plans, fixed)
    results = {
        "benchmark": "cli_overhead",
        "label": args.label,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "memory": args.memory,
        "workload": args.workload,
        "pause_s": args.pause,
        "fixed": fixed,
        "plans": plans,
        "moves": moves,
        "summary": summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    asyncio.run(main())
