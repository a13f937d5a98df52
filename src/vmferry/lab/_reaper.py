"""Finding and ending the processes a lab left behind: agents and their QEMUs, by PID files and
/proc, with pidfds so that a recycled PID is never signalled."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from collections.abc import Callable, Iterable
from pathlib import Path

from vmferry.controller.inventory import Inventory
from vmferry.core.errors import FerryError

logger = logging.getLogger(__name__)

TERM_GRACE_S = 10.0
KILL_GRACE_S = 5.0


def read_ready(path: Path) -> tuple[str, int] | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None  # the agent writes atomically, but be lenient with a torn read
    if not isinstance(data, dict):
        return None
    url, pid = data.get("url"), data.get("pid")
    if not isinstance(url, str) or not isinstance(pid, int):
        return None
    return url, pid


def read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and int(text) > 1 else None


def agent_pids(state_dirs: Iterable[Path], inventory: Inventory | None) -> set[int]:
    pids = {h.pid for h in inventory.hosts if h.pid} if inventory else set()
    for state_dir in state_dirs:
        ready = read_ready(state_dir / "ready.json")
        if ready:
            pids.add(ready[1])
        spawned = read_pid(state_dir / "agent.pid")
        if spawned:
            pids.add(spawned)
    return pids


def qemu_pids(state_dirs: Iterable[Path]) -> set[int]:
    """PIDs from every ``qemu.pid`` under the state dirs (``vms/<vm>/`` and the accel probe's)."""
    pids: set[int] = set()
    for state_dir in state_dirs:
        for pid_file in state_dir.rglob("qemu.pid"):
            pid = read_pid(pid_file)
            if pid:
                pids.add(pid)
    return pids


def qemu_children(parents: set[int]) -> set[int]:
    if not parents:
        return set()
    found: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        # Fields after "(comm)": state, ppid, ...; comm itself may contain spaces and parens.
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and int(fields[1]) in parents and is_qemu(int(entry.name)):
            found.add(int(entry.name))
    return found


def cmdline(pid: int) -> list[str]:
    """The process's argv; empty if it is gone or a zombie."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [arg.decode(errors="replace") for arg in raw.split(b"\0") if arg]


def is_agent(pid: int) -> bool:
    return any("vmferry" in arg for arg in cmdline(pid))


def is_qemu(pid: int) -> bool:
    argv = cmdline(pid)
    return bool(argv) and os.path.basename(argv[0]).startswith("qemu-system")


async def stop_pids(pids: Iterable[int], is_ours: Callable[[int], bool]) -> int:
    """SIGTERM the processes that are ours, SIGKILL those still there after a grace period.

    Signals go through pidfds opened *before* the ownership check, so a PID reused after the
    check cannot be hit. Returns how many were signalled.
    """
    pidfds: dict[int, int] = {}
    for pid in sorted(pids):
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            continue  # already gone
        if is_ours(pid):
            pidfds[pid] = pidfd
        else:
            os.close(pidfd)
    try:
        for pid, pidfd in pidfds.items():
            logger.debug("SIGTERM pid=%d %s", pid, cmdline(pid)[:3])
            signal_pidfd(pidfd, signal.SIGTERM)
        left = await wait_exited(pidfds, TERM_GRACE_S)
        for pid in left:
            logger.warning("pid %d ignored SIGTERM for %g s; SIGKILL", pid, TERM_GRACE_S)
            signal_pidfd(pidfds[pid], signal.SIGKILL)
        left = await wait_exited({pid: pidfds[pid] for pid in left}, KILL_GRACE_S)
        if left:
            raise FerryError(f"processes {sorted(left)} survived SIGKILL for {KILL_GRACE_S:g} s")
    finally:
        for pidfd in pidfds.values():
            os.close(pidfd)
    return len(pidfds)


def signal_pidfd(pidfd: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(pidfd, sig)


async def wait_exited(pidfds: dict[int, int], timeout_s: float) -> set[int]:
    """Wait until each pidfd reports its process exited; return the PIDs still running."""
    loop = asyncio.get_running_loop()
    left = set(pidfds)
    if not left:
        return left
    done = asyncio.Event()

    def exited(pid: int) -> None:
        loop.remove_reader(pidfds[pid])
        left.discard(pid)
        if not left:
            done.set()

    for pid, pidfd in pidfds.items():
        loop.add_reader(pidfd, exited, pid)
    try:
        async with asyncio.timeout(timeout_s):
            await done.wait()
    except TimeoutError:
        pass
    finally:
        for pid in left:
            loop.remove_reader(pidfds[pid])
    return set(left)
