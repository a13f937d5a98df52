"""A damaged copy for handoff tests: a byte of a VM's guest RAM flipped behind QEMU's back
(shared by the handoff tests)."""

from __future__ import annotations

import os
from collections.abc import Callable

from vmferry.agent.digest import find_ram_fd
from vmferry.agent.port import AgentPort
from vmferry.core.handoff import VerifyMode

__all__ = ["corrupting", "damage_ram"]


async def damage_ram(agent: AgentPort, name: str, at: int, memory_bytes: int) -> None:
    """Flip the byte ``at`` of the guest RAM (``memory_bytes`` large) of ``agent``'s copy of
    VM ``name``, through QEMU's memfd."""
    pid = (await agent.get_vm(name)).pid
    assert pid is not None
    fd = os.open(find_ram_fd(pid, memory_bytes), os.O_RDWR)
    try:
        byte = os.pread(fd, 1, at)
        os.pwrite(fd, bytes([byte[0] ^ 0xFF]), at)
    finally:
        os.close(fd)


def corrupting(agent: AgentPort, at: int, memory_bytes: int) -> Callable[..., object]:
    """``agent.handoff_digests`` that first damages its copy (:func:`damage_ram`), then hashes
    it as it always does: a destination damaged after it received the guest."""
    original = agent.handoff_digests

    async def digests(name: str, mode: VerifyMode, seed: int, timeout_s: float) -> object:
        await damage_ram(agent, name, at, memory_bytes)
        return await original(name, mode, seed, timeout_s)

    return digests
