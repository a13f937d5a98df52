"""Choosing the accelerator: KVM only if a guest actually boots under it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from pathlib import Path

from vmferry.agent.vm import launch
from vmferry.core.errors import FerryError
from vmferry.core.heartbeat import HeartbeatGaps
from vmferry.core.model import VmSpec
from vmferry.core.workload import parse_workload
from vmferry.guest.image import default_cache_dir
from vmferry.qemu.argv import Accel, BootFiles
from vmferry.qemu.binary import QemuBinary

__all__ = ["probe_accel"]

logger = logging.getLogger(__name__)

_KVM_PROBE_TIMEOUT_S = 12.0


async def probe_accel(qemu: QemuBinary, boot: BootFiles, workdir: Path) -> Accel:
    """Choose KVM only if a guest actually boots under it; else TCG.

    ``/dev/kvm`` can exist and still hang standard kernels (nested PVM hosts), so the device node
    proves nothing. The answer is cached per QEMU version and kernel. ``$VMFERRY_ACCEL`` overrides.
    """
    forced = os.environ.get("VMFERRY_ACCEL")
    if forced == "kvm":
        return "kvm"
    if forced == "tcg":
        return "tcg"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    cache = default_cache_dir().parent / "accel.json"
    key = f"{qemu.version_text}:{boot.kernel.name}:{boot.kernel.stat().st_size}"
    with contextlib.suppress(OSError, ValueError):
        cached = json.loads(cache.read_text())
        if cached.get("key") == key and cached.get("accel") in ("kvm", "tcg"):
            return "kvm" if cached["accel"] == "kvm" else "tcg"
    spec = VmSpec.build("kvm-probe", memory="256M", workload=parse_workload("idle:size=16M"))
    accel: Accel = "tcg"
    try:
        vm = await asyncio.wait_for(
            launch(
                qemu.path,
                spec,
                boot,
                workdir / "kvm-probe",
                role="probe",
                accel="kvm",
                heartbeats=HeartbeatGaps(),
            ),
            _KVM_PROBE_TIMEOUT_S,
        )
        await vm.stop()
        accel = "kvm"
    except (FerryError, TimeoutError) as err:
        logger.info("kvm probe failed (%s); using TCG", err)
    with contextlib.suppress(OSError):
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"key": key, "accel": accel}))
    return accel
