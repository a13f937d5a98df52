"""``vmferry balance`` against a real lab of 2 hosts: a dry run that changes nothing, a balance
that moves a VM (verified) and narrows the spread of host load, the cool-down that keeps the
moved VM where it is when the load shifts back, and bad input refused with nothing moved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from labcli import Lab

from vmferry.controller.inventory import Inventory
from vmferry.controller.jobs import JobStore

pytestmark = pytest.mark.qemu

SMALL = "dirty:rate=2M,size=32M,pattern=random,mode=paced"


def _where(lab: Lab) -> dict[str, str]:
    return {v["name"]: v["host"] for v in lab.vms() if v["state"] == "running"}


def _moves(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(m["vm"], m["source"], m["destination"]) for m in report["moves"]]


def test_balance_moves_a_vm_then_leaves_it_in_its_cool_down(lab_dir: Path) -> None:
    lab = Lab(lab_dir)
    lab.ok("lab", "up", "--hosts", "2", "--memory-per-host", "512M")
    for name in ("a", "b"):
        lab.ok("vm", "create", name, "--host", "host-1", "--memory", "128M", "--workload", SMALL)
    before = _where(lab)

    # Bad input: refused with exit 2, nothing moved.
    positive = "must be a positive integer"
    lab.refused("balance", "--max-moves", "0", message=f"--max-moves {positive}")
    lab.refused("balance", "--max-moves", "-2", message=f"--max-moves {positive}")
    lab.refused("balance", "--max-outbound", "0", message=f"--max-outbound {positive}")
    lab.refused("balance", "--max-inbound", "two", message="invalid int value: 'two'")
    lab.refused("balance", "--cool-down", "-5", message="--cool-down must be")
    lab.refused("host", "evacuate", "host-1", "--max-inbound", "-1", message=positive)
    lab.refused("host", "maintenance", "enter", "host-1", "--max-outbound", "0", message=positive)

    # A dry run proposes a move off the loaded host, predicts the spread after it, moves nothing.
    dry = lab.ok("balance", "--dry-run")
    assert dry["dry_run"] is True
    assert [(s, d) for _, s, d in _moves(dry)] == [("host-1", "host-2")]
    planned = dry["balance"]
    assert planned["spread_before"] >= 0.45  # 256 MiB of 512 on host-1, nothing on host-2
    assert planned["spread_after"] < 0.1
    assert [h["host"] for h in planned["hosts"]] == ["host-1", "host-2"]
    assert planned["steps"][0]["cost_s"] > 0
    assert dry["predicted"]["makespan_s"] > 0
    assert _where(lab) == before

    # The balance: one move, verified, the spread narrower; per-host limits honoured.
    done = lab.ok("balance", "--max-outbound", "1", "--max-inbound", "1")
    assert done["kind"] == "balance"
    assert done["state"] == "completed"
    [(moved, _, _)] = _moves(done)
    report = done["moves"][0]["report"]
    assert report["status"] == "completed", report["error"]
    assert report["integrity"]["ok"] is True
    assert report["running_on"] == "host-2"
    assert done["makespan_s"] > 0
    assert done["balance"]["spread_observed_after"] < done["balance"]["spread_before"] - 0.3
    assert _where(lab)[moved] == "host-2"
    record = JobStore(Inventory.load(lab_dir).history_db).job(done["job"])
    assert (record.kind, record.host, record.state) == ("balance", "cluster", "completed")
    assert record.plan["limits"] == {"max_outbound": 1, "max_inbound": 1}

    # The load shifts: a bigger VM starts beside the moved one. Moving it back would even the
    # hosts out, but it moved a moment ago: nothing moves, and the report says why.
    lab.ok("vm", "create", "z", "--host", "host-2", "--memory", "256M")
    held = lab.ok("balance")
    assert held["job"] is None
    assert held["moves"] == []
    assert held["balance"]["stopped"] == "cool-down"
    assert held["balance"]["held_back"] == [moved]
    assert [c["vm"] for c in held["balance"]["cooling"]] == [moved]
    # Without the cool-down the same cluster would send it straight back.
    flap = lab.ok("balance", "--dry-run", "--cool-down", "0")
    assert _moves(flap) == [(moved, "host-2", "host-1")]
    assert _where(lab) == {**before, moved: "host-2", "z": "host-2"}
