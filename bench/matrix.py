"""Benchmark matrix: every strategy and ``auto`` on a fractional design of workloads, judged by
the guest's clock, with predictions tested on a held-out half they were never fit on.

In the spirit of QEMU's guestperf, through the CLI (``vmferry migrate NAME --to OTHER
--strategy S --max-downtime GOAL --deadline S --json``), so it measures what a user gets. A lab
of two hosts in network namespaces (root); each cell reshapes both links to its rate (or
leaves them unshaped: loopback speed). ``--loopback`` (no root) caps each move with
``--bandwidth`` instead.

Cells (``matrix_cells``): a seeded fractional design over guest memory 256 MiB-4 GiB, links
50 Mbit/s-unshaped, goals 50 ms-2 s, paced (0.25x / 1x the link) and CPU-bound writers, zero /
compressible / random pages, the lab guest and the Debian 12 guest (running vmferry's workload
program from its kernel command line, heartbeats on its second serial port). Two halves of
``--half-cells`` cells each, both covering every level, sharing no cell.

Calibration: ``migrate`` calibrates its predictions from the lab's history
(``<lab>/history.db``; the bench's lab is new, so the history starts empty). The fit half runs
first and its moves go into the history. Then the history is frozen: before every held-out
move the frozen copy is put back, so held-out moves are predicted from the fit half alone and
never fit on (each record says how many moves its prediction could learn from).

Each cell gets one VM (created on host-1, ``--settle`` seconds to reach its rate), moved to the
other host once per strategy, then deleted. If ``auto`` refuses the goal (exit 2) that is
recorded and the move retried with ``--force``.

    uv run python bench/matrix.py --dry-run     # the design, its coverage and a time estimate
    uv run python bench/matrix.py --quick       # 2 + 2 small cells x precopy,postcopy,auto
    uv run python bench/matrix.py [--seed 13] [--half-cells 10] [--strategies …] [--loopback]
        [--settle 5] [--out bench/results/matrix.json] [--png …/matrix.png] [--replot]

Writes the results JSON after every run (an interrupted run keeps what it did) and the PNG at
the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from matrix_cells import (
    DEFAULT_HALF_CELLS,
    DEFAULT_SEED,
    QUICK_STRATEGIES,
    Cell,
    coverage,
    estimate_s,
    make_design,
)
from matrix_plot import plot
from matrix_run import (
    HOSTS,
    CliOutcome,
    DebianBoot,
    FrozenHistory,
    cli,
    create,
    locate,
    make_record,
    run_line,
    run_strategy,
)
from matrix_summary import STRATEGIES, derive, summarize, summary_table, table


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="2+2 small cells, 3 strategies")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, start nothing")
    parser.add_argument("--loopback", action="store_true", help="no netns; cap each move instead")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--half-cells", type=int, default=DEFAULT_HALF_CELLS)
    parser.add_argument("--settle", type=float, default=5.0, help="seconds after vm create")
    parser.add_argument("--strategies", default=None, help="comma-separated (default: all)")
    parser.add_argument("--cells", default=None, help="comma-separated name prefixes (f01,h03)")
    parser.add_argument("--out", type=Path, default=None, help="default bench/results/matrix.json")
    parser.add_argument("--png", type=Path, default=None, help="default: --out with .png")
    parser.add_argument(
        "--replot", action="store_true", help="recompute summary and PNG from --out; run nothing"
    )
    args = parser.parse_args()
    default = QUICK_STRATEGIES if args.quick else STRATEGIES
    args.strategies = [s for s in (args.strategies or ",".join(default)).split(",") if s]
    unknown = sorted(set(args.strategies) - set(STRATEGIES))
    if unknown:
        parser.error(f"unknown strategies {unknown}; known: {', '.join(STRATEGIES)}")
    if args.out is None:
        name = "matrix-quick.json" if args.quick else "matrix.json"
        args.out = Path("bench/results") / name
    if args.png is None:
        args.png = args.out.with_suffix(".png")
    return args


def _select(args: argparse.Namespace) -> list[Cell]:
    cells = make_design(args.seed, args.half_cells, quick=args.quick)
    if not args.cells:
        return cells
    wanted = args.cells.split(",")
    chosen = [c for c in cells if any(c.name.startswith(w) for w in wanted)]
    if not chosen:
        sys.exit(f"no cell matches {wanted}; cells: {', '.join(c.name for c in cells)}")
    return chosen


def write_json(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(path)


def _report(results: dict[str, Any], args: argparse.Namespace) -> None:
    print(table(results["cells"], args.strategies))
    print()
    print(summary_table(results["summary"]))
    print(json.dumps(results["summary"]["targets"], indent=2))


def replot(args: argparse.Namespace) -> int:
    """Recompute the summary and redraw the PNG of an existing results file."""
    results = json.loads(args.out.read_text())
    args.strategies = results["config"]["strategies"]
    for cell in results["cells"]:
        for record in cell["runs"].values():
            derive(record, cell["goal_ms"], cell["deadline_s"])
    _finish(results, args)
    print(f"wrote {args.out} and {args.png}")
    return 0


def _finish(results: dict[str, Any], args: argparse.Namespace) -> None:
    """Summarize, write the JSON, draw the PNG and print the tables."""
    results["summary"] = summarize(results["cells"], args.strategies)
    write_json(args.out, results)
    plot(results, args.png)
    _report(results, args)


def _shape(cell: Cell, netns: bool, runner: asyncio.Runner, lab_dir: Path) -> None:
    """Both hosts' links at the cell's rate (unshaped: no qdisc)."""
    if not netns:
        return
    from vmferry.lab.netns import set_link_rate

    rate_kbit = None if cell.link_mbps is None else cell.link_mbps * 1000
    for host in HOSTS:
        runner.run(set_link_rate(host, rate_kbit))
    runner.run(_probe_paths(lab_dir))


async def _probe_paths(lab_dir: Path) -> None:
    """The links just changed shape, as a real network does not between two moves: have each
    agent probe its path to the other afresh, so no plan trusts what it knew of the old links
    (agents keep a path's figure for 5 minutes)."""
    from vmferry.controller.cluster import Cluster
    from vmferry.controller.inventory import Inventory
    from vmferry.controller.plan import probe_path

    async with Cluster(Inventory.load(lab_dir)) as cluster:
        for source, destination in (HOSTS, HOSTS[::-1]):
            address = cluster.inventory.host(destination).address
            await probe_path(cluster.client(source), cluster.client(destination), address)


def run_cell(
    lab_dir: Path,
    cell: Cell,
    args: argparse.Namespace,
    ctx: dict[str, Any],
    on_run: Callable[[Cell, dict[str, Any]], None],
) -> None:
    """Create the cell's VM, run every strategy on it (appending to the results), delete it."""
    vm = f"mx-{cell.name[:3]}"
    result: dict[str, Any] = {
        "cell": cell.name,
        **cell.to_json(),
        "vm": vm,
        "notes": [],
        "runs": {},
    }
    ctx["results"]["cells"].append(result)  # partial cells are saved too
    cap = cell.link_mbps if args.loopback else None
    history: FrozenHistory = ctx["history"]

    def recreate(why: str) -> str | None:
        result["notes"].append(why)
        print(f"{cell.name} {why}", flush=True)
        cli(lab_dir, "vm", "delete", vm)
        made = create(lab_dir, vm, cell, ctx["debian"], args.settle)
        return HOSTS[0] if made.exit_code == 0 else None

    created = create(lab_dir, vm, cell, ctx["debian"], args.settle)
    here: str | None = HOSTS[0] if created.exit_code == 0 else None
    if here is None:
        result["notes"].append(f"vm create failed ({created.exit_code}): {created.stderr_tail}")
    try:
        for strategy in args.strategies:
            if here is None:
                note = result["notes"][-1] if result["notes"] else "VM lost"
                outcome = CliOutcome(created.exit_code, 0, None, f"not run: {note}")
                record = make_record(cell, strategy, outcome, None)
            else:
                record = run_strategy(lab_dir, vm, here, cell, strategy, history, cap)
                here = record["running_on"] or locate(lab_dir, vm)
                if record["outcome"] == "damaged":
                    here = recreate(f"after {strategy}: guest damaged; recreating it")
                elif here is None:
                    here = recreate(f"after {strategy}: VM not found; recreating it")
            result["runs"][strategy] = record
            on_run(cell, record)
    finally:
        deleted = cli(lab_dir, "vm", "delete", vm)
        if deleted.exit_code != 0:
            result["notes"].append(f"vm delete failed: {deleted.stderr_tail}")


def _debian(cells: list[Cell]) -> DebianBoot | None:
    if not any(c.guest == "debian" for c in cells):
        return None
    from vmferry.guest.debian import debian_image

    image = debian_image(on_progress=lambda line: print(f"debian image: {line}", flush=True))
    return DebianBoot.of(image)


def _print_plan(cells: list[Cell], args: argparse.Namespace) -> None:
    likely_s, worst_s = estimate_s(cells, args.strategies)
    fit = sum(c.half == "fit" for c in cells)
    print(
        f"matrix: {len(cells)} cells ({fit} fit, {len(cells) - fit} held-out; seed {args.seed}) "
        f"x {len(args.strategies)} strategies = {len(cells) * len(args.strategies)} moves; "
        f"estimate ~{likely_s / 60:.0f} min (worst case, every run to its deadline: "
        f"{worst_s / 60:.0f} min)",
        flush=True,
    )
    for cell in cells:
        print(
            f"  {cell.name:<54} ws {cell.ws_bytes >> 20:>4} MiB  {cell.workload:<58} "
            f"deadline {cell.deadline_s:g} s"
        )
    for half, dims in coverage(cells).items():
        print(f"  coverage {half}: " + "; ".join(f"{d} {levels}" for d, levels in dims.items()))


def main() -> int:
    args = _parse_args()
    if args.replot:
        return replot(args)
    cells = _select(args)
    _print_plan(cells, args)
    if args.dry_run:
        return 0
    if not args.loopback and os.geteuid() != 0:
        sys.exit("netns labs need root; use --loopback")

    from vmferry.guest.image import build_image
    from vmferry.lab.cluster import lab_down, lab_up

    results: dict[str, Any] = {
        "benchmark": "matrix",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": {
            "seed": args.seed,
            "half_cells": args.half_cells,
            "netns": not args.loopback,
            "quick": args.quick,
            "strategies": args.strategies,
            "calibration": "fresh history; fit half first; held-out moves see the fit half's "
            "history only (a frozen copy restored before each)",
        },
        "coverage": coverage(cells),
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
    debian = _debian(cells)
    lab_dir = Path(tempfile.mkdtemp(prefix="vmf-matrix-"))
    ctx: dict[str, Any] = {"results": results, "history": FrozenHistory(lab_dir), "debian": debian}
    with asyncio.Runner() as runner:
        try:
            runner.run(lab_up(2, netns=not args.loopback, lab_dir=lab_dir))
            for cell in cells:
                if cell.half == "held-out" and not ctx["history"].is_frozen:
                    moves = ctx["history"].freeze()
                    results["config"]["fit_history_moves"] = moves
                    print(f"fit half done: history frozen with {moves} moves", flush=True)
                _shape(cell, not args.loopback, runner, lab_dir)
                run_cell(lab_dir, cell, args, ctx, on_run)
        finally:
            runner.run(lab_down(lab_dir))
            shutil.rmtree(lab_dir, ignore_errors=True)
    results["elapsed_s"] = round(time.monotonic() - started)
    _finish(results, args)
    print(f"elapsed {results['elapsed_s'] / 60:.1f} min; wrote {args.out} and {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
