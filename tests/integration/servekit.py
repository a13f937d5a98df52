"""Running ``vmferry serve`` as a process for a test: on a free loopback port, its lab from
``VMFERRY_LAB_DIR``, never a client of another service (``VMFERRY_URL``/``VMFERRY_TOKEN``
dropped); ready once its ready file says where it listens and where its tokens are; stopped
with SIGTERM, which it must end cleanly (exit 0)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["serving", "start_serve"]

_READY_TIMEOUT_S = 30.0


def start_serve(
    lab_dir: Path, work: Path, log: BinaryIO
) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """The service process and its ready file's content (``url``, ``tokens``, …)."""
    ready = work / "serve-ready.json"
    env = {**os.environ, "VMFERRY_LAB_DIR": str(lab_dir)}
    for name in ("VMFERRY_URL", "VMFERRY_TOKEN"):
        env.pop(name, None)
    process = subprocess.Popen(
        [sys.executable, "-m", "vmferry.cli.main", "serve", "--listen", "127.0.0.1:0",
         "--ready-file", str(ready)],
        env=env, stdout=subprocess.DEVNULL, stderr=log,
    )  # fmt: skip
    deadline = time.monotonic() + _READY_TIMEOUT_S
    while not ready.exists():
        assert process.poll() is None, "vmferry serve exited"
        assert time.monotonic() < deadline, "vmferry serve did not come up"
        time.sleep(0.1)
    return process, json.loads(ready.read_text())


@contextmanager
def serving(lab_dir: Path, work: Path) -> Iterator[dict[str, Any]]:
    """A service for the ``with`` block (its ready file's content), its log in
    ``work/serve.log``; afterwards, unless the block failed, it must have exited 0 on SIGTERM."""
    log_path = work / "serve.log"
    with log_path.open("wb") as log:
        process, ready = start_serve(lab_dir, work, log)
        try:
            yield ready
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                code = process.wait(30)
            finally:
                process.kill()
    assert code == 0, log_path.read_text()
