"""Running ``vmferry`` commands from tests: in this process where nothing kills the command.

A ``vmferry`` process pays ~1 s of interpreter start and imports before it does anything; a
test suite runs ~100 of them. :func:`vmferry` runs the command's real entry point
(``vmferry.cli.main:main``) in this process instead, with its stdout and stderr captured and
its exit status returned as a :class:`subprocess.CompletedProcess`, exactly what a child
process would have given. Commands a test kills, or that run while the test does other things,
stay processes (the tests start those themselves).

``lab up`` and ``lab restart`` stay processes too: they leave agents running after they exit,
and the agents' parent must be a process that ends with the command (asyncio would otherwise
hold on to the agents of a closed event loop in this one).
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from vmferry.cli.main import main

__all__ = ["vmferry"]

# stdout, stderr and the environment are the process's: one in-process command at a time.
_ONE_AT_A_TIME = threading.Lock()
# Commands that leave processes behind (detached agents).
_SPAWNING = (("lab", "up"), ("lab", "restart"))


@contextlib.contextmanager
def _lab_dir_env(lab_dir: Path | None) -> Iterator[None]:
    if lab_dir is None:
        yield
        return
    before = os.environ.get("VMFERRY_LAB_DIR")
    os.environ["VMFERRY_LAB_DIR"] = str(lab_dir)
    try:
        yield
    finally:
        if before is None:
            del os.environ["VMFERRY_LAB_DIR"]
        else:
            os.environ["VMFERRY_LAB_DIR"] = before


def _in_process(args: Sequence[str], lab_dir: Path | None) -> subprocess.CompletedProcess[str]:
    out, err = io.StringIO(), io.StringIO()
    with (
        _ONE_AT_A_TIME,
        _lab_dir_env(lab_dir),
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        try:
            code = main(list(args), stdout=out, stderr=err)
        except SystemExit as exit_:  # argparse's usage errors, --help
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    return subprocess.CompletedProcess(
        ["vmferry", *args], code, stdout=out.getvalue(), stderr=err.getvalue()
    )


def vmferry(
    args: Sequence[str],
    lab_dir: Path | None = None,
    *,
    timeout_s: float = 300,
    in_process: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run ``vmferry ARGS`` against ``lab_dir`` (``$VMFERRY_LAB_DIR``); never raises for a
    non-zero exit.

    Args:
        args: the command line after ``vmferry``.
        lab_dir: the lab directory (default: this process's ``$VMFERRY_LAB_DIR``).
        timeout_s: for a child process only (pytest's own timeout bounds an in-process run).
        in_process: call the entry point here (default) instead of starting ``vmferry``,
            except for the commands that leave agents behind.

    Raises:
        subprocess.TimeoutExpired: the child process outlived ``timeout_s``.
    """
    if in_process and (tuple(args[:2]) not in _SPAWNING or "--help" in args):
        return _in_process(args, lab_dir)
    env = dict(os.environ)
    if lab_dir is not None:
        env["VMFERRY_LAB_DIR"] = str(lab_dir)
    return subprocess.run(
        [sys.executable, "-m", "vmferry.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
        env=env,
    )
