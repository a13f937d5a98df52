"""Benchmark: vmferry's live migration against raw QEMU driven by a minimal QMP script.

Both sides move the same lab guest (same kernel, initramfs, QEMU command line, migration
parameters) over TCP loopback, in the same run, for an idle and a dirtying workload. vmferry's
side is the engine users run (``controller.migrate`` over the hosts' agents, here in-process:
``LocalLab``) with ``--strategy precopy --no-plan``, timed from its first request to the guest's
first heartbeat on the destination (the report's ``total_ms``). For each
they record wall time (destination launch to guest heartbeats resumed), QEMU's total time and
downtime, the largest heartbeat gap the host saw (guest-observed downtime) and bytes sent; the
result JSON carries vmferry/raw ratios.

    uv run python bench/raw_vs_vmferry.py [--memory 1G] [--repeat 1] [--out bench/results/…]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from vmferry.controller.plan import (
    DOWNTIME_HEADROOM,
    RESUME_ALLOWANCE_MS,
    qemu_downtime_limit_ms,
)
from vmferry.core.model import MigrationStats, VmSpec
from vmferry.core.phases import Phase
from vmferry.core.workload import parse_workload
from vmferry.lab.local import LocalLab
from vmferry.qemu.argv import BootFiles, RuntimePaths, build_argv
from vmferry.qemu.migration import UNLIMITED_BPS

CASES = {
    "idle": "idle",
    "dirty-50M-random": "dirty:rate=50M,size=256M,pattern=random,mode=paced",
}
DOWNTIME_LIMIT_MS = 300
# The user's maximum that vmferry turns into the same QEMU downtime-limit as the baseline's.
MAX_DOWNTIME_MS = round(DOWNTIME_LIMIT_MS / DOWNTIME_HEADROOM) + RESUME_ALLOWANCE_MS
assert qemu_downtime_limit_ms(MAX_DOWNTIME_MS) == DOWNTIME_LIMIT_MS


# ---------------------------------------------------------------------------------------------
# The baseline: as little as it takes to live-migrate with QEMU and QMP alone.


class Heartbeats:
    def __init__(self) -> None:
        self.last_seq = 0
        self.last_at = 0.0
        self.max_gap_ms = 0.0
        self.measuring = False

    async def follow(self, path: Path) -> None:
        for _ in range(200):
            try:
                reader, _writer = await asyncio.open_unix_connection(str(path))
                break
            except OSError:
                await asyncio.sleep(0.05)
        else:
            raise RuntimeError(f"no channel at {path}")
        while line := await reader.readline():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == b"HB" and parts[1].isdigit():
                seq, now = int(parts[1]), time.monotonic()
                if seq > self.last_seq:
                    if self.measuring and self.last_at:
                        self.max_gap_ms = max(self.max_gap_ms, (now - self.last_at) * 1000)
                    self.last_seq, self.last_at = seq, now


async def connect_qmp(path: Path) -> QMPClient:
    client = QMPClient("raw")
    for _ in range(200):
        if path.exists():
            break
        await asyncio.sleep(0.05)
    await client.connect(str(path))
    return client


async def raw_migration(qemu: str, spec: VmSpec, boot: BootFiles, root: Path) -> dict[str, Any]:
    src_paths, dst_paths = RuntimePaths(root / "src"), RuntimePaths(root / "dst")
    for paths in (src_paths, dst_paths):
        paths.directory.mkdir(parents=True)
    src = await asyncio.create_subprocess_exec(
        *build_argv(qemu, spec, boot, src_paths), stdout=asyncio.subprocess.DEVNULL
    )
    beats = Heartbeats()
    tasks: list[asyncio.Task[None]] = []
    dst: asyncio.subprocess.Process | None = None
    try:
        src_qmp = await connect_qmp(src_paths.qmp_socket)
        tasks.append(asyncio.create_task(beats.follow(src_paths.channel_socket)))
        while beats.last_seq < 50:  # booted and beating  # noqa: ASYNC110 - minimal on purpose
            await asyncio.sleep(0.1)
        started = time.monotonic()
        dst = await asyncio.create_subprocess_exec(
            *build_argv(qemu, spec, boot, dst_paths, incoming=True),
            stdout=asyncio.subprocess.DEVNULL,
        )
        dst_qmp = await connect_qmp(dst_paths.qmp_socket)
        tasks.append(asyncio.create_task(beats.follow(dst_paths.channel_socket)))
        await dst_qmp.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
        port = (await dst_qmp.execute("query-migrate"))["socket-address"][0]["port"]  # type: ignore[index]
        await src_qmp.execute(
            "migrate-set-parameters",
            {"max-bandwidth": UNLIMITED_BPS, "downtime-limit": DOWNTIME_LIMIT_MS},
        )
        beats.measuring = True
        await src_qmp.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        while True:
            info: dict[str, Any] = await src_qmp.execute("query-migrate")  # type: ignore[assignment]
            if info["status"] in ("completed", "failed", "cancelled"):
                break
            await asyncio.sleep(0.05)
        done_seq = beats.last_seq
        while beats.last_seq <= done_seq:  # noqa: ASYNC110 - alive on the destination
            await asyncio.sleep(0.005)
        wall_ms = (time.monotonic() - started) * 1000
        beats.measuring = False
        await src_qmp.disconnect()
        await dst_qmp.disconnect()
        return {
            "status": info["status"],
            "wall_ms": round(wall_ms),
            "qemu_total_ms": info.get("total-time"),
            "downtime_ms": info.get("downtime"),
            "guest_downtime_ms": round(beats.max_gap_ms),
            "transferred_bytes": info["ram"]["transferred"],
            "iterations": info["ram"]["dirty-sync-count"],
        }
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for proc in (src, dst):
            if proc is not None and proc.returncode is None:
                proc.kill()
                await proc.wait()


# ---------------------------------------------------------------------------------------------


async def vmferry_migration(lab: LocalLab, spec: VmSpec) -> dict[str, Any]:
    await lab.boot(spec, "host-1")
    last: list[MigrationStats] = []

    def progress(_phase: Phase, stats: MigrationStats | None) -> None:
        if stats is not None:
            last.append(stats)

    report = await lab.migrate(
        spec.name,
        "host-2",
        strategy="precopy",
        plan=False,
        max_downtime_ms=MAX_DOWNTIME_MS,
        on_progress=progress,
    )
    await lab.delete(spec.name)
    return {
        "status": report.status,
        "wall_ms": report.total_ms,
        "qemu_total_ms": last[-1].total_ms if last else None,
        "downtime_ms": report.downtime_ms,
        "guest_downtime_ms": report.guest_downtime_ms,
        "transferred_bytes": report.transferred_bytes,
        "iterations": report.iterations,
        "integrity": None if report.integrity is None else report.integrity.to_json(),
    }


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [run[key] for run in runs if run.get(key) is not None]
    return statistics.median(values) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 3)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--memory", default="1G")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench/results/raw_vs_vmferry.json"))
    args = parser.parse_args()

    results: dict[str, Any] = {
        "benchmark": "raw_vs_vmferry",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"python": platform.python_version(), "node": platform.node()},
        "memory": args.memory,
        "cases": {},
    }
    async with await LocalLab.open() as lab:
        results["qemu"] = lab.qemu.version_text
        results["accel"] = lab.accel
        boot = lab.boot_files
        for case, workload in CASES.items():
            raw_runs, ferry_runs = [], []
            for attempt in range(args.repeat):
                spec = VmSpec.build(
                    f"bench-{attempt}", memory=args.memory, workload=parse_workload(workload)
                )
                with tempfile.TemporaryDirectory(prefix="vmf-raw-") as tmp:
                    raw_runs.append(await raw_migration(lab.qemu.path, spec, boot, Path(tmp)))
                ferry_runs.append(await vmferry_migration(lab, spec))
                print(case, "raw", raw_runs[-1], "\n", case, "vmferry", ferry_runs[-1], flush=True)
            keys = (
                "wall_ms",
                "qemu_total_ms",
                "downtime_ms",
                "guest_downtime_ms",
                "transferred_bytes",
            )
            results["cases"][case] = {
                "workload": workload,
                "raw": raw_runs,
                "vmferry": ferry_runs,
                "ratio_vmferry_over_raw": {
                    key: _ratio(_median(ferry_runs, key), _median(raw_runs, key)) for key in keys
                },
            }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({c: v["ratio_vmferry_over_raw"] for c, v in results["cases"].items()}))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    asyncio.run(main())
