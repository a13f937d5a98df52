"""Driving the ``vmferry`` CLI against a lab directory from tests (shared by the CLI tests).

The ``lab_dir`` fixture is registered for every integration test by ``conftest.py``.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from clirunner import vmferry

from vmferry.lab.cluster import lab_down

__all__ = ["SPAWNED", "Lab", "lab_dir"]


class Lab:
    """Runs ``vmferry`` commands against one lab directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``vmferry ARGS`` in this process (see :mod:`clirunner`)."""
        return vmferry(args, self.directory)

    def ok(self, *args: str) -> Any:
        """Run with --json, expect exit 0, return the parsed output."""
        result = self.run(*args, "--json")
        assert result.returncode == 0, f"{args}: {result.stderr}"
        return json.loads(result.stdout)

    def refused(self, *args: str, message: str) -> None:
        result = self.run(*args)
        assert result.returncode == 2, f"{args}: rc={result.returncode} {result.stderr}"
        # (the terminal may wrap a long message: compare words, not line breaks)
        assert message in " ".join(result.stderr.split()), result.stderr
        assert "Traceback" not in result.stderr

    def vms(self) -> list[dict[str, Any]]:
        listing = self.ok("vm", "list")
        assert listing["unreachable"] == []
        return sorted(listing["vms"], key=lambda v: v["name"])


SPAWNED: list[subprocess.Popen[bytes]] = []


@pytest.fixture
def lab_dir() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="vmf-"))
    try:
        yield directory
    finally:
        report = asyncio.run(lab_down(directory))
        for process in SPAWNED:  # agents a test started itself; lab down has ended them
            process.wait(timeout=30)
        SPAWNED.clear()
        assert not directory.exists(), report
