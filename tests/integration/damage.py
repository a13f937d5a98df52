"""A damaged destination for handoff tests: a byte of its stopped copy of guest RAM flipped
behind QEMU's back, just before the agent hashes it for real (shared by the handoff tests)."""

from __future__ import annotations

import os
from collections.abc import Callable

from vmferry.agent.digest import find_ram_fd
from vmferry.agent.port import AgentPort
from vmferry.core.handoff import VerifyMode

__all__ = ["corrupting"]


def corrupting(agent: AgentPort, at: int, memory_bytes: int) -> Callable[..., object]:
    """``agent.handoff_digests`` that first flips the byte ``at`` of its copy of the guest's
    RAM (``memory_bytes`` large), then hashes it as it always does."""
    original = agent.handoff_digests

    async def digests(name: str, mode: VerifyMode, seed: int, timeout_s: float) -> object:
        pid = (await agent.get_vm(name)).pid
        assert pid is not None
        fd = os.open(find_ram_fd(pid, memory_bytes), os.O_RDWR)
        try:
            byte = os.pread(fd, 1, at)
            os.pwrite(fd, bytes([byte[0] ^ 0xFF]), at)
        finally:
            os.close(fd)
        return await original(name, mode, seed, timeout_s)

    return digests
