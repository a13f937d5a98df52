"""Benchmark: what a CLI move costs beyond the migration itself, and how fast ``plan`` answers.

One run, one loopback lab of two hosts (agents as processes, as users run them), one lab guest:

* **moves** — ``vmferry migrate NAME --to OTHER --json`` ``--moves`` times back and forth, each
  timed as a whole process (interpreter start, imports, connecting, pre-checks, plan, the move,
  verify, history). Against the report's ``total_ms`` (first request to the guest running on
  the destination): ``ratio = cli_wall_ms / total_ms``, the issue's target being ≤ 1.3.
* **where the rest goes** — the same wall time split by cheaper commands of the same run:
  ``startup`` (``vmferry plan`` where there is no lab: interpreter, what a plan imports,
  parsing, an error), what a plan does beyond that (asking the agents, predicting, printing),
  and what is left of a move (pre-checks, handoff, history). ``--version`` and ``vm list``
  are timed too; they import less than a plan (each command imports what it uses).
* **plan latency** — ``vmferry plan NAME --to OTHER --json`` ``--plans`` times (median, p95),
  with the age of the data it planned from.

The CLI runs as installed: its bytecode compiled first (pip and ``uv sync --compile-bytecode``
do so at install; without it every start compiles vmferry's sources again, ~120 ms more
here, e.g. under ``PYTHONDONTWRITEBYTECODE``).

``--compare DIR`` measures a second tree in the same run: the vmferry sources in ``DIR`` (a
``src``, e.g. from ``git archive BASE src | tar -x -C D``) run a second lab of their own
(agents and CLI) beside this tree's, and every measurement alternates between the two, so both
see the same machine load; the summaries are printed side by side.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import vmferry
from vmferry.lab.cluster import lab_down, lab_up

WORKLOAD = "dirty:rate=8M,size=128M,pattern=random,mode=paced"


@dataclass(frozen=True, slots=True)
class Variant:
    """One vmferry tree under test: its label, its lab, its sources (None: this tree's)."""

    label: str
    lab_dir: Path
    src: Path | None = None

    @property
    def env(self) -> dict[str, str]:
        env = {**os.environ, "VMFERRY_LAB_DIR": str(self.lab_dir)}
        if self.src is not None:
            env["PYTHONPATH"] = os.pathsep.join([str(self.src), env.get("PYTHONPATH", "")])
        return env


def cli(
    variant: Variant, *args: str, json_out: bool = True, env: dict[str, str] | None = None
) -> tuple[float, Any]:
    """Run ``python -m vmferry.cli.main ARGS [--json]``; its wall time (ms) and parsed output.

    Raises:
        RuntimeError: it exited with a status other than 0 or 1 (or 2, the status expected,
            when ``env`` names another lab).
    """
    argv = [sys.executable, "-m", "vmferry.cli.main", *args, *(["--json"] if json_out else [])]
    started = time.monotonic()
    done = subprocess.run(
        argv, capture_output=True, text=True, check=False, env=env or variant.env, timeout=600
    )
    wall_ms = (time.monotonic() - started) * 1000
    if done.returncode not in ((0, 1) if env is None else (2,)):
        raise RuntimeError(f"vmferry {' '.join(args)}: rc={done.returncode} {done.stderr}")
    return wall_ms, json.loads(done.stdout) if json_out and done.stdout.strip() else None


def percentile(values: list[float], share: float) -> float:
    """The ``share`` quantile of ``values`` (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * (len(ordered) - 1))))]


Results = dict[str, list[dict[str, Any]]]


def _plans(variants: list[Variant], vm: str, to: str, count: int) -> Results:
    plans: Results = {v.label: [] for v in variants}
    for _ in range(count):
        for variant in variants:
            wall_ms, plan = cli(variant, "plan", vm, "--to", to)
            plans[variant.label].append(
                {
                    "wall_ms": round(wall_ms),
                    "recommended": plan.get("recommended"),
                    "profile_age_s": (plan.get("profile") or {}).get("age_s"),
                }
            )
            print("plan", variant.label, plans[variant.label][-1], flush=True)
    return plans


def _move(variant: Variant, vm: str, to: str) -> dict[str, Any]:
    wall_ms, report = cli(variant, "migrate", vm, "--to", to)
    total = report["total_ms"]
    return {
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


def _moves(variants: list[Variant], vm: str, count: int, pause_s: float) -> Results:
    moves: Results = {v.label: [] for v in variants}
    hosts = ["host-2", "host-1"]
    for index in range(count):
        for variant in variants:
            moves[variant.label].append(_move(variant, vm, hosts[index % 2]))
            print("move", variant.label, moves[variant.label][-1], flush=True)
        time.sleep(pause_s)  # between one user's moves; the new host profiles the guest
    return moves


def _fixed_costs(variant: Variant, repeat: int = 3) -> dict[str, float]:
    no_lab = {**variant.env, "VMFERRY_LAB_DIR": str(variant.lab_dir / "none")}
    startup = [
        cli(variant, "plan", "ovh", "--to", "host-2", json_out=False, env=no_lab)[0]
        for _ in range(repeat)
    ]
    version = [cli(variant, "--version", json_out=False)[0] for _ in range(repeat)]
    connect = [cli(variant, "vm", "list")[0] for _ in range(repeat)]
    return {
        "startup_ms": round(statistics.median(startup)),
        "version_ms": round(statistics.median(version)),
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
            "plan_beyond_startup": round(plan_median - fixed["startup_ms"]),
            "rest": round(overhead - plan_median),
        },
        "plan_ms_median": round(plan_median),
        "plan_ms_p95": round(percentile(plan_ms, 0.95)),
    }


def compile_bytecode(variants: list[Variant]) -> None:
    """Compile vmferry and its dependencies as an installer would (once; then up to date)."""
    roots = {Path(vmferry.__file__).parent, *(Path(p) for p in sys.path if "site-packages" in p)}
    roots |= {v.src / "vmferry" for v in variants if v.src is not None}
    for root in sorted(roots):
        compileall.compile_dir(root, quiet=2, workers=0)


def print_side_by_side(summaries: dict[str, dict[str, Any]], fixed: dict[str, Any]) -> None:
    labels = list(summaries)
    print(f"{'':24}" + "".join(f"{label:>12}" for label in labels))
    first = summaries[labels[0]]
    for key in [k for k, v in first.items() if not isinstance(v, dict)]:
        print(f"{key:24}" + "".join(f"{summaries[label][key]!s:>12}" for label in labels))
    for key in ("startup_ms", "version_ms", "vm_list_ms"):
        print(f"{key:24}" + "".join(f"{fixed[label][key]!s:>12}" for label in labels))
    for label in labels:
        print(label, "overhead split (ms):", summaries[label]["overhead_split_ms"])


async def _lab(variant: Variant, memory: str, workload: str) -> None:
    """Bring up ``variant``'s lab (its agents run its sources) and its guest."""
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = variant.env.get("PYTHONPATH", saved or "")
    try:
        await lab_up(2, lab_dir=variant.lab_dir)
    finally:
        if saved is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = saved
    cli(variant, "vm", "create", "ovh", "--host", "host-1", "--memory", memory,
        "--workload", workload)  # fmt: skip


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--memory", default="512M")
    parser.add_argument("--workload", default=WORKLOAD)
    parser.add_argument("--moves", type=int, default=4)
    parser.add_argument("--plans", type=int, default=10)
    parser.add_argument("--settle", type=float, default=4.0, help="seconds after boot")
    parser.add_argument("--pause", type=float, default=4.0, help="seconds between moves")
    parser.add_argument("--label", default="after")
    parser.add_argument("--out", type=Path, default=Path("bench/results/cli_overhead.json"))
    parser.add_argument("--compare", type=Path, help="other vmferry sources, measured beside")
    args = parser.parse_args()

    variants = [Variant(args.label, Path(tempfile.mkdtemp(prefix="vmf-ovh-")))]
    if args.compare is not None:
        if not (args.compare / "vmferry" / "__init__.py").is_file():
            parser.error(f"--compare {args.compare}: no vmferry package there (give its src/)")
        src = args.compare.resolve()
        before = Variant("before", Path(tempfile.mkdtemp(prefix="vmf-ovh-b-")), src)
        variants.insert(0, before)
    compile_bytecode(variants)
    try:
        for variant in variants:
            await _lab(variant, args.memory, args.workload)
        await asyncio.sleep(args.settle)
        fixed = {v.label: _fixed_costs(v) for v in variants}
        plans = _plans(variants, "ovh", "host-2", args.plans)
        moves = _moves(variants, "ovh", args.moves, args.pause)
    finally:
        for variant in variants:
            await lab_down(variant.lab_dir)
    summaries = {
        v.label: summarize(moves[v.label], plans[v.label], fixed[v.label]) for v in variants
    }
    results = {
        "benchmark": "cli_overhead",
        "labels": [v.label for v in variants],
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "memory": args.memory,
        "workload": args.workload,
        "pause_s": args.pause,
        "fixed": fixed,
        "plans": plans,
        "moves": moves,
        "summary": summaries,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print_side_by_side(summaries, fixed)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    asyncio.run(main())
