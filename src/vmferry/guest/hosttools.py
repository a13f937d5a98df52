"""Running the host tools that build guest images (apt, mmdebstrap, mke2fs, grub-mkimage,
qemu-img): every failure, a missing tool or a timeout becomes an :class:`ImageBuildError` with
the tool's last lines of output."""

from __future__ import annotations

import logging
import os
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
            ``LONG_TOOL_TIMEOUT_S`` (it is killed then).
    """
    logger.debug("running %s", argv)
    env = {**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
    try:
        proc = subprocess.Popen(
            list(argv), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env
        )
    except FileNotFoundError as err:
        raise ImageBuildError(f"{what}: {argv[0]} not found") from err
    watchdog = threading.Timer(LONG_TOOL_TIMEOUT_S, proc.kill)
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
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if status != 0:
        raise ImageBuildError(f"{what}: {argv[0]} failed with status {status}\n" + "\n".join(tail))
