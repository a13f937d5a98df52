"""A controller killed mid-evacuation, against a real lab: `host maintenance enter` is killed
(SIGKILL) while a move is in flight; running it again resumes the same job, settles the move
its controller left as `reconcile` does, moves what is left, and ends with one running,
verified copy of every VM and the host in maintenance, empty. Resuming an unknown job, a job
that ended, or one whose controller is alive is refused with nothing moved. Bringing the VMs
back, killed too, is finished by `job resume`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from labcli import Lab

from vmferry.controller.inventory import Inventory
from vmferry.controller.jobs import JobStore
from vmferry.qemu.process import is_qemu_pid

pytestmark = pytest.mark.qemu

SMALL = "dirty:rate=2M,size=32M,pattern=random,mode=paced"
GUESTS = ("r1", "r2")


def _live_qemus(lab_dir: Path) -> Counter[str]:
    """How many live QEMUs each VM has, over every host of the lab."""
    found: Counter[str] = Counter()
    for pid_file in lab_dir.glob("hosts/*/vms/*/qemu.pid"):
        text = pid_file.read_text().strip()
        if text and is_qemu_pid(int(text)):
            found[pid_file.parent.name] += 1
    return found


def _start(lab_dir: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "vmferry.cli.main", *args, "--bandwidth", "200", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "VMFERRY_LAB_DIR": str(lab_dir)},
    )


def _kill_once(command: subprocess.Popen[str], started: Callable[[], bool]) -> None:
    """SIGKILL ``command`` as soon as ``started()``."""
    try:
        deadline = time.monotonic() + 90
        while not started():
            assert command.poll() is None, command.communicate()
            assert time.monotonic() < deadline, "no move started"
            time.sleep(0.1)
    finally:
        command.kill()  # no clean-up of any kind
        command.communicate()  # reaped: its pid is dead, not a zombie


def _assert_one_verified_copy_each(lab: Lab, lab_dir: Path, host: str) -> None:
    assert [(v["name"], v["host"], v["state"]) for v in lab.vms()] == [
        (name, host, "running") for name in GUESTS
    ]
    assert _live_qemus(lab_dir) == Counter(GUESTS)
    for name in GUESTS:
        assert lab.ok("verify", name)["ok"] is True


def test_a_killed_maintenance_job_resumes_to_one_verified_copy_each(lab_dir: Path) -> None:
    lab = Lab(lab_dir)
    lab.ok("lab", "up", "--hosts", "2", "--memory-per-host", "1G")
    for name in GUESTS:
        lab.ok("vm", "create", name, "--host", "host-1", "--memory", "128M", "--workload", SMALL)
    # Killed once a move is in flight (a VM migrating).
    enter = _start(lab_dir, "host", "maintenance", "enter", "host-1")
    _kill_once(enter, lambda: any(v["state"] == "migrating" for v in lab.vms()))
    [job] = lab.ok("job", "list")
    assert job["state"] == "interrupted"
    assert "running" in {m["state"] for m in job["moves"]}

    # Bad input: refused (exit 2), the interrupted job left as it was (its migrations in
    # flight go on meanwhile: the agents' copies change on their own, not by these).
    store = JobStore(Inventory.load(lab_dir).history_db)
    before = store.job(job["job"])
    lab.refused("job", "resume", "99", message="no job 99")
    alive = store.begin("evacuate", "x-1", [("x", "x-1", "x-2")], {})
    lab.refused("job", "resume", str(alive), message=f"job {alive} is running: its controller")
    store.end(alive, "failed")
    lab.refused("job", "resume", str(alive), message=f"job {alive} is failed: only an interrupted")
    assert store.job(job["job"]) == before

    # The same command again resumes the job: settled, the rest moved, the host marked.
    again = lab.run("host", "maintenance", "enter", "host-1", "--bandwidth", "200", "--json")
    assert again.returncode == 0, again.stderr
    assert f"job {job['job']} (maintenance-enter host-1) was interrupted" in again.stderr
    report = lab.ok("job", "show", str(job["job"]))
    assert report["state"] == "completed"
    assert {m["vm"]: m["state"] for m in report["moves"]} == dict.fromkeys(GUESTS, "completed")
    resumed = report["report"]
    assert resumed["resumed"] is True
    assert resumed["host_state"] == "maintenance"
    assert resumed["left_on_host"] == []
    assert any(s["reconcile"] is not None for s in resumed["settled"]), resumed["settled"]
    assert [j["job"] for j in lab.ok("job", "list")] == [alive, job["job"]]  # no new job

    # One running, verified copy of every VM, off the host, which is in maintenance.
    _assert_one_verified_copy_each(lab, lab_dir, "host-2")
    hosts = {r["host"]: r for r in lab.ok("host", "list")}
    assert (hosts["host-1"]["state"], hosts["host-1"]["vms"]) == ("maintenance", [])
    lab.refused("job", "resume", str(job["job"]), message=f"job {job['job']} is completed: only an")

    # Bringing them back, killed while host-1 starts a destination QEMU (listed "stopped"
    # until it is up: the launch goes on without its controller), or once a move is in
    # flight if that was missed: `job resume` finishes it with the job's own options.
    back = _start(lab_dir, "host", "maintenance", "exit", "host-1", "--bring-back")
    _kill_once(back, lambda: any(v["state"] in ("stopped", "migrating") for v in lab.vms()))
    [bring] = store.jobs(kind="bring-back")
    done = lab.ok("job", "resume", str(bring.id))
    assert (done["job"], done["kind"], done["state"]) == (bring.id, "bring-back", "completed")
    assert {m["vm"]: m["state"] for m in lab.ok("job", "show", str(bring.id))["moves"]} == (
        dict.fromkeys(GUESTS, "completed")
    )
    _assert_one_verified_copy_each(lab, lab_dir, "host-1")
