"""Running the host tools that build guest images (apt, mmdebstrap, mke2fs, grub-mkimage,
qemu-img): every failure, a missing tool or a timeout becomes an :class:`ImageBuildError` with
the tool's last lines of output."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Sequence

from vmferry.guest.modules import ImageBuildError

__all__ = ["run_logged", "run_tool"]

logger = logging.getLogger(__name__)
logger.addHandler(logging.NullHandler())

TOOL_TIMEOUT_S = 600.0
LONG_TOOL_TIMEOUT_S = 1800.0
_PROGRESS_PREFIXES = ("I: ", "W: ", "E: ")
_STOP_TIMEOUT_S = 30.0
_PR_SET_PDEATHSIG = 1


def run_tool(argv: Sequence[str], *, what: str, env: dict[str, str] | None = None) -> str:
    """Run a tool to its end; return its stdout followed by its stderr.

    Args:
        argv: the command.
        what: the step, for the error message (e.g. "writing the root filesystem").
        env: the environment; default the caller's.

    Raises:
        ImageBuildError: the tool is missing, fails, or runs longer than ``TOOL_TIMEOUT_S``.
    """
    logger.debug("running %s", argv)
    try:
        done = subprocess.run(
            list(argv), check=True, capture_output=True, text=True, env=env, timeout=TOOL_TIMEOUT_S
        )
    except FileNotFoundError as err:
        raise ImageBuildError(f"{what}: {argv[0]} not found") from err
    except subprocess.TimeoutExpired as err:
        raise ImageBuildError(f"{what}: {argv[0]} took longer than {TOOL_TIMEOUT_S:g} s") from err
    except subprocess.CalledProcessError as err:
        tail = "\n".join((err.stderr or err.stdout or "").strip().splitlines()[-10:])
        raise ImageBuildError(
            f"{what}: {argv[0]} failed with status {err.returncode}\n{tail}"
        ) from err
    return done.stdout + done.stderr


def run_logged(argv: Sequence[str], *, what: str, say: Callable[[str], None]) -> None:
    """Run a long tool, passing its ``I:``/``W:``/``E:`` stderr lines to ``say`` as they come.

    Raises:
        ImageBuildError: the tool is missing, fails, or runs longer than
            ``LONG_TOOL_TIMEOUT_S`` (it is stopped then, as when the caller is interrupted).
    """
    logger.debug("running %s", argv)
    env = {**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
    try:
        proc = subprocess.Popen(
            list(argv),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            preexec_fn=_terminate_with_parent,
        )
    except FileNotFoundError as err:
        raise ImageBuildError(f"{what}: {argv[0]} not found") from err
    watchdog = threading.Timer(LONG_TOOL_TIMEOUT_S, proc.terminate)
    watchdog.start()
    tail: list[str] = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            tail = [*tail[-19:], line.rstrip()]
            if line.startswith(_PROGRESS_PREFIXES):
                say(f"{argv[0]}: {line.rstrip()}")
        status = proc.wait()
    finally:
        watchdog.cancel()
        _stop(proc)
    if status != 0:
        raise ImageBuildError(f"{what}: {argv[0]} failed with status {status}\n" + "\n".join(tail))


def _terminate_with_parent() -> None:
    """In the child before exec: SIGTERM it if the thread that started it dies.

    A killed builder would otherwise leave mmdebstrap building on, into a directory the next
    build removes; mmdebstrap stops its own children on SIGTERM.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _stop(proc: subprocess.Popen[str]) -> None:
    """End a tool still running: SIGTERM (mmdebstrap then stops its children), then SIGKILL."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
