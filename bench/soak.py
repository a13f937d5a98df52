"""Soak: many back-and-forth live migrations of a dirtying guest through the CLI, each verified.

A loopback lab of two hosts (made with ``vmferry lab up`` in a temporary directory, taken down at
the end), one guest with a paced random dirtier, then ``--count`` migrations host-1 → host-2 →
host-1 …, cycling the strategies pre-copy, post-copy and multifd. After every move the guest
checks every page of its working set (the migration report's ``integrity``). Writes
``bench/results/soak.json`` (count, failures, bad pages, durations) and exits non-zero on any
failed migration or bad page.

    uv run python bench/soak.py [--count 100] [--memory 512M] [--workload SPEC]
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cluster_cli import vmferry_json

STRATEGIES = ("precopy", "postcopy", "multifd")
WORKLOAD = "dirty:rate=20M,size=128M,pattern=random,mode=paced"
VM = "soak"
_MAX_FAILURES_IN_A_ROW = 3


def _cli(lab_dir: Path, *args: str, timeout_s: float = 900) -> tuple[int, float, dict[str, Any]]:
    """Run ``vmferry ARGS --json``; returns exit status, wall time (ms) and the JSON printed."""
    result, wall_ms = vmferry_json(lab_dir, *args, timeout_s=timeout_s)
    try:
        data = json.loads(result.stdout) if result.stdout.strip() else {}
    except ValueError:
        data = {}
    if not isinstance(data, dict):
        data = {"value": data}
    if result.returncode != 0:
        data.setdefault("stderr", result.stderr.strip()[-2000:])
    return result.returncode, wall_ms, data


def _must(lab_dir: Path, *args: str) -> dict[str, Any]:
    code, _, data = _cli(lab_dir, *args)
    if code != 0:
        raise SystemExit(f"vmferry {' '.join(args)} failed ({code}): {data.get('stderr')}")
    return data


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"min": None, "median": None, "max": None}
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def soak(lab_dir: Path, count: int, memory: str, workload: str) -> dict[str, Any]:
    _must(lab_dir, "lab", "up", "--hosts", "2", "--memory-per-host", "2G")
    _must(lab_dir, "vm", "create", VM, "--host", "host-1", "--memory", memory,
          "--workload", workload)  # fmt: skip
    runs: list[dict[str, Any]] = []
    here, in_a_row = "host-1", 0
    for index in range(count):
        there = "host-2" if here == "host-1" else "host-1"
        strategy = STRATEGIES[index % len(STRATEGIES)]
        code, wall_ms, report = _cli(lab_dir, "migrate", VM, "--to", there, "--strategy", strategy)
        integrity = report.get("integrity") or {}
        ok = (
            code == 0
            and report.get("status") == "completed"
            and integrity.get("ok") is True
            and integrity.get("bad_pages") == 0
        )
        run = {
            "index": index,
            "from": here,
            "to": there,
            "strategy": strategy,
            "ok": ok,
            "exit": code,
            "status": report.get("status"),
            "error": report.get("error") or report.get("stderr"),
            "total_ms": report.get("total_ms"),
            "downtime_ms": report.get("downtime_ms"),
            "guest_downtime_ms": report.get("guest_downtime_ms"),
            "cli_wall_ms": round(wall_ms),
            "pages_checked": integrity.get("pages_checked"),
            "bad_pages": integrity.get("bad_pages"),
        }
        runs.append(run)
        print(json.dumps(run), flush=True)
        running_on = report.get("running_on")
        here = running_on if isinstance(running_on, str) else (there if ok else here)
        in_a_row = 0 if ok else in_a_row + 1
        if in_a_row >= _MAX_FAILURES_IN_A_ROW:
            print(f"soak: {in_a_row} failures in a row, stopping", file=sys.stderr)
            break
    done = [r for r in runs if r["ok"]]
    return {
        "benchmark": "soak",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "memory": memory,
        "workload": workload,
        "strategies": list(STRATEGIES),
        "requested": count,
        "count": len(runs),
        "completed": len(done),
        "failures": len(runs) - len(done) + (count - len(runs)),
        "bad_pages": sum(r["bad_pages"] or 0 for r in runs),
        "total_ms": _stats([r["total_ms"] for r in done if r["total_ms"] is not None]),
        "downtime_ms": _stats([r["downtime_ms"] for r in done if r["downtime_ms"] is not None]),
        "guest_downtime_ms": _stats(
            [r["guest_downtime_ms"] for r in done if r["guest_downtime_ms"] is not None]
        ),
        "cli_wall_ms": _stats([r["cli_wall_ms"] for r in done]),
        "runs": runs,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=100, help="migrations (default 100)")
    parser.add_argument("--memory", default="512M", help="guest memory (default 512M)")
    parser.add_argument("--workload", default=WORKLOAD, help=f"default {WORKLOAD}")
    parser.add_argument("--out", type=Path, default=Path("bench/results/soak.json"))
    args = parser.parse_args()
    if args.count < 1:
        parser.error("--count must be at least 1")
    # SIGTERM unwinds like Ctrl-C, so the `finally` below takes the lab down.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    lab_dir = Path(tempfile.mkdtemp(prefix="vmf-soak-"))
    try:
        result = soak(lab_dir, args.count, args.memory, args.workload)
    finally:
        code, _, down = _cli(lab_dir, "lab", "down")
        if code != 0:
            print(f"soak: lab down failed: {down.get('stderr')}", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    summary = {k: v for k, v in result.items() if k != "runs"}
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out}")
    return 0 if result["failures"] == 0 and result["bad_pages"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
