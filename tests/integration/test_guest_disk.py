"""The lab guest's disk workload on a real qcow2 disk, on virtio-blk and on virtio-scsi.

One booted guest per bus carries every assertion: the region is filled before READY, writes
reach the virtual device at the set rate without stalling heartbeats (even when the host
throttles the disk), verify reads every block back from the device, and one corrupted block
is found as exactly one bad block.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from vmferry.core.errors import GuestError
from vmferry.core.heartbeat import HeartbeatGaps
from vmferry.core.model import DISK_NODE, VmSpec
from vmferry.core.workload import parse_workload
from vmferry.guest.channel import GuestChannel, now_ms
from vmferry.guest.image import GuestImage
from vmferry.guest.protocol import (
    Ack,
    CorruptedBlock,
    Ready,
    VerifyResult,
    pause_command,
    resume_command,
)
from vmferry.qemu.argv import BootFiles, RuntimePaths, build_argv
from vmferry.qemu.process import QemuProcess
from vmferry.qemu.session import QmpSession

pytestmark = [pytest.mark.qemu, pytest.mark.asyncio]

MiB = 1 << 20
DISK_RATE_BPS = 2 * MiB
WORKLOAD = "idle:disk-rate=2M"
REGION_BLOCKS = (64 * MiB) // 4096  # the default disk region on a 256 MiB disk
BOOT_TIMEOUT_S = 60.0
REPLY_TIMEOUT_S = 10.0
# Blocks are rewritten in runs of up to 64; a run of 5 blocks (2 MiB/s at 100 writes/s) takes
# seconds at this throttle, so a writer that blocked the main loop would stop the heartbeats.
THROTTLE_BPS = 8192
WINDOW_S = 2.0


@dataclass
class DiskGuest:
    spec: VmSpec
    process: QemuProcess
    qmp: QmpSession
    channel: GuestChannel
    heartbeats: HeartbeatGaps
    ready: Ready
    boot_s: float


@asynccontextmanager
async def booted(image: GuestImage, bus: str) -> AsyncIterator[DiskGuest]:
    qemu = shutil.which("qemu-system-x86_64")
    assert qemu is not None, "qemu-system-x86_64 is not installed"
    spec = VmSpec.build(
        f"disk-{bus}", memory="512M", workload=parse_workload(WORKLOAD), disk="256M", disk_bus=bus
    )
    # A short private directory: UNIX socket paths are limited to 108 bytes.
    workdir = Path(tempfile.mkdtemp(prefix="vmf-disk-"))
    disk = workdir / "disk.qcow2"
    created = await asyncio.create_subprocess_exec(
        "qemu-img", "create", "-q", "-f", "qcow2", str(disk), "256M"
    )
    assert await created.wait() == 0, "qemu-img create failed"
    paths = RuntimePaths(workdir)
    argv = build_argv(
        qemu, spec, BootFiles(image.kernel_path, image.initrd_path), paths, disk_image=disk
    )
    process = QemuProcess(argv, paths.qemu_log, spec.name)
    qmp = QmpSession(spec.name)
    heartbeats = HeartbeatGaps()
    channel = GuestChannel(spec.name, heartbeats)
    started = time.monotonic()
    await process.start()
    try:
        await process.wait_for_socket(paths.qmp_socket, 15.0)
        await qmp.connect(paths.qmp_socket)
        await channel.connect(paths.channel_socket)
        try:
            ready = await channel.wait_ready(BOOT_TIMEOUT_S)
        except GuestError:
            console = paths.console_log.read_text(errors="replace")
            pytest.fail(f"no READY within {BOOT_TIMEOUT_S:g} s; console:\n{console[-3000:]}")
        yield DiskGuest(spec, process, qmp, channel, heartbeats, ready, time.monotonic() - started)
    finally:
        try:
            await channel.close()
            await qmp.close()
        finally:
            await process.stop()
            shutil.rmtree(workdir, ignore_errors=True)


async def disk_device(guest: DiskGuest) -> Mapping[str, Any]:
    """QEMU's view of the guest's disk: its qdev path and its I/O counters (``stats``)."""
    devices = await guest.qmp.execute("query-blockstats")
    for device in devices:
        if device.get("node-name") == DISK_NODE or f"/{DISK_NODE}-dev" in device.get("qdev", ""):
            found: Mapping[str, Any] = device
            return found
    raise AssertionError(f"no block device {DISK_NODE} in {devices}")


async def disk_stats(guest: DiskGuest) -> Mapping[str, Any]:
    stats: Mapping[str, Any] = (await disk_device(guest))["stats"]
    return stats


async def throttle_writes(guest: DiskGuest, bps_wr: int) -> None:
    # By qdev path: virtio-blk's backend hangs off a child of the device, not the device id.
    qdev = (await disk_device(guest))["qdev"]
    limits = {"bps": 0, "bps_rd": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0}
    await guest.qmp.execute("block_set_io_throttle", {"id": qdev, **limits, "bps_wr": bps_wr})


async def heartbeat_window(guest: DiskGuest, duration_s: float) -> int:
    """Wait ``duration_s`` on heartbeats; return the largest gap between them, in ms."""
    guest.heartbeats.open_window(now_ms())
    await guest.channel.wait_heartbeat_after(now_ms() + duration_s * 1000, duration_s + 5.0)
    return guest.heartbeats.close_window()


@pytest.mark.parametrize("bus", ["virtio-blk", "virtio-scsi"])
async def test_disk_workload(guest_image: GuestImage, bus: str) -> None:
    async with booted(guest_image, bus) as guest:
        assert guest.ready == Ready(
            pages=16384,
            pattern="random",
            mode="idle",
            rate_bps=0,
            disk_blocks=REGION_BLOCKS,
            disk_rate_bps=DISK_RATE_BPS,
        )
        assert guest.spec.workload.disk_region_bytes(256 * MiB) == REGION_BLOCKS * 4096

        # The fill went to the virtual disk, and the writer keeps writing at its rate.
        before = await disk_stats(guest)
        assert before["wr_bytes"] >= REGION_BLOCKS * 4096
        started = time.monotonic()
        max_gap_ms = await heartbeat_window(guest, WINDOW_S)
        after = await disk_stats(guest)
        write_bps = (after["wr_bytes"] - before["wr_bytes"]) / (time.monotonic() - started)
        assert 0.5 * DISK_RATE_BPS < write_bps < 1.5 * DISK_RATE_BPS
        assert max_gap_ms < 500

        # A disk that accepts writes at a trickle holds up the writer thread, not heartbeats.
        await throttle_writes(guest, THROTTLE_BPS)
        before = await disk_stats(guest)
        throttled_gap_ms = await heartbeat_window(guest, WINDOW_S)
        after = await disk_stats(guest)
        await throttle_writes(guest, 0)
        throttled_bytes = after["wr_bytes"] - before["wr_bytes"]
        assert throttled_bytes < DISK_RATE_BPS * WINDOW_S / 10  # the writer really was held up
        assert throttled_gap_ms < 500

        # Verify reads the whole region back from the device, not from the page cache.
        before = await disk_stats(guest)
        started = time.monotonic()
        result = await guest.channel.verify()
        verify_s = time.monotonic() - started
        after = await disk_stats(guest)
        assert result == VerifyResult(16384, 0, None, REGION_BLOCKS, 0, None)
        assert after["rd_bytes"] - before["rd_bytes"] >= REGION_BLOCKS * 4096

        # Paused, so the writer cannot heal the block before the verify.
        paused = await guest.channel.request(pause_command(), Ack, REPLY_TIMEOUT_S)
        assert paused == Ack("pause")
        assert await guest.channel.corrupt_block(4321) == CorruptedBlock(4321)
        result = await guest.channel.verify()
        assert result == VerifyResult(16384, 0, None, REGION_BLOCKS, 1, 4321)
        assert not result.is_intact
        with pytest.raises(GuestError, match="refused"):
            await guest.channel.corrupt_block(REGION_BLOCKS)
        resumed = await guest.channel.request(resume_command(), Ack, REPLY_TIMEOUT_S)
        assert resumed == Ack("resume")
        await guest.channel.wait_heartbeat_after(now_ms(), 5.0)

    print(
        f"\n{bus}: boot to READY {guest.boot_s:.1f} s; disk writes {write_bps / MiB:.2f} MiB/s; "
        f"largest heartbeat gap {max_gap_ms} ms, {throttled_gap_ms} ms with writes throttled "
        f"to {THROTTLE_BPS} B/s ({throttled_bytes} B written in {WINDOW_S:g} s); "
        f"verify of 64 MiB memory + 64 MiB disk {verify_s:.2f} s"
    )
