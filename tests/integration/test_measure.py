"""Pre-flight measurements of real running guests: dirty rate, zero pages, compressibility.

One guest per test; each is measured once with :func:`measure_guest` (the planner's call) while
its heartbeats show that it kept running.
"""

from __future__ import annotations

import time

import pytest

from vmferry.agent.digest import find_ram_fd
from vmferry.agent.vm import RunningVm
from vmferry.core.dirty_curve import fit, settled_bytes
from vmferry.core.model import VmSpec
from vmferry.core.workload import parse_workload
from vmferry.guest.channel import now_ms
from vmferry.lab.local import LocalLab
from vmferry.qemu.measure import GuestProfile, measure_guest
from vmferry.qemu.ram_scan import RamScan, scan_changes

pytestmark = [pytest.mark.qemu, pytest.mark.asyncio]

MIB = 1 << 20


async def _boot_and_measure(lab: LocalLab, name: str, workload: str) -> GuestProfile:
    spec = VmSpec.build(name, memory="512M", workload=parse_workload(workload))
    vm = await lab.boot(spec, "host-1")
    heartbeats = vm.heartbeats
    await vm.heartbeat_for(measuring=True)  # the measurement's stall, at 5 ms resolution
    heartbeats.open_window(now_ms())
    started = time.monotonic()

    profile = await measure_guest(vm.qmp, lab.workdir)

    elapsed_s = time.monotonic() - started
    gap_ms = heartbeats.close_window()
    print(
        f"\n{workload}: dirty {profile.dirty_rate_bps / MIB:.0f} MiB/s, "
        f"zero {profile.memory.zero_fraction:.3f}, ratio {profile.memory.compress_ratio:.2f}, "
        f"{profile.elapsed_ms} ms, heartbeat gap {gap_ms} ms"
    )
    assert elapsed_s < 5.0
    await _assert_still_running(vm, gap_ms)
    # pmemsave's dumps are gone.
    assert not list(lab.workdir.glob("pmem-*"))
    return profile


async def _assert_still_running(vm: RunningVm, gap_ms: int) -> None:
    status = await vm.qmp.execute("query-status")
    assert status["status"] == "running"
    # Heartbeats come every 5 ms; measuring must not stall the guest noticeably.
    assert 0 < gap_ms < 500


async def test_paced_random_dirtier(lab: LocalLab) -> None:
    # Random pages dominate its non-zero RAM (the kernel's ~80 MiB compress ~3x).
    profile = await _boot_and_measure(
        lab, "busy-vm", "dirty:rate=20M,size=256M,pattern=random,mode=paced"
    )

    assert profile.ram_bytes == 512 * MIB
    assert 10 * MIB <= profile.dirty_rate_bps <= 40 * MIB
    assert profile.memory.compress_ratio < 1.3
    assert profile.memory.pages_sampled == 32 * MIB // 4096


async def test_idle_zero_guest(lab: LocalLab) -> None:
    profile = await _boot_and_measure(lab, "zero-vm", "idle:size=64M,pattern=zero")

    assert profile.dirty_rate_bps < 5 * MIB
    assert profile.memory.zero_fraction > 0.7


async def test_idle_compressible_guest(lab: LocalLab) -> None:
    profile = await _boot_and_measure(lab, "pack-vm", "idle:size=64M,pattern=compressible")

    assert profile.dirty_rate_bps < 5 * MIB
    assert profile.memory.compress_ratio > 2


async def test_memory_sampled_through_the_memfd_agrees_without_qemu(lab: LocalLab) -> None:
    """The agent reads the guest's RAM memfd itself: the same picture as QEMU's pmemsave
    dumps, with no QEMU command (and no dump file) involved."""
    workload = parse_workload("dirty:rate=2M,size=128M,pattern=random,mode=paced")
    spec = VmSpec.build("memfd-vm", memory="512M", workload=workload)
    vm = await lab.boot(spec, "host-1")
    assert vm.process.pid is not None
    via_qemu = await measure_guest(vm.qmp, lab.workdir)
    heartbeats = vm.heartbeats
    await vm.heartbeat_for(measuring=True)  # the measurement's stall, at 5 ms resolution
    heartbeats.open_window(now_ms())
    ram_file = find_ram_fd(vm.process.pid, spec.memory_bytes)
    direct = await measure_guest(vm.qmp, lab.workdir, ram_file=ram_file)
    gap_ms = heartbeats.close_window()
    print(
        f"\nmemfd: zero {direct.memory.zero_fraction:.3f} (QEMU's dumps "
        f"{via_qemu.memory.zero_fraction:.3f}), ratio {direct.memory.compress_ratio:.2f}, "
        f"heartbeat gap {gap_ms} ms"
    )
    assert direct.memory.pages_sampled == 512 * 8
    assert abs(direct.memory.zero_fraction - via_qemu.memory.zero_fraction) < 0.1
    assert direct.memory.compress_ratio < 2.0  # random pages dominate the non-zero ones
    await _assert_still_running(vm, gap_ms)

    # Its dirty curve, from three reads of the same file: the writer's 2 MiB/s as the slope,
    # and the pages written again within any window (the kernel's, the writer's bookkeeping).
    heartbeats.open_window(now_ms())
    scan = await scan_changes(ram_file, ram_bytes=spec.memory_bytes)
    gap_ms = heartbeats.close_window()
    curve = fit(
        short_s=scan.short_s,
        short_bytes=scan.short_bytes,
        long_s=scan.long_s,
        long_bytes=scan.long_bytes,
    )
    print(f"scan: {scan} -> {curve}, heartbeat gap {gap_ms} ms")
    assert scan.sampled_bytes == 256 * MIB
    assert 0.02 < scan.short_s < scan.long_s
    assert 1.2 * MIB <= curve.rate_bps <= 3.2 * MIB
    assert 0 < curve.hot_bytes < 4 * MIB
    # The pages it changed are the writer's random ones: they compress no better than that.
    assert scan.changed_ratio is not None
    assert scan.changed_ratio < 1.6
    await _assert_still_running(vm, gap_ms)
    # 2 MiB/s into 128 MiB is far from filling it: no settled set is read into it.
    assert scan.far_bytes is None or settled_bytes(_windows(scan)) is None


def _windows(scan: RamScan) -> tuple[tuple[float, float], ...]:
    assert scan.far_s is not None
    assert scan.far_bytes is not None
    return (
        (scan.short_s, scan.short_bytes),
        (scan.long_s, scan.long_bytes),
        (scan.far_s, scan.far_bytes),
    )


async def test_a_cpu_bound_writer_is_seen_settling_in_its_working_set(lab: LocalLab) -> None:
    """A writer that fills its 24 MiB within a window looks "hot" over 1 s; the scan's third
    window sees the count level off there, and the plan's dirty set is that, not the RAM."""
    workload = parse_workload("dirty:size=24M,pattern=random,mode=cpu")
    spec = VmSpec.build("settle-vm", memory="256M", workload=workload)
    vm = await lab.boot(spec, "host-1")
    assert vm.process.pid is not None
    ram_file = find_ram_fd(vm.process.pid, spec.memory_bytes)
    scan = await scan_changes(ram_file, ram_bytes=spec.memory_bytes)
    print(f"\nscan: {scan}")
    assert scan.far_s is not None
    assert scan.far_s > scan.long_s
    settled = settled_bytes(_windows(scan))
    assert settled is not None
    assert 20 * MIB <= settled <= 32 * MIB  # its 24 MiB, and the kernel's few hot pages
