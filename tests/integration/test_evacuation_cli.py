"""Maintenance and evacuation against a real lab of 3 hosts: placement of new VMs, a host
emptied by one scheduled job of real moves (every VM verified elsewhere), marked in
maintenance only once empty, its VMs brought back, and bad input refused with nothing moved.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from labcli import Lab

from vmferry.controller.inventory import Inventory
from vmferry.controller.jobs import JobStore

pytestmark = pytest.mark.qemu

SMALL = "dirty:rate=2M,size=32M,pattern=random,mode=paced"
GUESTS = ("e1", "e2", "e3", "e4")  # a host of 4 VMs, as the issue asks


def _where(lab: Lab) -> dict[str, str]:
    return {v["name"]: v["host"] for v in lab.vms() if v["state"] == "running"}


def _assert_moved_verified(report: dict[str, Any], destinations: set[str]) -> None:
    moves = report["moves"]
    assert isinstance(moves, list)
    assert sorted(m["vm"] for m in moves) == list(GUESTS)
    for move in moves:
        migration = move["report"]
        assert migration["status"] == "completed", migration["error"]
        assert migration["integrity"]["ok"] is True
        assert migration["running_on"] in destinations
        assert move["predicted"]["end_s"] > 0
    assert report["makespan_s"] > 0
    assert report["predicted_makespan_s"] > 0


def test_maintenance_empties_a_host_then_brings_its_vms_back(lab_dir: Path) -> None:
    lab = Lab(lab_dir)
    lab.ok("lab", "up", "--hosts", "3", "--memory-per-host", "1G")
    for name in GUESTS:
        lab.ok("vm", "create", name, "--host", "host-1", "--memory", "128M", "--workload", SMALL)
    # Placement: a new VM goes where most memory is free (not host-1), and says why.
    choice = lab.ok("vm", "create", "p1", "--memory", "256M", "--dry-run")
    assert choice["host"] in ("host-2", "host-3")
    assert "most free memory" in choice["reason"]
    lab.refused("vm", "create", "p1", "--memory", "2G", message="no host has room: the most free")

    # Bad input: refused with exit 2, nothing moved.
    before = _where(lab)
    lab.refused("host", "evacuate", "host-9", message="unknown host 'host-9'")
    lab.refused("host", "evacuate", "host-1", "--to", "host-1", message="the host being emptied")
    lab.refused(
        "host", "evacuate", "host-1", "--deadline", "0.05", message="the best schedule is predicted"
    )
    store = JobStore(Inventory.load(lab_dir).history_db)
    held = store.begin("evacuate", "host-2", [("x", "host-2", "host-3")], {})
    lab.refused("host", "evacuate", "host-1", message=f"job {held} (evacuate) is running on host-2")
    store.end(held, "failed")
    plan = lab.ok("host", "evacuate", "host-1", "--dry-run", "--bandwidth", "200")
    assert sorted(m["vm"] for m in plan["moves"]) == list(GUESTS)
    assert plan["refused"] == []
    assert _where(lab) == before

    # Enter: the host is "entering" while its VMs move, "maintenance" once it is empty.
    env = {**os.environ, "VMFERRY_LAB_DIR": str(lab_dir)}
    enter = subprocess.Popen(
        [sys.executable, "-m", "vmferry.cli.main", "host", "maintenance", "enter", "host-1",
         "--bandwidth", "200", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    seen = set()
    while enter.poll() is None:
        rows = {r["host"]: r for r in lab.ok("host", "list")}
        seen.add((rows["host-1"]["state"], bool(rows["host-1"]["vms"])))
        time.sleep(0.5)  # each look is a CLI process: CPU the other tests' guests need
    out, err = enter.communicate()
    assert enter.returncode == 0, err
    assert ("maintenance", True) not in seen  # never "in maintenance" with VMs on it
    assert ("entering", True) in seen
    report = json.loads(out)
    _assert_moved_verified(report, {"host-2", "host-3"})
    assert report["host_state"] == "maintenance"
    assert report["left_on_host"] == []
    assert set(_where(lab).values()) <= {"host-2", "host-3"}
    assert "host-1 is in maintenance" in err

    # No new VM goes to a host in maintenance.
    choice = lab.ok("vm", "create", "p1", "--memory", "256M", "--dry-run")
    assert choice["host"] != "host-1"
    assert any(h["host"] == "host-1" and "maintenance" in h["why_not"] for h in choice["hosts"])
    lab.refused("vm", "create", "p1", "--host", "host-1", message="host-1 is in maintenance")

    # Exit with --bring-back: the VMs the job moved off go back, verified.
    back = lab.ok("host", "maintenance", "exit", "host-1", "--bring-back", "--bandwidth", "200")
    _assert_moved_verified(back, {"host-1"})
    assert back["kind"] == "bring-back"
    assert back["host_state"] == "active"
    assert _where(lab) == dict.fromkeys(GUESTS, "host-1")
    lab.refused("host", "maintenance", "exit", "host-1", message="host-1 is not in maintenance")
