"""Benchmark: one guest moved back and forth many times with one strategy, to count the moves
that fail (a rare failure needs many tries to be seen, and as many to be called gone).

The default is the case that lost guests in the matrix: hybrid moves of a 2 GiB Debian guest
(a paced zero writer, 512 MiB at 112.5 MB/s) over an unshaped netns link, 2 s goal. Each move
is ``vmferry -v migrate`` as a user runs it; the controller's log lines that say a quiet
post-copy was found working (``migration.postcopy_not_broken``) are counted per move. The run
stops at the first failed move (the guest may be split between the hosts then) and copies the
lab's logs beside the results.

    uv run python bench/repeat_moves.py [--moves 16] [--strategy hybrid] [--memory 2G]
        [--out docs/bench/repeat-moves.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from matrix import write_json
from matrix_run import DebianBoot, boot_debian
from vmferry.guest.debian import debian_image
from vmferry.guest.image import build_image
from vmferry.lab.cluster import lab_down, lab_up

VM = "rep1"
HOSTS = ("host-1", "host-2")
WORKLOAD = "dirty:rate=112500000,size=512M,pattern=zero,mode=paced"


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--moves", type=int, default=16)
    parser.add_argument("--strategy", default="hybrid")
    parser.add_argument("--memory", default="2G")
    parser.add_argument("--workload", default=WORKLOAD)
    parser.add_argument("--goal-ms", type=int, default=2000)
    parser.add_argument("--deadline-s", type=float, default=37.0)
    parser.add_argument("--out", type=Path, default=Path("docs/bench/repeat-moves.json"))
    return parser.parse_args()


def _create(lab_dir: Path, memory: str, workload: str) -> None:
    """The Debian guest on shared storage, its workload running."""
    image = debian_image()
    debian = DebianBoot.of(image)
    created = boot_debian(lab_dir, VM, memory, workload, debian)
    if created.exit_code != 0:
        sys.exit(f"vm create failed: {created.stderr_tail}")
    time.sleep(5.0)  # the writer reaches its rate


def _move(lab_dir: Path, args: argparse.Namespace, i: int) -> dict[str, Any]:
    """Move ``i``: to the other host; its outcome as the report says it."""
    to = HOSTS[(i + 1) % 2]
    argv = [
        sys.executable, "-m", "vmferry.cli.main", "-v", "migrate", VM, "--to", to,
        "--strategy", args.strategy, "--max-downtime", str(args.goal_ms),
        "--deadline", f"{args.deadline_s:g}", "--json",
    ]  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        check=False,
        timeout=args.deadline_s + 600,
        env={**os.environ, "VMFERRY_LAB_DIR": str(lab_dir)},
    )
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError:
        report = {}
    return {
        "move": i,
        "to": to,
        "exit_code": done.returncode,
        "status": report.get("status"),
        "strategy": report.get("strategy"),
        "total_ms": report.get("total_ms"),
        "downtime_ms": report.get("downtime_ms"),
        "guest_downtime_ms": report.get("guest_downtime_ms"),
        "wall_ms": round((time.monotonic() - started) * 1000),
        "not_broken_waits": done.stderr.count("migration.postcopy_not_broken"),
        "error": report.get("error") or (done.stderr[-600:] if done.returncode else None),
    }


def main() -> int:
    args = _parse_args()
    if os.geteuid() != 0:
        sys.exit("a netns lab needs root")
    build_image()
    lab_dir = Path(tempfile.mkdtemp(prefix="vmf-repeat-"))
    results: dict[str, Any] = {
        "benchmark": "repeat_moves",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": {k: str(v) for k, v in vars(args).items()} | {"link": "netns, unshaped"},
        "moves": [],
    }
    with asyncio.Runner() as runner:
        try:
            runner.run(lab_up(2, netns=True, lab_dir=lab_dir))
            _create(lab_dir, args.memory, args.workload)
            for i in range(args.moves):
                record = _move(lab_dir, args, i)
                results["moves"].append(record)
                print(json.dumps(record), flush=True)
                if record["exit_code"] != 0:
                    logs = args.out.with_suffix(".logs")
                    shutil.copytree(
                        lab_dir / "hosts", logs, ignore=shutil.ignore_patterns("*.qcow2", "*.sock")
                    )
                    results["logs"] = str(logs)
                    break
                time.sleep(3.0)
        finally:
            runner.run(lab_down(lab_dir))
            shutil.rmtree(lab_dir, ignore_errors=True)
    moves = results["moves"]
    results["summary"] = {
        "moves": len(moves),
        "completed": sum(m["status"] == "completed" for m in moves),
        "failed": sum(m["exit_code"] != 0 for m in moves),
        "moves_found_not_broken": sum(m["not_broken_waits"] > 0 for m in moves),
    }
    write_json(args.out, results)
    print(json.dumps(results["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
