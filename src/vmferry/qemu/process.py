"""Launching, watching and reaping one QEMU process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path

from vmferry.core.errors import QEMULaunchError

__all__ = ["QemuProcess", "is_qemu_pid", "process_uid", "tail_lines"]

logger = logging.getLogger(__name__)

_POLL_S = 0.02


def tail_lines(path: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of a log file, "" if it cannot be read."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state letter follows the parenthesised command name.
    return stat[stat.rindex(")") + 2] != "Z"


def process_uid(pid: int) -> int | None:
    """The real uid process ``pid`` runs as (``/proc/PID/status``), None if it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    return None


def is_qemu_pid(pid: int) -> bool:
    """True if ``pid`` is a live QEMU process (guards against PID reuse before a kill)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"qemu-system" in cmdline.split(b"\0", 1)[0] and _pid_alive(pid)


class QemuProcess:
    """One QEMU child process, its log and its QMP socket path.

    The process is started with :meth:`start` and must be ended with :meth:`stop`, which
    always reaps it (also when cancelled).
    """

    def __init__(self, argv: list[str], log_path: Path, name: str) -> None:
        self.argv = argv
        self.log_path = log_path
        self.logger = logger.getChild(name)
        self._proc: asyncio.subprocess.Process | None = None
        self._adopted_pid: int | None = None

    @classmethod
    def adopt(cls, pid: int, log_path: Path, name: str) -> QemuProcess:
        """Take over a QEMU started by an earlier agent (not our child: no exit status)."""
        process = cls([], log_path, name)
        process._adopted_pid = pid
        return process

    @property
    def pid(self) -> int | None:
        if self._adopted_pid is not None:
            return self._adopted_pid
        return None if self._proc is None else self._proc.pid

    @property
    def returncode(self) -> int | None:
        if self._adopted_pid is not None:
            return None if _pid_alive(self._adopted_pid) else -1
        return None if self._proc is None else self._proc.returncode

    @property
    def is_running(self) -> bool:
        if self._adopted_pid is not None:
            return _pid_alive(self._adopted_pid)
        return self._proc is not None and self._proc.returncode is None

    def log_tail(self) -> str:
        return tail_lines(self.log_path)

    async def start(self) -> None:
        """Start QEMU with stdout and stderr going to the log file.

        Raises:
            QEMULaunchError: if the binary cannot be executed.
        """
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.logger.debug("launch: %s", " ".join(self.argv))
        with self.log_path.open("ab") as log:
            try:
                self._proc = await asyncio.create_subprocess_exec(
                    *self.argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,  # a Ctrl-C in the CLI must not kill the guest
                )
            except OSError as err:
                raise QEMULaunchError(str(err), None, self.argv, "") from err
        self.logger.info("qemu.started pid=%s", self._proc.pid)

    async def wait_for_socket(self, path: Path, timeout_s: float) -> None:
        """Wait until QEMU has created ``path`` (its QMP socket), or died.

        Raises:
            QEMULaunchError: if QEMU exits first or the socket does not appear in time.
        """
        try:
            async with asyncio.timeout(timeout_s):
                while not path.exists():
                    if not self.is_running:
                        await self._reap()
                        raise QEMULaunchError(
                            "QEMU exited during start-up",
                            self.returncode,
                            self.argv,
                            self.log_tail(),
                        )
                    await asyncio.sleep(_POLL_S)
        except TimeoutError as err:
            raise QEMULaunchError(
                f"QEMU did not create {path} within {timeout_s:g} s",
                None,
                self.argv,
                self.log_tail(),
            ) from err

    async def wait(self, timeout_s: float) -> int | None:
        """Wait for the process to exit; return its status, or None if it still runs."""
        if self._proc is None:
            return None
        try:
            async with asyncio.timeout(timeout_s):
                return await self._proc.wait()
        except TimeoutError:
            return None

    async def _reap(self) -> None:
        if self._proc is not None:
            await self._proc.wait()

    def _kill(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._proc.pid, signal.SIGKILL)

    async def _stop_adopted(self, pid: int, grace_s: float) -> None:
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            if not _pid_alive(pid):
                break
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            # Not our child: no exit notification to wait on, so poll /proc.
            deadline = asyncio.get_running_loop().time() + wait_s
            while _pid_alive(pid) and asyncio.get_running_loop().time() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(_POLL_S)
        self.logger.info("qemu.stopped pid=%s (adopted)", pid)

    async def stop(self, grace_s: float = 3.0) -> None:
        """End QEMU: SIGTERM, then SIGKILL after ``grace_s``; always reaps.

        Safe to call more than once and on a process that already exited.
        """
        if self._adopted_pid is not None:
            await self._stop_adopted(self._adopted_pid, grace_s)
            return
        proc = self._proc
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), grace_s)
            except TimeoutError:
                self._kill()
                await proc.wait()
            except asyncio.CancelledError:
                # A cancelled caller must not leave a zombie or a live guest behind.
                self._kill()
                await proc.wait()
                raise
        self.logger.info("qemu.stopped pid=%s status=%s", proc.pid, proc.returncode)
