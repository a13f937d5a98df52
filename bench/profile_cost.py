"""Benchmark: what an agent's rolling profile costs the guest it measures.

The same lab guest (512 MiB, a paced dirtier) is watched for ``--window`` seconds on an agent
that does not profile, then on one that profiles every ``--interval`` seconds (the background
measurement of agent/profile.py: QEMU's ``calc-dirty-rate`` page sampling, ``pmemsave`` of
32 MiB of RAM inspected with zstd, vCPU load and disk writes). Per mode it records:

* the guest's heartbeat gaps (every 5 ms normally), as the largest gap of each second: their
  maximum, 90th percentile and median, the stalls a guest's own clock would feel;
* QEMU's CPU (its process, vCPU threads included) and the agent's (this process: the lab's
  agents run in it) as a share of one core;
* how many measurements ran.

    uv run python bench/profile_cost.py [--window 60] [--interval 10] [--memory 512M]
        [--out bench/results/profile_cost.json]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import time
from pathlib import Path
from typing import Any

from cluster_cli import write_results
from vmferry.core.model import VmSpec
from vmferry.core.workload import parse_workload
from vmferry.guest.channel import now_ms
from vmferry.lab.local import LocalLab

WORKLOAD = "dirty:rate=8M,size=128M,pattern=random,mode=paced"
_TICKS_S = os.sysconf("SC_CLK_TCK")


def _process_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS_S


def _own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _watch(memory: str, interval_s: float | None, window_s: float) -> dict[str, Any]:
    async with await LocalLab.open(profile_interval_s=interval_s) as lab:
        spec = VmSpec.build("cost", memory=memory, workload=parse_workload(WORKLOAD))
        vm = await lab.boot(spec, "host-1")
        pid = vm.process.pid
        assert pid is not None
        await asyncio.sleep(3.0)  # past the profiler's settling time
        agent = lab.cluster.client("host-1")
        gaps: list[float] = []  # the largest heartbeat gap of each second
        seen_at: set[float] = set()
        qemu_before, own_before, started = _process_cpu_s(pid), _own_cpu_s(), time.monotonic()
        while time.monotonic() - started < window_s:
            vm.heartbeats.open_window(now_ms())
            await asyncio.sleep(1.0)
            gaps.append(vm.heartbeats.close_window())
            profile = await agent.profile("cost")
            if profile.guest is not None and profile.guest_age_s is not None:
                seen_at.add(round(time.monotonic() - profile.guest_age_s))
        elapsed_s = time.monotonic() - started
        qemu_cpu = (_process_cpu_s(pid) - qemu_before) / elapsed_s
        own_cpu = (_own_cpu_s() - own_before) / elapsed_s
    ordered = sorted(gaps)
    return {
        "interval_s": interval_s,
        "window_s": round(elapsed_s, 1),
        "seconds": len(gaps),
        "gap_max_ms": max(gaps),
        "gap_p90_ms": ordered[int(0.9 * (len(ordered) - 1))],
        "gap_median_ms": statistics.median(gaps),
        "qemu_cpu_share": round(qemu_cpu, 4),
        "agent_cpu_share": round(own_cpu, 4),
        "measurements": len(seen_at),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--window", type=float, default=60.0)
    parser.add_argument("--interval", type=float, default=10.0)
    parser.add_argument("--memory", default="512M")
    parser.add_argument("--out", type=Path, default=Path("bench/results/profile_cost.json"))
    args = parser.parse_args()
    off = await _watch(args.memory, None, args.window)
    print("off", off, flush=True)
    on = await _watch(args.memory, args.interval, args.window)
    print("on", on, flush=True)
    summary = {
        "extra_qemu_cpu_share": round(on["qemu_cpu_share"] - off["qemu_cpu_share"], 4),
        "extra_agent_cpu_share": round(on["agent_cpu_share"] - off["agent_cpu_share"], 4),
        "gap_max_ms": {"off": off["gap_max_ms"], "on": on["gap_max_ms"]},
        "gap_p90_ms": {"off": off["gap_p90_ms"], "on": on["gap_p90_ms"]},
    }
    results = {
        "benchmark": "profile_cost",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "memory": args.memory,
        "workload": WORKLOAD,
        "off": off,
        "on": on,
        "summary": summary,
    }
    write_results(args.out, results, summary)


if __name__ == "__main__":
    asyncio.run(main())
