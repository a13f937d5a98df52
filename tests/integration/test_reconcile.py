"""Crashes in the middle of a migration, with real guests: a killed controller followed by
`vmferry reconcile`, a destination agent killed and restarted — each ends with exactly one
running, intact VM (a killed source agent: tests/integration/test_faults.py)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from labcli import Lab

from vmferry.controller.cluster import Cluster
from vmferry.controller.inventory import Inventory

# Pre-copy at 16 Mbit/s of a 256 MiB guest dirtying 8 MiB/s lasts well over 10 s.
DIRTY = "dirty:rate=8M,size=64M,pattern=random,mode=paced"
SLOW = ("--strategy", "precopy", "--bandwidth", "16")


def _wait_for(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _migrate_in_background(lab_dir: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "vmferry.cli.main", "migrate", "m1", "--to", "host-2", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "VMFERRY_LAB_DIR": str(lab_dir)},
    )


def _agent_pid(lab_dir: Path, host: str) -> int:
    return int((lab_dir / "hosts" / host / "agent.pid").read_text())


def _in_precopy(lab_dir: Path) -> bool:
    return (lab_dir / "hosts" / "host-2" / "vms" / "m1" / "qemu.pid").exists()


async def _set_cap(lab_dir: Path, source: str, vm: str, mbps: int) -> None:
    """Change a running migration's cap through its source agent (as a job's dispatcher does)."""
    async with Cluster(Inventory.load(lab_dir)) as cluster:
        await cluster.client(source).set_migration_cap(vm, mbps * 125_000)


def _placement(lab: Lab) -> list[tuple[str, str, str]]:
    return [(v["name"], v["host"], v["state"]) for v in lab.vms()]


def _finish(process: subprocess.Popen[str], timeout_s: float = 180) -> tuple[int, Any, str]:
    try:
        out, err = process.communicate(timeout=timeout_s)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return process.returncode, json.loads(out) if out.strip() else None, err


def test_reconcile_finishes_a_migration_whose_controller_was_killed(lab_dir: Path) -> None:
    """The controller dies during pre-copy; the agents complete the migration on their own
    but nobody finishes it (source paused for good, destination not confirmed).
    `vmferry reconcile` finishes it: one copy, on host-2, verified."""
    lab = Lab(lab_dir)
    lab.ok("lab", "up", "--hosts", "2")
    lab.ok("vm", "create", "m1", "--host", "host-1", "--memory", "256M", "--workload", DIRTY)
    migrating = _migrate_in_background(
        lab_dir, "--strategy", "precopy", "--bandwidth", "200", "--no-plan"
    )
    try:
        _wait_for(lambda: ("m1", "host-1", "migrating") in _placement(lab), 60, "pre-copy")
        migrating.kill()  # SIGKILL: no clean-up of any kind
        migrating.communicate()
    finally:
        if migrating.poll() is None:
            migrating.kill()
            migrating.communicate()
    _wait_for(lambda: ("m1", "host-1", "migrated") in _placement(lab), 120, "the migration's end")
    assert ("m1", "host-2", "incoming") in _placement(lab)
    [result] = lab.ok("reconcile")
    assert result["verdict"] == "settled", result
    assert result["running_on"] == "host-2"
    assert result["integrity"]["ok"] is True
    # The destination was held unrun for the handoff: its copy is compared before it runs.
    assert result["done"] == [
        "compared the copies: verified",
        "finish on host-2",
        "handoff on host-1",
    ]
    assert _placement(lab) == [("m1", "host-2", "running")]
    assert lab.ok("verify", "m1")["ok"] is True
    assert lab.ok("reconcile")[0]["verdict"] == "ok"


def test_destination_agent_restarted_mid_migration_does_not_stop_it(lab_dir: Path) -> None:
    """The destination agent dies during pre-copy and comes back: the incoming QEMU kept
    receiving, the new agent keeps it incoming, and the controller finishes the move."""
    lab = Lab(lab_dir)
    lab.ok("lab", "up", "--hosts", "2")
    lab.ok("vm", "create", "m1", "--host", "host-1", "--memory", "256M", "--workload", DIRTY)
    # Slower than the guest dirties until the agent is back, whatever the machine's load (at
    # a fixed 200 Mbit/s a loaded run's restart outlasted the move); then fast.
    migrating = _migrate_in_background(lab_dir, *SLOW, "--json", "--no-plan")
    try:
        _wait_for(lambda: ("m1", "host-1", "migrating") in _placement(lab), 60, "pre-copy")
        os.kill(_agent_pid(lab_dir, "host-2"), signal.SIGKILL)
        time.sleep(1.0)
        lab.ok("lab", "restart", "host-2")
        assert migrating.poll() is None, "the move ended before the agent came back"
        asyncio.run(_set_cap(lab_dir, "host-1", "m1", 200))
        code, report, err = _finish(migrating)
    finally:
        if migrating.poll() is None:
            migrating.kill()
            migrating.communicate()
    assert code == 0, err
    assert report["status"] == "completed", report
    assert report["integrity"]["ok"] is True
    assert _placement(lab) == [("m1", "host-2", "running")]
