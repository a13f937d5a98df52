"""How busy a guest's vCPUs are, from /proc: tells a CPU-bound guest from a paced one.

A guest that dirties memory as fast as its vCPU runs slows down when QEMU throttles the vCPU
(auto-converge helps); a guest paced by its own clock does not. QEMU names its vCPU threads
``CPU <n>/TCG`` or ``CPU <n>/KVM`` (with ``-name …,debug-threads=on``).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

__all__ = ["vcpu_busy_fraction"]

_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def _vcpu_ticks(pid: int) -> int | None:
    """Summed user+system clock ticks of the vCPU threads of ``pid``; None if none found."""
    total = 0
    found = False
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return None
    for task in tasks:
        try:
            if not (task / "comm").read_text().startswith("CPU "):
                continue
            stat = (task / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
        found = True
    return total if found else None


async def vcpu_busy_fraction(pid: int, vcpus: int, interval_s: float = 1.0) -> float | None:
    """Share of the interval the guest's vCPU threads were running (0..1); None if unknown."""
    before = _vcpu_ticks(pid)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.sleep(interval_s)
    after = _vcpu_ticks(pid)
    elapsed_s = loop.time() - started
    if before is None or after is None or elapsed_s <= 0:
        return None
    busy_s = (after - before) / _TICKS_PER_S
    return max(0.0, min(1.0, busy_s / (elapsed_s * max(vcpus, 1))))
