"""A pid that no process has any more (a controller that died), for the tests of what
outlives its owner."""

from __future__ import annotations

import subprocess
import sys


def dead_pid() -> int:
    """The pid of a process that ran and was reaped (reused only once the kernel's pids wrapped
    around ``pid_max``, not within a test in practice)."""
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(done.stdout)
