"""Pre-flight measurements a controller asks for before it plans a move: the guest's profile
(memory, dirty rate, vCPU load, disk) and the link's bandwidth (a sink here, a probe there)."""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from vmferry.agent.api import GuestMeasurement, NotFound
from vmferry.agent.bandwidth import BandwidthSink, ProbeResult, SinkResult, send_probe
from vmferry.agent.digest import GuestRamNotFound, find_ram_fd
from vmferry.agent.slots import Slots
from vmferry.agent.store import VmStore
from vmferry.agent.vm import RunningVm
from vmferry.core.dirty_curve import DirtyCurve, fit, settled_bytes
from vmferry.core.errors import ConfigError
from vmferry.core.model import VmSpec
from vmferry.qemu.measure import MeasurementError, measure_disk_writes, measure_guest
from vmferry.qemu.qcow2 import allocated_bytes
from vmferry.qemu.ram_scan import scan_changes
from vmferry.qemu.vcpu import vcpu_busy_fraction

__all__ = ["Preflight"]

logger = logging.getLogger(__name__)


async def _none() -> None:
    return None


def _ram_file(pid: int | None, memory_bytes: int) -> Path | None:
    """The guest's RAM memfd, read directly (no QEMU command stalls the guest); None where it
    cannot be found (then QEMU dumps the sample with ``pmemsave``)."""
    if pid is None:
        return None
    try:
        return find_ram_fd(pid, memory_bytes)
    except GuestRamNotFound as err:
        logger.info("measure.ram_file %s: %s; sampling through QEMU", pid, err)
        return None


def _resident_bytes(ram_file: Path | None) -> int | None:
    """What the host has allocated of the guest's RAM memfd (its blocks: a page never written
    is a hole); None where it cannot be read."""
    if ram_file is None:
        return None
    try:
        return os.stat(ram_file).st_blocks * 512
    except OSError as err:
        logger.info("measure.resident %s: %s", ram_file, err)
        return None


@dataclass(frozen=True, slots=True)
class _Scanned:
    """What a scan of the guest's RAM tells (``qemu.ram_scan``): its short-window dirty curve,
    how well the pages it changed compress, and the set its writes settle into, if seen."""

    curve: DirtyCurve
    changed_ratio: float | None
    settled_bytes: int | None


async def _scan(ram_file: Path | None, ram_bytes: int) -> _Scanned | None:
    """None where the RAM cannot be read (QEMU's ``calc-dirty-rate`` is then all there is)."""
    if ram_file is None:
        return None
    try:
        scan = await scan_changes(ram_file, ram_bytes=ram_bytes)
    except (MeasurementError, ConfigError) as err:
        logger.info("measure.scan %s: %s", ram_file, err)
        return None
    curve = fit(
        short_s=scan.short_s,
        short_bytes=scan.short_bytes,
        long_s=scan.long_s,
        long_bytes=scan.long_bytes,
    )
    settled = None
    if scan.far_s is not None and scan.far_bytes is not None:
        windows = (scan.short_s, scan.short_bytes), (scan.long_s, scan.long_bytes)
        settled = settled_bytes((*windows, (scan.far_s, scan.far_bytes)))
    logger.debug("measure.scan %s: %s -> %s, settles in %s", ram_file, scan, curve, settled)
    return _Scanned(curve, scan.changed_ratio, settled)


class Preflight:
    """Measurements of this host's guests and links."""

    def __init__(self, slots: Slots, store: VmStore, scratch_dir: Path | None) -> None:
        """``scratch_dir``: where QEMU may write memory samples when it dropped root (None:
        each VM's own directory)."""
        self.slots = slots
        self.store = store
        self.scratch_dir = scratch_dir
        self._sinks: dict[int, BandwidthSink] = {}

    async def measure(self, name: str) -> GuestMeasurement:
        """Profile VM ``name`` for a migration plan (about a second; the guest keeps running).

        Raises:
            NotFound, StateError: no running VM of that name.
            MeasurementError: QEMU's answers could not be used.
        """
        slot, vm = self.slots.running(name)
        async with slot.lock:
            pid = vm.process.pid
            busy_task = vcpu_busy_fraction(pid, slot.spec.vcpus) if pid is not None else _none()
            scratch = self.scratch_dir or self.store.directory(name)
            ram_file = _ram_file(pid, slot.spec.memory_bytes)
            profile, busy, disk, scanned = await asyncio.gather(
                measure_guest(vm.qmp, scratch, ram_file=ram_file),
                busy_task,
                self._measure_disk(slot.spec, vm),
                _scan(ram_file, slot.spec.memory_bytes),
            )
        allocated, write_bps = disk
        curve = None if scanned is None else scanned.curve
        return GuestMeasurement(
            ram_bytes=profile.ram_bytes,
            dirty_rate_bps=max(profile.dirty_rate_bps, 0 if curve is None else curve.rate_bps),
            hot_bytes=0 if curve is None else curve.hot_bytes,
            settled_bytes=None if scanned is None else scanned.settled_bytes,
            zero_fraction=profile.memory.zero_fraction,
            compress_ratio=profile.memory.compress_ratio,
            dirty_compress_ratio=None if scanned is None else scanned.changed_ratio,
            vcpu_busy=busy,
            elapsed_ms=profile.elapsed_ms,
            disk_allocated_bytes=allocated,
            disk_write_bps=write_bps,
            disk_shared=slot.spec.disk is not None and slot.spec.disk.storage == "shared",
            resident_bytes=_resident_bytes(ram_file),
        )

    async def _measure_disk(self, spec: VmSpec, vm: RunningVm) -> tuple[int, int]:
        """Allocated bytes of the VM's image and its guest's write rate (0, 0 without a disk)."""
        disk = self.store.disk_path(spec)
        if disk is None:
            return 0, 0
        write_bps = await measure_disk_writes(vm.qmp, window_s=1.0)
        return await allocated_bytes(disk), write_bps

    async def open_sink(self, address: str) -> int:
        """Listen for a bandwidth probe on ``address``; returns the port."""
        sink = BandwidthSink(address)
        port = await sink.start()
        self._sinks[port] = sink
        return port

    async def sink_result(self, port: int, timeout_s: float) -> SinkResult:
        """What the sink on ``port`` received (then it is closed).

        Raises:
            NotFound: no such sink.
            BandwidthProbeError: no complete probe arrived.
        """
        sink = self._sinks.pop(port, None)
        if sink is None:
            raise NotFound(f"no bandwidth sink on port {port}")
        try:
            return await sink.result(timeout_s)
        finally:
            await sink.close()

    @staticmethod
    async def probe(address: str, port: int, duration_ms: int) -> ProbeResult:
        """Stream incompressible bytes to another host's sink (from this host's network)."""
        return await send_probe(address, port, duration_ms=duration_ms)

    async def close(self) -> None:
        for sink in self._sinks.values():
            await sink.close()
        self._sinks.clear()
