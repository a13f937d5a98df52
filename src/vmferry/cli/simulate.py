"""``vmferry simulate``: scheduling policies compared on a modelled cluster (no lab needed).

Imported only when the command runs (the simulator is pure Python, but large).
"""

from __future__ import annotations

import argparse
import time

from rich.console import Console
from rich.table import Table

from vmferry.cli.exits import EXIT_OK
from vmferry.cli.render import print_json
from vmferry.core.errors import ConfigError
from vmferry.core.job import POLICY_NAMES
from vmferry.core.simulate import SCENARIOS, PolicyResult, SimulationResult, simulate
from vmferry.core.units import format_bytes, format_ms

__all__ = ["run_simulate", "simulation_table"]

_MAX_HOSTS = 100_000
_MAX_VMS = 2_000_000


async def run_simulate(args: argparse.Namespace, err: Console, out: Console) -> int:
    """Plan and simulate; print the comparison (a table, or ``--json``).

    Raises:
        ConfigError: sizes out of range, an unknown policy or scenario.
    """
    if not 2 <= args.hosts <= _MAX_HOSTS or not 0 <= args.vms <= _MAX_VMS:
        raise ConfigError(f"--hosts must be 2..{_MAX_HOSTS} and --vms 0..{_MAX_VMS}")
    policies = POLICY_NAMES if args.policy == "all" else (args.policy,)
    if args.policy != "all" and args.policy not in POLICY_NAMES:
        raise ConfigError(f"unknown policy {args.policy!r}: use all, {', '.join(POLICY_NAMES)}")
    if args.scenario not in SCENARIOS:
        raise ConfigError(f"unknown scenario {args.scenario!r}: use {', '.join(SCENARIOS)}")
    with err.status(f"simulating {args.hosts} hosts and {args.vms} VMs…"):
        result = simulate(
            args.hosts,
            args.vms,
            seed=args.seed,
            timer=time.perf_counter,
            policies=policies,
            scenario=args.scenario,
            evacuate=args.evacuate,
            max_moves=args.max_moves,
        )
    if args.json:
        print_json(out, result.to_json())
    else:
        out.print(simulation_table(result))
    return EXIT_OK


def _title(result: SimulationResult) -> str:
    cluster = f"{result.hosts:,} hosts, {result.vms:,} VMs, seed {result.seed}"
    if result.scenario == "balance":
        before, after = result.spread
        what = f"balance of {cluster} (load spread {before:.0%} → {after:.0%})"
    else:
        what = f"evacuation of {len(result.sources):,} of {cluster}"
    refused = f", {result.refused} VM(s) with nowhere to go" if result.refused else ""
    return (
        f"{what}: {result.moves:,} moves{refused}; no schedule ends before "
        f"{format_ms(result.lower_bound_s * 1000)} sending the raw pages, nor before "
        f"{format_ms(result.compressed_bound_s * 1000)} compressing them"
    )


def _versus(row: PolicyResult, best: PolicyResult | None) -> str:
    if best is None or best.makespan_s <= 0:
        return "—"
    return f"{(row.makespan_s / best.makespan_s - 1.0) * 100:+.0f} %"


def _ran_as(row: PolicyResult) -> str:
    """How many moves ran as what, shortest names: ``612 multifd, 3 hybrid``."""
    return ", ".join(f"{n} {name}" for name, n in row.ran_as.items())


def simulation_table(result: SimulationResult) -> Table:
    """One row per policy: simulated makespan against the best fixed concurrency as the peers
    run it (plain pre-copy) and against the best given vmferry's strategy choice, the plan's
    ETA, felt downtime, goal misses, rescues, bytes moved, how the moves ran, planning time."""
    table = Table(title=_title(result), title_justify="left")
    columns = ("policy", "makespan", "vs best fixed", "vs best fixed+choice", "ETA (plan)")
    for column in columns:
        table.add_column(column, justify="left" if column == "policy" else "right")
    for column in ("downtime, sum", "missed goal", "rescued", "moved", "ran as", "planning"):
        table.add_column(column, justify="left" if column == "ran as" else "right")
    best, best_choice = result.best_fixed(), result.best_fixed(choice=True)
    for row in result.results:
        table.add_row(
            row.policy,
            format_ms(row.makespan_s * 1000),
            _versus(row, best),
            _versus(row, best_choice),
            format_ms(row.predicted_makespan_s * 1000),
            format_ms(row.downtime_sum_ms),
            str(row.missed),
            str(row.rescued),
            format_bytes(row.transferred_bytes),
            _ran_as(row),
            format_ms(row.planning_s * 1000),
        )
    return table
