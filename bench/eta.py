"""Benchmark: does the progress line's ETA tell the truth? Each move's progress samples are
recorded with the time they arrived; at 25, 50 and 75 % of the move's wall time, the ETA the
progress line showed then is compared with the time that was really left. The result gives
per case and fraction the median and worst relative error (|ETA - actual| / actual).

Moves run over loopback capped by ``--bandwidth`` so that they last long enough to be read
(several seconds), with the lab guest idle and dirtying.

    uv run python bench/eta.py [--repeat 3] [--bandwidth 400] [--out bench/results/eta.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

from vmferry.core.handoff import VerifyMode
from vmferry.core.model import MigrationStats, VmSpec
from vmferry.core.phases import Phase
from vmferry.core.workload import parse_workload
from vmferry.lab.local import LocalLab

CASES = {
    "idle-1G": ("1G", "idle"),
    "dirty-10M-random": ("1G", "dirty:rate=10M,size=256M,pattern=random,mode=paced"),
    "dirty-30M-compressible": ("1G", "dirty:rate=30M,size=384M,pattern=compressible,mode=paced"),
}
FRACTIONS = (0.25, 0.5, 0.75)


def _errors(samples: list[tuple[float, int | None]], start: float, end: float) -> dict[str, Any]:
    """For each fraction: the ETA shown at that moment against what was really left."""
    out: dict[str, Any] = {}
    for fraction in FRACTIONS:
        at = start + fraction * (end - start)
        shown = [(t, eta) for t, eta in samples if t <= at and eta is not None]
        if not shown:
            out[str(fraction)] = None
            continue
        t, eta = shown[-1]
        actual_ms = (end - t) * 1000
        out[str(fraction)] = {
            "eta_ms": eta,
            "actual_ms": round(actual_ms),
            "error": round(abs(eta - actual_ms) / actual_ms, 3) if actual_ms > 0 else None,
        }
    return out


async def _move(lab: LocalLab, name: str, to: str, bandwidth: int) -> dict[str, Any]:
    samples: list[tuple[float, int | None]] = []

    def progress(phase: Phase, stats: MigrationStats | None) -> None:
        if stats is not None and phase in (Phase.SETUP, Phase.ACTIVE):
            samples.append((time.monotonic(), stats.eta_ms))

    start = time.monotonic()
    report = await lab.migrate(
        name,
        to,
        strategy="precopy",
        plan=False,
        bandwidth_mbps=bandwidth,
        verify=VerifyMode.OFF,
        on_progress=progress,
    )
    end = time.monotonic()
    return {
        "ok": report.is_success,
        "total_ms": round((end - start) * 1000),
        "samples": len(samples),
        "at": _errors(samples, start, end),
    }


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for fraction in map(str, FRACTIONS):
        errors = [r["at"][fraction]["error"] for r in runs if r["at"].get(fraction)]
        errors = [e for e in errors if e is not None]
        summary[fraction] = (
            {"median_error": round(statistics.median(errors), 3), "worst_error": max(errors)}
            if errors
            else None
        )
    return summary


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--bandwidth", type=int, default=400, metavar="MBPS")
    parser.add_argument("--out", type=Path, default=Path("bench/results/eta.json"))
    args = parser.parse_args()
    results: dict[str, Any] = {"bandwidth_mbps": args.bandwidth, "cases": {}}
    lab = await LocalLab.open()
    try:
        for case, (memory, workload) in CASES.items():
            name = f"eta-{case}"
            await lab.boot(VmSpec.build(name, memory=memory, workload=parse_workload(workload)))
            runs, here = [], "host-1"
            try:
                for _ in range(args.repeat):
                    there = "host-2" if here == "host-1" else "host-1"
                    runs.append(await _move(lab, name, there, args.bandwidth))
                    here = there
                    print(f"  {case}: {runs[-1]}", flush=True)
            finally:
                await lab.delete(name)
            results["cases"][case] = {"runs": runs, "summary": _summary(runs)}
    finally:
        await lab.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    for case, data in results["cases"].items():
        print(case, data["summary"])


if __name__ == "__main__":
    asyncio.run(main())
