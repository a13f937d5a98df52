"""A subset of the fault matrix (``bench/faults.py``) on loopback labs: a fault lands while a busy
guest with a local disk is moved, and afterwards exactly one intact copy of it runs (a destination
QEMU killed during the disk copy: tests/integration/test_disk_migration.py).

Same machinery as the bench (``faultkit``): the real CLI, kill -9, a real full filesystem; the
outcome comes from ``/proc`` and QEMU, not from vmferry's own report.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import pytest
from faultkit import Cell, CellConfig, run_cell

pytestmark = pytest.mark.qemu

# Loopback: the migration stream (and the disk mirror) is capped instead of a shaped link, so
# pre-copy lasts seconds (~3 s of the 64 MiB the guest dirties at 300 Mbit/s: the faults land
# ~0.4 s into it); a 64 MiB disk keeps the mirror short at that rate.
# The harness's own commands run in this process; the migration (killed or not) is a process.
# No test here asserts a prediction: the migration skips the pre-flight (--no-plan).
CONFIG = CellConfig(
    netns=False,
    bandwidth_mbps=300,
    disk="64M",
    settle_timeout_s=40.0,
    cli_timeout_s=60.0,
    in_process_cli=True,
    plan=False,
)


# The harness fills the destination's filesystem as soon as it sees the disk copy; a 48 MiB disk
# region keeps that copy ~4 s long at 100 Mbit/s, so the fill lands mid-copy (a 16 MiB region
# could be copied before the filesystem was full: the move then completed, one run in many).
DISK_FULL_CONFIG = dataclasses.replace(
    CONFIG,
    bandwidth_mbps=100,
    workload="dirty:rate=4M,size=64M,pattern=random,mode=paced,disk-rate=1M,disk-size=48M",
)


def _explain(record: dict[str, Any]) -> str:
    keep = ("outcome", "notes", "exit", "report", "trace", "hosts", "verify", "reconcile", "error")
    return "\n".join(f"{key}: {record.get(key)}" for key in keep)


def _assert_one_intact_copy(record: dict[str, Any], where: str) -> None:
    assert record["injected"], _explain(record)
    assert record["outcome"] == "ok", _explain(record)
    assert record["ended_on"] == where, _explain(record)
    assert record["verified"] is True, _explain(record)


def test_source_agent_killed_during_precopy_and_restarted() -> None:
    record = run_cell(Cell("kill-src-agent", "precopy"), CONFIG)
    # Where it ends depends on whether QEMU finished the copy before anyone noticed; what
    # matters is one running, verified copy and nothing left paused.
    assert record["outcome"] == "ok", _explain(record)


def test_cli_killed_during_precopy() -> None:
    record = run_cell(Cell("kill-cli", "precopy"), CONFIG)
    assert record["outcome"] == "ok", _explain(record)


@pytest.mark.skipif(os.geteuid() != 0, reason="a loop filesystem needs root")
def test_destination_disk_fills_during_the_mirror() -> None:
    record = run_cell(Cell("disk-full", "precopy"), DISK_FULL_CONFIG)
    _assert_one_intact_copy(record, "host-1")
    assert record["exit"] == 1
    assert "disk" in (record["report"]["error"] or ""), _explain(record)
