"""Benchmark: what migration-stream TLS costs (``vmferry migrate --tls``).

One guest (512 MiB RAM dirtying 8 MiB/s of random pages over 128 MiB, plus a 512 MiB disk on
local storage that it fills at boot and keeps writing 2 MiB/s to) moves back and forth on a
loopback lab, pre-copy, alternately in clear and over TLS (RAM stream and NBD disk mirror), so
both see the same machine load. For each run:

* total, QEMU downtime and guest-observed downtime (from the report);
* throughput = bytes moved (RAM + disk) / total time;
* QEMU CPU seconds spent on the move: CPU time of both QEMUs' non-vCPU threads (migration
  thread, main loop with the NBD server or mirror, TLS), sampled every 50 ms from
  ``/proc/PID/task/*/stat`` — the guest's vCPU threads (``CPU n/TCG``) are left out.

    uv run python bench/tls.py [--repeat 3]

Writes ``bench/results/tls.json`` with medians per mode and the TLS/plain ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from cluster_cli import median_of, run_cli, write_results
from vmferry.guest.image import build_image
from vmferry.lab.cluster import lab_down, lab_up

MEMORY = "512M"
DISK = "512M"
WORKLOAD = f"dirty:rate=8M,size=128M,pattern=random,mode=paced,disk-size={DISK},disk-rate=2M"
_TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def _lab_qemus(lab_dir: Path) -> list[int]:
    marker = str(lab_dir).encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" in cmdline.split(b"\0", 1)[0] and marker in cmdline:
            pids.append(int(entry.name))
    return pids


def _non_vcpu_ticks(pid: int) -> int:
    ticks = 0
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return 0
    for task in tasks:
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        if name.startswith("CPU "):
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks


class CpuMeter:
    """QEMU non-vCPU CPU time of a lab's QEMUs while a migration runs (QEMUs come and go)."""

    def __init__(self, lab_dir: Path) -> None:
        self.lab_dir = lab_dir
        self.first: dict[int, int] = {}
        self.last: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self, initial: bool = False) -> None:
        for pid in _lab_qemus(self.lab_dir):
            ticks = _non_vcpu_ticks(pid)
            if initial:
                self.first[pid] = ticks
            # QEMUs started during the run (the destination) count from zero.
            self.last[pid] = max(ticks, self.last.get(pid, 0))

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self._sample()

    def __enter__(self) -> CpuMeter:
        self._sample(initial=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def seconds(self) -> float:
        return sum(self.last[p] - self.first.get(p, 0) for p in self.last) * _TICK_S


async def runs(repeat: int) -> list[dict[str, Any]]:
    lab_dir = Path(tempfile.mkdtemp(prefix="vmf-bench-tls-"))
    results: list[dict[str, Any]] = []
    try:
        await lab_up(2, lab_dir=lab_dir)
        run_cli(lab_dir, "vm", "create", "bench", "--host", "host-1", "--memory", MEMORY,
                "--disk", DISK, "--workload", WORKLOAD)  # fmt: skip
        hosts = ["host-2", "host-1"]
        for attempt in range(2 * repeat):
            tls = attempt % 2 == 1
            args = ["migrate", "bench", "--to", hosts[attempt % 2], "--strategy", "precopy"]
            args += ["--no-plan", *(["--tls"] if tls else [])]
            with CpuMeter(lab_dir) as meter:
                wall_ms, report = run_cli(lab_dir, *args)
            moved = report["transferred_bytes"]
            results.append(
                {
                    "mode": "tls" if tls else "plain",
                    "cli_wall_ms": round(wall_ms),
                    "qemu_cpu_s": round(meter.seconds, 3),
                    "throughput_mbps": round(moved * 8 / report["total_ms"] / 1000, 1),
                    **report,
                }
            )
            print({k: results[-1].get(k) for k in (
                "mode", "status", "tls", "total_ms", "downtime_ms", "guest_downtime_ms",
                "transferred_bytes", "throughput_mbps", "qemu_cpu_s")}, flush=True)  # fmt: skip
    finally:
        await lab_down(lab_dir)
    return results


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("total_ms", "downtime_ms", "guest_downtime_ms", "transferred_bytes")
    return {key: median_of(rows, key) for key in (*keys, "throughput_mbps", "qemu_cpu_s")} | {
        "runs": len(rows),
        "ok": all(r["status"] == "completed" and r["integrity"]["ok"] for r in rows),
        "tls_reported": sorted({bool(r["tls"]) for r in rows}),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3, help="runs per mode (default 3)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/tls.json"))
    args = parser.parse_args()
    build_image()
    rows = await runs(args.repeat)
    plain = _summary([r for r in rows if r["mode"] == "plain"])
    tls = _summary([r for r in rows if r["mode"] == "tls"])
    summary = {
        "plain": plain,
        "tls": tls,
        "ratio_tls_over_plain": {
            key: _ratio(tls[key], plain[key])
            for key in ("total_ms", "downtime_ms", "throughput_mbps", "qemu_cpu_s")
        },
    }
    results = {
        "benchmark": "tls",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "memory": MEMORY,
        "disk": DISK,
        "workload": WORKLOAD,
        "network": "loopback",
        "load_average": os.getloadavg(),
        "runs": rows,
        "summary": summary,
    }
    write_results(args.out, results, summary)


if __name__ == "__main__":
    asyncio.run(main())
