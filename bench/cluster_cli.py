"""Benchmark: the vmferry CLI on a lab (agents, controller, history) against raw QEMU.

Same run, same guest (1 GiB, a paced 50 MiB/s random dirtier over 256 MiB, unless told
otherwise):

* ``raw``       — two QEMUs driven by a minimal QMP script (``raw_vs_vmferry.raw_migration``);
* ``cli``       — ``vmferry migrate NAME --to HOST --json`` on a loopback lab, timed as a whole
                  process (Python start-up, pre-checks, agents, verify included);
* ``cli-200M``  — the same over a netns lab whose links are shaped to 200 Mbit/s (root only).

    uv run python bench/cluster_cli.py [--memory 1G] [--repeat 2] [--no-netns]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from raw_vs_vmferry import raw_migration
from vmferry.core.model import VmSpec
from vmferry.core.workload import parse_workload
from vmferry.lab.cluster import lab_down, lab_up
from vmferry.lab.local import LocalLab

BUSY = "dirty:rate=50M,size=256M,pattern=random,mode=paced"
SHAPED = "dirty:rate=4M,size=256M,pattern=random,mode=paced"


def vmferry_json(
    lab_dir: Path, *args: str, timeout_s: float = 900
) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run ``python -m vmferry.cli.main ARGS --json`` against the lab in ``lab_dir``.

    Returns:
        The finished process and its wall time (ms).

    Raises:
        subprocess.TimeoutExpired: it ran longer than ``timeout_s`` (it is killed).
    """
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "vmferry.cli.main", *args, "--json"],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout_s,
        env={**os.environ, "VMFERRY_LAB_DIR": str(lab_dir)},
    )
    return result, (time.monotonic() - started) * 1000


def run_cli(lab_dir: Path, *args: str) -> tuple[float, dict[str, Any]]:
    result, wall_ms = vmferry_json(lab_dir, *args)
    if result.returncode not in (0, 1):
        raise RuntimeError(f"vmferry {args}: {result.stderr}")
    return wall_ms, json.loads(result.stdout)


async def _cli_runs(
    memory: str, workload: str, repeat: int, netns: bool, link_mbps: int | None
) -> list[dict[str, Any]]:
    lab_dir = Path(tempfile.mkdtemp(prefix="vmf-bench-"))
    runs: list[dict[str, Any]] = []
    try:
        await lab_up(2, lab_dir=lab_dir, netns=netns, link_mbps=link_mbps)
        run_cli(lab_dir, "vm", "create", "bench", "--host", "host-1", "--memory", memory,
             "--workload", workload)  # fmt: skip
        hosts = ["host-2", "host-1"]
        for attempt in range(repeat):
            wall_ms, report = run_cli(lab_dir, "migrate", "bench", "--to", hosts[attempt % 2])
            runs.append({"cli_wall_ms": round(wall_ms), **report})
            print("cli", "netns" if netns else "loopback", runs[-1], flush=True)
    finally:
        await lab_down(lab_dir)
    return runs


def median_of(runs: list[dict[str, Any]], key: str) -> float | None:
    """The median of ``key`` over the runs that have it (None: none has)."""
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def write_results(out: Path, results: dict[str, Any], summary: dict[str, Any]) -> None:
    """Write a bench's JSON results and print its summary."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"wrote {out}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--memory", default="1G")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--no-netns", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench/results/cluster_cli.json"))
    args = parser.parse_args()

    raw_runs: list[dict[str, Any]] = []
    async with await LocalLab.open() as lab:
        spec = VmSpec.build("raw", memory=args.memory, workload=parse_workload(BUSY))
        for _ in range(args.repeat):
            with tempfile.TemporaryDirectory(prefix="vmf-raw-") as tmp:
                raw_runs.append(await raw_migration(lab.qemu.path, spec, lab.boot_files, Path(tmp)))
            print("raw", raw_runs[-1], flush=True)
    cli_runs = await _cli_runs(args.memory, BUSY, args.repeat, netns=False, link_mbps=None)
    shaped: list[dict[str, Any]] = []
    if not args.no_netns and os.geteuid() == 0:
        shaped = await _cli_runs(args.memory, SHAPED, args.repeat, netns=True, link_mbps=200)

    raw_wall = median_of(raw_runs, "wall_ms")
    summary = {
        "raw_wall_ms": raw_wall,
        "cli_total_ms": median_of(cli_runs, "total_ms"),
        "cli_process_wall_ms": median_of(cli_runs, "cli_wall_ms"),
        "ratio_cli_total_over_raw": (
            round(median_of(cli_runs, "total_ms") / raw_wall, 3) if raw_wall else None  # type: ignore[operator]
        ),
        "ratio_cli_process_over_raw": (
            round(median_of(cli_runs, "cli_wall_ms") / raw_wall, 3) if raw_wall else None  # type: ignore[operator]
        ),
        "shaped_200mbit_total_ms": median_of(shaped, "total_ms"),
        "shaped_200mbit_downtime_ms": median_of(shaped, "downtime_ms"),
        "shaped_200mbit_guest_downtime_ms": median_of(shaped, "guest_downtime_ms"),
    }
    results = {
        "benchmark": "cluster_cli",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "memory": args.memory,
        "workload": BUSY,
        "shaped_workload": SHAPED,
        "raw": raw_runs,
        "cli_loopback": cli_runs,
        "cli_netns_200mbit": shaped,
        "summary": summary,
    }
    write_results(args.out, results, summary)


if __name__ == "__main__":
    asyncio.run(main())
