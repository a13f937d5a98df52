"""Benchmark: moving a VM whose 1 GiB disk sits on the source host's local storage.

The guest (512 MiB RAM, idle memory) fills its whole 1 GiB disk with self-checking blocks at
boot and keeps writing 2 MiB/s to it while it moves. Same run:

* ``raw``            — two QEMUs driven by a minimal QMP script: NBD export on the destination,
                       ``blockdev-mirror`` until ready, RAM migration with
                       ``pause-before-switchover``, mirror completed at the pause (loopback);
* ``vmferry``        — ``vmferry migrate --strategy precopy`` on a loopback lab (local storage);
* ``vmferry-shared`` — the same VM with its image on shared storage (only RAM moves);
* ``vmferry-200M``   — local storage over a netns lab with 200 Mbit/s links (root only).

    uv run python bench/disk.py [--disk 1G] [--repeat 1] [--no-netns]

Writes ``bench/results/disk.json`` with the vmferry/raw ratio of the loopback times.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from cluster_cli import median_of, run_cli, write_results
from raw_vs_vmferry import DOWNTIME_LIMIT_MS, Heartbeats, connect_qmp
from vmferry.core.model import VmSpec
from vmferry.core.workload import parse_workload
from vmferry.guest.image import build_image
from vmferry.lab.cluster import lab_down, lab_up
from vmferry.qemu.argv import BootFiles, RuntimePaths, build_argv
from vmferry.qemu.binary import find_qemu
from vmferry.qemu.migration import UNLIMITED_BPS

MEMORY = "512M"


def workload(disk: str) -> str:
    return f"idle:size=64M,disk-size={disk},disk-rate=2M"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def raw_disk_migration(
    qemu: str, spec: VmSpec, boot: BootFiles, root: Path
) -> dict[str, Any]:
    """The baseline: what it takes to move a VM and its local disk with QEMU and QMP alone."""
    assert spec.disk is not None
    images = {side: root / f"{side}.qcow2" for side in ("src", "dst")}
    for image in images.values():
        created = await asyncio.create_subprocess_exec(
            "qemu-img", "create", "-q", "-f", "qcow2", str(image), str(spec.disk.size_bytes)
        )
        assert await created.wait() == 0
    src_paths, dst_paths = RuntimePaths(root / "src"), RuntimePaths(root / "dst")
    for paths in (src_paths, dst_paths):
        paths.directory.mkdir(parents=True)
    src = await asyncio.create_subprocess_exec(
        *build_argv(qemu, spec, boot, src_paths, disk_image=images["src"]),
        stdout=asyncio.subprocess.DEVNULL,
    )
    beats = Heartbeats()
    tasks: list[asyncio.Task[None]] = []
    dst: asyncio.subprocess.Process | None = None
    try:
        src_qmp = await connect_qmp(src_paths.qmp_socket)
        tasks.append(asyncio.create_task(beats.follow(src_paths.channel_socket)))
        while beats.last_seq < 50:  # noqa: ASYNC110 - minimal on purpose
            await asyncio.sleep(0.1)
        started = time.monotonic()
        dst = await asyncio.create_subprocess_exec(
            *build_argv(qemu, spec, boot, dst_paths, incoming=True, disk_image=images["dst"]),
            stdout=asyncio.subprocess.DEVNULL,
        )
        dst_qmp = await connect_qmp(dst_paths.qmp_socket)
        tasks.append(asyncio.create_task(beats.follow(dst_paths.channel_socket)))
        await dst_qmp.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
        port = (await dst_qmp.execute("query-migrate"))["socket-address"][0]["port"]  # type: ignore[index]
        nbd_port = _free_port()
        await dst_qmp.execute(
            "nbd-server-start",
            {"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": str(nbd_port)}}},
        )
        await dst_qmp.execute(
            "block-export-add",
            {"type": "nbd", "id": "e", "node-name": "disk0", "name": "disk0", "writable": True},
        )
        await src_qmp.execute(
            "blockdev-add",
            {
                "driver": "nbd",
                "node-name": "target",
                "server": {"type": "inet", "host": "127.0.0.1", "port": str(nbd_port)},
                "export": "disk0",
            },
        )
        await src_qmp.execute(
            "blockdev-mirror",
            {"job-id": "m", "device": "disk0", "target": "target", "sync": "full"},
        )
        while True:
            jobs: list[dict[str, Any]] = await src_qmp.execute("query-block-jobs")  # type: ignore[assignment]
            if jobs and jobs[0].get("ready"):
                break
            await asyncio.sleep(0.05)
        disk_ms = (time.monotonic() - started) * 1000
        disk_bytes = int(jobs[0]["offset"])
        await src_qmp.execute(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": "pause-before-switchover", "state": True}]},
        )
        await src_qmp.execute(
            "migrate-set-parameters",
            {"max-bandwidth": UNLIMITED_BPS, "downtime-limit": DOWNTIME_LIMIT_MS},
        )
        beats.measuring = True
        await src_qmp.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        while True:
            info: dict[str, Any] = await src_qmp.execute("query-migrate")  # type: ignore[assignment]
            if info["status"] == "pre-switchover":
                await src_qmp.execute("block-job-cancel", {"device": "m"})
                while await src_qmp.execute("query-block-jobs"):  # noqa: ASYNC110 - minimal
                    await asyncio.sleep(0.005)
                await src_qmp.execute("migrate-continue", {"state": "pre-switchover"})
            if info["status"] in ("completed", "failed", "cancelled"):
                break
            await asyncio.sleep(0.02)
        done_seq = beats.last_seq
        while beats.last_seq <= done_seq:  # noqa: ASYNC110 - alive on the destination
            await asyncio.sleep(0.005)
        wall_ms = (time.monotonic() - started) * 1000
        beats.measuring = False
        await dst_qmp.execute("nbd-server-stop")
        await src_qmp.disconnect()
        await dst_qmp.disconnect()
        return {
            "status": info["status"],
            "total_ms": round(wall_ms),
            "disk_ms": round(disk_ms),
            "downtime_ms": info.get("downtime"),
            "guest_downtime_ms": round(beats.max_gap_ms),
            "transferred_bytes": info["ram"]["transferred"] + disk_bytes,
        }
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for proc in (src, dst):
            if proc is not None and proc.returncode is None:
                proc.kill()
                await proc.wait()


async def cli_runs(
    disk: str, storage: str, repeat: int, *, netns: bool = False, link_mbps: int | None = None
) -> list[dict[str, Any]]:
    lab_dir = Path(tempfile.mkdtemp(prefix="vmf-bench-"))
    runs: list[dict[str, Any]] = []
    try:
        await lab_up(2, lab_dir=lab_dir, netns=netns, link_mbps=link_mbps)
        run_cli(lab_dir, "vm", "create", "bench", "--host", "host-1", "--memory", MEMORY,
                "--disk", disk, "--storage", storage, "--workload", workload(disk))  # fmt: skip
        hosts = ["host-2", "host-1"]
        for attempt in range(repeat):
            wall_ms, report = run_cli(
                lab_dir, "migrate", "bench", "--to", hosts[attempt % 2], "--strategy", "precopy"
            )
            runs.append({"cli_wall_ms": round(wall_ms), **report})
            print(storage, "netns" if netns else "loopback", runs[-1], flush=True)
    finally:
        await lab_down(lab_dir)
    return runs


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        key: median_of(runs, key)
        for key in ("total_ms", "downtime_ms", "guest_downtime_ms", "transferred_bytes")
    } | {"ok": all(r.get("status") == "completed" and r.get("integrity", {}).get("ok", True)
                   for r in runs)}  # fmt: skip


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--disk", default="1G")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--no-netns", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench/results/disk.json"))
    args = parser.parse_args()

    image = build_image()
    boot = BootFiles(image.kernel_path, image.initrd_path)
    qemu = await find_qemu()
    spec = VmSpec.build("raw", memory=MEMORY, workload=parse_workload(workload(args.disk)),
                        disk=args.disk)  # fmt: skip
    raw: list[dict[str, Any]] = []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="vmf-raw-") as tmp:
            raw.append(await raw_disk_migration(qemu.path, spec, boot, Path(tmp)))
        print("raw", raw[-1], flush=True)
    local = await cli_runs(args.disk, "local", args.repeat)
    shared = await cli_runs(args.disk, "shared", args.repeat)
    shaped: list[dict[str, Any]] = []
    if not args.no_netns and os.geteuid() == 0:
        shaped = await cli_runs(args.disk, "local", args.repeat, netns=True, link_mbps=200)

    raw_total, local_total = median_of(raw, "total_ms"), median_of(local, "total_ms")
    summary = {
        "raw_loopback": _summary(raw),
        "vmferry_loopback_local": _summary(local),
        "vmferry_loopback_shared": _summary(shared),
        "vmferry_netns_200mbit_local": _summary(shaped) if shaped else None,
        "ratio_vmferry_over_raw_total": (
            round(local_total / raw_total, 3) if raw_total and local_total else None
        ),
    }
    results = {
        "benchmark": "disk",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "memory": MEMORY,
        "disk": args.disk,
        "workload": workload(args.disk),
        "qemu": qemu.version_text,
        "raw": raw,
        "vmferry_local": local,
        "vmferry_shared": shared,
        "vmferry_netns_200mbit": shaped,
        "summary": summary,
    }
    write_results(args.out, results, summary)


if __name__ == "__main__":
    asyncio.run(main())
