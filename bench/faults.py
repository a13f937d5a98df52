"""The fault matrix: faults injected at every phase of a live migration, judged by what runs after.

For each cell (FAULT@PHASE) a fresh lab of two hosts in network namespaces (links shaped to
``--link-mbps``) boots a 512 MiB guest that dirties 4 MiB/s of random pages over 64 MiB and
rewrites a 16 MiB region of its 256 MiB local disk; ``vmferry migrate`` moves it host-1 → host-2
(``--strategy precopy``, or ``postcopy`` for the post-copy phase) and the fault lands at the
phase. Then the harness lets things settle (link restored, killed agent restarted), runs
``vmferry reconcile`` if it exists, and records from ``/proc``, the agents and QEMU itself how
many copies of the guest run, where, and whether ``vmferry verify`` finds it intact. See
``tests/integration/faultkit.py`` for the faults, phases and the outcome rules.

    uv run python bench/faults.py [--only CELL|FAULT|PHASE ...] [--repeat N] [--list]

Writes ``bench/results/faults.json`` and ``bench/results/faults.md`` (the table); exits non-zero
when a cell lost, duplicated or left a paused copy of the VM, or the harness failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "integration"))

from faultkit import (
    FAULTS,
    PHASES,
    CellConfig,
    iter_cells,
    judge,
    markdown_table,
    not_applicable,
    parse_cell,
    run_cell,
    summary_row,
)

GOOD = ("ok", "lost (unavoidable)")


def _write(
    out: Path,
    records: list[dict[str, Any]],
    skipped: dict[str, str],
    config: CellConfig | None,
    wall_s: float,
) -> None:
    result = {
        "benchmark": "faults",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": None if config is None else dataclasses.asdict(config),
        "wall_s": round(wall_s, 1),
        "not_applicable": skipped,
        "cells": records,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    out.with_suffix(".md").write_text(markdown_table(records, skipped))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only", action="append", default=None, metavar="CELL",
        help="FAULT@PHASE, a FAULT or a PHASE (repeatable); default: every cell",
    )  # fmt: skip
    parser.add_argument("--repeat", type=int, default=1, help="runs per cell (default 1)")
    parser.add_argument("--link-mbps", type=int, default=100, help="netns link rate (100)")
    parser.add_argument(
        "--cli-timeout", type=float, default=60.0,
        help="seconds after the fault before a still-running migrate counts as hung (60)",
    )  # fmt: skip
    parser.add_argument(
        "--settle-timeout", type=float, default=40.0,
        help="seconds to wait for agents to leave 'migrating' on their own (40)",
    )  # fmt: skip
    parser.add_argument(
        "--loopback", action="store_true",
        help="loopback labs (migration capped with --bandwidth 100, 64 MiB disk) for the faults "
        "that need no network namespace; they can run beside a netns run",
    )  # fmt: skip
    parser.add_argument(
        "--merge", nargs="+", type=Path, default=None, metavar="JSON",
        help="combine earlier result files into --out and its table; runs nothing",
    )  # fmt: skip
    parser.add_argument("--list", action="store_true", help="print the cells and exit")
    parser.add_argument("--out", type=Path, default=Path("bench/results/faults.json"))
    args = parser.parse_args()
    skipped = {f"{f}@{p}": why for f in FAULTS for p in PHASES if (why := not_applicable(f, p))}
    if args.merge:
        merged = [c for path in args.merge for c in json.loads(path.read_text())["cells"]]
        for record in merged:  # with today's rules
            judge(parse_cell(record["cell"]), record)
        _write(args.out, merged, skipped, None, 0.0)
        print(markdown_table(merged, skipped))
        return 0
    if os.geteuid() != 0:
        parser.error("the fault matrix needs root (network namespaces, tc, a loop filesystem)")
    cells = list(iter_cells(args.only))
    skipped = {f"{f}@{p}": why for f in FAULTS for p in PHASES if (why := not_applicable(f, p))}
    if args.list:
        for cell in cells:
            print(cell.name)
        for name, why in skipped.items():
            print(f"{name}  n/a: {why}")
        return 0
    # SIGTERM unwinds like Ctrl-C, so every cell's `finally` takes its lab down.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    config = CellConfig(
        netns=not args.loopback,
        link_mbps=args.link_mbps,
        bandwidth_mbps=100 if args.loopback else None,
        disk="64M" if args.loopback else "256M",
        cli_timeout_s=args.cli_timeout,
        settle_timeout_s=args.settle_timeout,
    )
    records = []
    started = time.monotonic()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for repeat in range(args.repeat):
        for cell in cells:
            record = run_cell(cell, config)
            record["repeat"] = repeat
            records.append(record)
            print(json.dumps(summary_row(record)), flush=True)
            _write(args.out, records, skipped, config, time.monotonic() - started)
    table = markdown_table(records, skipped if not args.only else {})
    print(table)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0 if all(r.get("outcome") in GOOD for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
