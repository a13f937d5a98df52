"""Benchmark: what a verified handoff costs. The same guest moves with ``--verify off``,
``sample`` and ``full`` side by side in one run (the modes take turns, so drift hits them
alike), and the result gives medians and ratios against ``off``: total time, QEMU's downtime,
the downtime the guest felt (its longest heartbeat gap), and the digest throughput per side.

The handoff's comparison runs while both copies are stopped, so its cost shows in the guest's
downtime (QEMU's counter ends before it). Cases: the lab guest idle and dirtying (its heartbeats
give the downtime it felt), and the Debian 12 guest with its disk on local storage (RAM and disk
digests; it sends no heartbeats, so only QEMU's downtime; its boot time to the guest agent is
recorded too).

    uv run python bench/verify.py [--memory 1G] [--repeat 5] [--out bench/results/verify.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from vmferry.core.boot import GuestBoot
from vmferry.core.handoff import VerifyMode
from vmferry.core.model import DiskSpec, MigrationReport, VmName, VmSpec
from vmferry.core.workload import parse_size, parse_workload
from vmferry.guest.debian import debian_image
from vmferry.lab.local import LocalLab

DEBIAN = "debian12"  # the Debian guest, idle after boot, with a local disk (RAM + disk digests)
CASES = {
    "idle": "idle",
    "dirty-20M-random": "dirty:rate=20M,size=256M,pattern=random,mode=paced",
    "idle-local-disk": "idle",  # with a 1 GiB disk on local storage (RAM and disk digests)
    "debian12-local-disk": DEBIAN,
}
DISK_CASES = {"idle-local-disk": "1G"}
MODES = (VerifyMode.OFF, VerifyMode.SAMPLE, VerifyMode.FULL)


def _row(report: MigrationReport) -> dict[str, Any]:
    handoff = report.handoff
    ram = None if handoff is None else handoff.ram
    disk = None if handoff is None else handoff.disk
    return {
        "ok": report.is_success,
        "error": report.error,
        "total_ms": report.total_ms,
        "downtime_ms": report.downtime_ms,
        "guest_downtime_ms": report.guest_downtime_ms,
        "digest_bytes": 0 if ram is None else ram.bytes_compared,
        "digest_ms": 0.0 if ram is None else max(ram.source_ms, ram.destination_ms),
        "disk_digest_ms": 0.0 if disk is None else max(disk.source_ms, disk.destination_ms),
    }


def _median(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r[key] is not None]
    return statistics.median(values) if values else None


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    digest_ms = _median(rows, "digest_ms") or 0.0
    disk_ms = _median(rows, "disk_digest_ms") or 0.0
    digest_bytes = _median(rows, "digest_bytes") or 0.0
    return {
        "runs": len(rows),
        "all_ok": all(r["ok"] for r in rows),
        "total_ms": _median(rows, "total_ms"),
        "downtime_ms": _median(rows, "downtime_ms"),
        "guest_downtime_ms": _median(rows, "guest_downtime_ms"),
        "digest_ms_per_side": digest_ms,
        "digest_gb_per_s_per_side": round(digest_bytes / digest_ms / 1e6, 2) if digest_ms else None,
        "disk_digest_ms_per_side": disk_ms,
    }


def _ratios(summary: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    base = summary[VerifyMode.OFF.value]
    out: dict[str, dict[str, float | None]] = {}
    for mode in (VerifyMode.SAMPLE.value, VerifyMode.FULL.value):
        out[mode] = {
            key: None
            if not base[key] or summary[mode][key] is None
            else round(summary[mode][key] / base[key], 3)
            for key in ("total_ms", "downtime_ms", "guest_downtime_ms")
        }
    return out


async def _boot_debian(lab: LocalLab, name: str, memory: str) -> float:
    """Boot the Debian 12 guest (a copy of its image, local disk, through SeaBIOS) and wait
    for its guest agent; the seconds that took."""
    image = await asyncio.to_thread(debian_image)
    spec = VmSpec(
        name=VmName(name),
        memory_bytes=parse_size(memory),
        vcpus=2,
        disk=DiskSpec(1 << 30, storage="local"),
        boot=GuestBoot(),
    )
    started = time.monotonic()
    await lab.boot(spec, "host-1", image=image.disk)
    await lab.wait_guest_agent(name, 180.0)
    return time.monotonic() - started


async def _case(lab: LocalLab, name: str, workload: str, memory: str, repeat: int) -> Any:
    boot_s = None
    if workload == DEBIAN:
        boot_s = await _boot_debian(lab, name, memory)
    else:
        disk = DISK_CASES.get(name.removeprefix("v-"))
        spec = VmSpec.build(name, memory=memory, workload=parse_workload(workload), disk=disk)
        await lab.boot(spec, "host-1")
    rows: dict[str, list[dict[str, Any]]] = {m.value: [] for m in MODES}
    here = "host-1"
    try:
        for _ in range(repeat):
            for mode in MODES:
                there = "host-2" if here == "host-1" else "host-1"
                report = await lab.migrate(name, there, strategy="precopy", plan=False, verify=mode)
                if report.running_on == there:
                    here = there
                rows[mode.value].append(_row(report))
                print(f"  {name} {mode.value:6} {rows[mode.value][-1]}", flush=True)
    finally:
        await lab.delete(name)
    summary = {mode: _summary(r) for mode, r in rows.items()}
    return {
        "workload": workload,
        "boot_to_guest_agent_s": boot_s,
        "runs": rows,
        "summary": summary,
        "ratio_over_off": _ratios(summary),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--memory", default="1G")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench/results/verify.json"))
    parser.add_argument("--only", default=None, help="comma-separated case names")
    args = parser.parse_args()
    cases = {k: v for k, v in CASES.items() if args.only is None or k in args.only.split(",")}
    results: dict[str, Any] = {"memory": args.memory, "machine": platform.node(), "cases": {}}
    lab = await LocalLab.open()
    try:
        results["qemu"] = lab.qemu.version_text
        results["accel"] = lab.accel
        for case, workload in cases.items():
            results["cases"][case] = await _case(
                lab, f"v-{case}", workload, args.memory, args.repeat
            )
    finally:
        await lab.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    for case, data in results["cases"].items():
        print(case)
        for mode, summary in data["summary"].items():
            print(f"  {mode:6} {summary}")
        print(f"  ratios over off: {data['ratio_over_off']}")


if __name__ == "__main__":
    asyncio.run(main())
