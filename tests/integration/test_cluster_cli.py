"""The vmferry CLI against a real lab: agents as processes, real guests, real migrations."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from labcli import SPAWNED, Lab

from vmferry.controller.inventory import Inventory
from vmferry.lab.cluster import lab_down

pytestmark = pytest.mark.qemu

BUSY = "dirty:rate=50M,size=256M,pattern=random,mode=paced"


def _qemu_pids() -> set[int]:
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv0 = (entry / "cmdline").read_bytes().split(b"\0", 1)[0]
            except OSError:
                continue
            if b"qemu-system" in argv0:
                pids.add(int(entry.name))
    return pids


def test_live_and_cold_migrations_through_the_cli(lab_dir: Path) -> None:
    lab = Lab(lab_dir)
    up = lab.ok("lab", "up", "--hosts", "2")
    assert [h["name"] for h in up["hosts"]] == ["host-1", "host-2"]
    created = lab.ok("vm", "create", "vm1", "--host", "host-1", "--workload", BUSY)
    assert created["state"] == "running"

    live = lab.ok("migrate", "vm1", "--to", "host-2")
    assert live["status"] == "completed", live["error"]
    assert live["strategy"] == "precopy"
    assert live["running_on"] == "host-2"
    assert live["integrity"] == {
        "ok": True,
        "pages_checked": 65536,
        "bad_pages": 0,
        "blocks_checked": 0,
        "bad_blocks": 0,
    }
    assert live["guest_downtime_ms"] is not None
    assert [(v["name"], v["host"], v["state"]) for v in lab.vms()] == [("vm1", "host-2", "running")]

    # At once back to host-1, where the handed-off QEMU may still be exiting.
    cold = lab.ok("migrate", "vm1", "--to", "host-1", "--strategy", "cold", "--no-plan")
    assert cold["status"] == "completed", cold["error"]
    # The handoff answered once the source QEMU was told to quit; it exited meanwhile.
    deadline = time.monotonic() + 5.0
    while created["pid"] in _qemu_pids() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert created["pid"] not in _qemu_pids(), "the handed-off source QEMU did not exit"
    assert cold["strategy"] == "cold"
    assert cold["integrity"]["ok"] is True
    assert cold["integrity"]["bad_pages"] == 0
    # A cold move pauses the guest for the whole copy, and the report says so.
    assert cold["downtime_ms"] >= live["downtime_ms"]
    assert cold["guest_downtime_ms"] >= cold["downtime_ms"] - 20

    verify = lab.ok("verify", "vm1")
    assert verify["ok"] is True
    assert verify["host"] == "host-1"
    history = lab.ok("history")
    assert [(h["source"], h["destination"], h["strategy"]) for h in history] == [
        ("host-1", "host-2", "precopy"),
        ("host-2", "host-1", "cold"),
    ]
    assert all(h["status"] == "completed" for h in history)


def test_agent_restart_keeps_its_vms(lab_dir: Path) -> None:
    lab = Lab(lab_dir)
    lab.ok("lab", "up", "--hosts", "2")
    created = lab.ok("vm", "create", "keeper", "--host", "host-1")
    inventory = Inventory.load(lab_dir)
    host = inventory.host("host-1")
    assert host.pid is not None

    os.kill(host.pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while Path(f"/proc/{host.pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{host.pid}").exists(), "agent did not exit"
    assert created["pid"] in _qemu_pids(), "the VM must outlive its agent"

    # Start host-1's agent again, exactly as the lab does, on the same state directory.
    state_dir = Path(host.state_dir)
    ready = state_dir / "ready.json"
    ready.unlink(missing_ok=True)
    address, port = host.url.removeprefix("https://").rsplit(":", 1)
    tls = lab_dir / "tls"
    with (state_dir / "agent.log").open("ab") as log:
        agent = subprocess.Popen(
            [
                sys.executable, "-m", "vmferry.cli.main", "agent",
                "--host", "host-1", "--listen", f"{address}:{port}",
                "--state-dir", str(state_dir), "--token-file", str(inventory.token_file),
                "--memory", "4G", "--migration-address", host.address,
                "--ready-file", str(ready),
                "--tls-cert", str(tls / "host-1.pem"), "--tls-key", str(tls / "host-1.key"),
            ],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
        )  # fmt: skip
    SPAWNED.append(agent)
    deadline = time.monotonic() + 60
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ready.exists(), (state_dir / "agent.log").read_text()[-2000:]

    listed = lab.vms()
    assert [(v["name"], v["host"], v["pid"]) for v in listed] == [
        ("keeper", "host-1", created["pid"])
    ]
    assert lab.ok("verify", "keeper")["ok"] is True
    moved = lab.ok("migrate", "keeper", "--to", "host-2")
    assert moved["status"] == "completed"
    assert moved["integrity"]["ok"] is True


def test_bad_input_is_refused_and_changes_nothing(lab_dir: Path) -> None:
    lab = Lab(lab_dir)
    lab.ok("lab", "up", "--hosts", "2", "--memory-per-host", "2G")
    lab.ok("vm", "create", "vm1", "--host", "host-1")
    before = lab.vms()
    history_before = lab.ok("history")

    lab.refused("migrate", "ghost", "--to", "host-2", message="unknown VM 'ghost'")
    lab.refused("migrate", "vm1", "--to", "host-9", message="unknown host 'host-9'")
    lab.refused("migrate", "vm1", "--to", "host-1", message="already runs on host-1")
    lab.refused("migrate", "vm1", "--to", "../x", message="invalid host name")
    lab.refused("vm", "create", "vm1", "--host", "host-2", message="already exists on host-1")
    lab.refused("vm", "create", "../x", "--host", "host-1", message="invalid VM name")
    lab.refused("vm", "create", "a/b", "--host", "host-1", message="invalid VM name")
    lab.refused("vm", "create", "vm2", "--host", "host-1", "--memory", "900T", message="memory")
    lab.refused("vm", "create", "vm2", "--host", "host-1", "--memory", "lots", message="bad size")
    lab.refused("vm", "create", "vm2", "--host", "host-1", "--memory", "4G", message="free")
    lab.refused("vm", "create", "vm2", "--host", "host-5", message="unknown host")
    lab.refused("vm", "create", "vm2", "--host", "host-1", "--workload", "x", message="workload")
    lab.refused("migrate", "vm1", "--to", "host-2", "--max-downtime", "0", message="downtime")
    lab.refused("migrate", "vm1", "--to", "host-2", "--strategy", "warp", message="invalid choice")

    # A wrong token is refused by the agents.
    token_file = lab_dir / "token"
    good = token_file.read_text()
    token_file.write_text("x" * 43 + "\n")
    try:
        lab.refused("vm", "delete", "vm1", message="refused our token")
    finally:
        token_file.write_text(good)

    assert lab.vms() == before
    assert lab.ok("history") == history_before


def test_every_strategy_moves_a_busy_guest_intact(lab_dir: Path) -> None:
    # One guest, moved back and forth once per strategy (a boot costs more than a move).
    lab = Lab(lab_dir)
    lab.ok("lab", "up", "--hosts", "2")
    workload = "dirty:rate=50M,size=128M,pattern=compressible,mode=paced"
    lab.ok("vm", "create", "vm1", "--host", "host-1", "--workload", workload)
    hosts = ["host-2", "host-1"]

    for index, strategy in enumerate(["multifd", "xbzrle", "auto-converge", "postcopy", "hybrid"]):
        destination = hosts[index % 2]
        # Hybrid switches to post-copy on the plan's prediction; the others need none.
        plan = [] if strategy == "hybrid" else ["--no-plan"]
        report = lab.ok("migrate", "vm1", "--to", destination, "--strategy", strategy, *plan)

        assert report["status"] == "completed", (strategy, report["error"])
        assert report["strategy"] == strategy
        assert report["integrity"]["ok"] is True
        assert report["integrity"]["pages_checked"] == 32768
        assert report["guest_alive"] is True
        assert lab.vms()[0]["host"] == destination


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
@pytest.mark.xdist_group("netns")  # namespaces are machine-wide: one netns lab at a time
# Known, not hidden: once in a clean clone's suite (1 Dec) the zeroing guest's first move
# converged before its third sync, with no rounds of rewrites to price (resent_zero_bps None):
# under the suite's load its writer had not rewritten its region yet. A second run must pass.
@pytest.mark.flaky(reruns=1)
def test_live_migration_over_a_shaped_netns_link(lab_dir: Path) -> None:
    # Namespaces are machine-wide: clear any orphaned by an earlier crashed lab (a no-op when
    # none are, and it never touches a network whose lab still runs).
    asyncio.run(lab_down(Path(tempfile.mkdtemp(prefix="vmf-"))))
    lab = Lab(lab_dir)
    up = lab.ok("lab", "up", "--hosts", "2", "--netns", "--link-mbps", "200")
    assert all(h["netns"] for h in up["hosts"])
    lab.ok(
        "vm", "create", "vm1", "--host", "host-1",
        "--workload", "dirty:rate=4M,size=128M,pattern=random,mode=paced",
    )  # fmt: skip

    report = lab.ok("migrate", "vm1", "--to", "host-2")

    assert report["status"] == "completed", report["error"]
    assert report["integrity"]["ok"] is True
    assert report["integrity"]["bad_pages"] == 0
    # 200 Mbit/s is 25 MB/s: the stream (128 MiB of random pages at least) cannot beat the link.
    assert report["transferred_bytes"] > 128 << 20
    rate_bps = report["transferred_bytes"] / (report["total_ms"] / 1000)
    assert rate_bps < 25e6 * 1.1, rate_bps
    assert lab.vms()[0]["host"] == "host-2"
    # The source agent kept the stream's unsent bytes small (the guest waits for them).
    agent_log = (lab_dir / "hosts" / "host-1" / "agent.log").read_text()
    assert "migration.unsent_limited" in agent_log, agent_log[-2000:]

    # A guest rewriting zero pages looks calm to the pre-flight's page sampling (contents do
    # not change), but QEMU's dirty log counts every write, each a whole page against its
    # threshold, while the stream carries a few bytes each: on its own QEMU never switches
    # (30 s, ~1,100 syncs, measured). vmferry tells QEMU what they cost once the rounds show
    # them (ZeroPricing): auto's pre-copy converges with one round of them pending.
    lab.ok(
        "vm", "create", "vm2", "--host", "host-1",
        "--workload", "dirty:size=64M,pattern=zero,mode=cpu",
    )  # fmt: skip
    goal = ["--max-downtime", "150", "--deadline", "60"]
    # --force: under the suite's load the plan may price the guest's felt stall over the goal
    # and refuse (seen with four workers); what is under test is the pre-copy converging.
    report = lab.ok("migrate", "vm2", "--to", "host-2", "--strategy", "auto", "--force", *goal)

    shown = ("strategy", "retried_from", "downtime_ms", "total_ms", "iterations", "resent_zero_bps")
    seen = {k: report[k] for k in shown}
    assert report["status"] == "completed", report["error"]
    assert report["retried_from"] is None, seen
    assert report["strategy"] in ("precopy", "xbzrle", "auto-converge"), seen
    assert (report["resent_zero_bps"] or 0) >= 32 << 20, seen  # rounds of them, priced
    assert report["downtime_ms"] < 150, seen  # QEMU's pause: what its threshold now holds
    assert report["guest_downtime_ms"] is not None
    assert report["integrity"]["ok"] is True
    agent_log = (lab_dir / "hosts" / "host-1" / "agent.log").read_text()
    assert "migration.switchover_bandwidth" in agent_log, agent_log[-2000:]

    # The next plan of vm2 knows what its pre-flight cannot see, and prices the pause with
    # them pending; auto moves it back with no cancelled attempt.
    plan = lab.ok("plan", "vm2", "--to", "host-1", *goal)
    assert plan["measured"]["rewritten_unchanged_bps"] >= 32 << 20
    assert plan["measured"]["rewrites_keep_pace"] is False  # no pre-copy stalled on them
    predictions = {p["strategy"]: p for p in plan["predictions"]}
    assert predictions["precopy"]["converges"] is True, predictions["precopy"]["note"]
    assert "rewritten unchanged" in predictions["precopy"]["note"]
    back = lab.ok("migrate", "vm2", "--to", "host-1", "--strategy", "auto", "--force", *goal)
    assert back["status"] == "completed", back["error"]
    assert back["retried_from"] is None, back
    assert back["integrity"]["ok"] is True


@pytest.mark.solo  # measured dirty rate and bandwidth decide the plan: no other guest beside it
# Known, not hidden: QEMU (TCG) now and then reports ~2.5-3 s of downtime for this post-copy or
# hybrid switchover (1 run in 3 on the code before the migration engine too), and the pre-flight
# can measure this dirtier well below its rate. A second run must pass; issue 13 (downtime as the
# guest feels it, predictions off the calibration matrix) is where both are fixed.
@pytest.mark.flaky(reruns=1)
def test_plan_then_auto_meets_a_goal_plain_precopy_cannot(lab_dir: Path) -> None:
    # A guest dirtying ~40 MiB/s behind a 200 Mbit/s (25 MB/s) cap: pre-copy never converges.
    lab = Lab(lab_dir)
    lab.ok("lab", "up", "--hosts", "2")
    workload = "dirty:rate=40M,size=128M,pattern=random,mode=paced"
    lab.ok("vm", "create", "vm1", "--host", "host-1", "--workload", workload)
    # The goal is what the guest feels: post-copy's and hybrid's page-fault chains after the
    # switch stall it some 100-300 ms, so 1 s is what such a guest can be promised here.
    goal = ["--max-downtime", "1000", "--deadline", "60", "--bandwidth", "200"]

    plan = lab.ok("plan", "vm1", "--to", "host-2", *goal)
    predictions = {p["strategy"]: p for p in plan["predictions"]}
    assert set(predictions) == {
        "precopy", "multifd", "xbzrle", "auto-converge", "postcopy", "hybrid", "cold",
    }  # fmt: skip
    assert predictions["precopy"]["converges"] is False
    assert predictions["postcopy"]["converges"] is True
    assert predictions["cold"]["downtime_ms"] == predictions["cold"]["total_ms"]
    assert plan["measured"]["bandwidth_bps"] <= 25_000_000
    assert plan["measured"]["dirty_rate_bps"] > 20 << 20
    assert plan["recommended"] in ("postcopy", "hybrid")
    assert plan["meets_goal"] is True
    assert lab.vms()[0]["host"] == "host-1"  # planning changes nothing

    report = lab.ok("migrate", "vm1", "--to", "host-2", "--strategy", "auto", *goal)
    assert report["status"] == "completed", report["error"]
    assert report["strategy"] in ("postcopy", "hybrid")
    assert report["predicted"] is not None
    assert report["predicted"]["guest_downtime_ms"] <= 1000
    assert report["guest_downtime_ms"] <= 1000, report
    assert report["integrity"]["ok"] is True

    # Without post-copy nothing meets 100 ms within 20 s over 100 Mbit/s: refused before
    # anything starts. (A pre-flight measured this dirtier at ~28 MB/s, near a 200 Mbit/s link,
    # and let a slow pre-copy start, one run in four; at half that link the margin is 2x.)
    tight = ["--max-downtime", "100", "--deadline", "20", "--bandwidth", "100"]
    lab.refused(
        "migrate", "vm1", "--to", "host-1", "--strategy", "auto", "--no-postcopy", *tight,
        message="--force",
    )  # fmt: skip
    assert lab.vms()[0]["host"] == "host-2"
