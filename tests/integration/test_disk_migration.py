"""VMs with disks moved through the CLI on a real lab: local storage (NBD + blockdev-mirror),
shared storage (RAM only), cold moves, and a mirror interrupted midway."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from labcli import Lab

pytestmark = pytest.mark.qemu

# The guest dirties RAM and writes self-checking 4 KiB blocks to its disk while it moves.
WRITER = "dirty:rate=8M,size=64M,pattern=random,disk-rate=2M,disk-size=32M"
REGION_BLOCKS = (32 << 20) // 4096
# 2 Mbit/s: the 32 MiB the guest wrote take two minutes to mirror, so an interruption lands
# inside the disk copy.
MIRROR_SLOW = ("--strategy", "precopy", "--bandwidth", "2", "--json")


def _image_info(path: Path) -> dict[str, object]:
    out = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    info: dict[str, object] = json.loads(out)
    return info


def _holders(path: Path) -> list[int]:
    """PIDs of the processes that have ``path`` open."""
    target = str(path.resolve())
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            links = [os.readlink(fd) for fd in (entry / "fd").iterdir()]
        except OSError:
            continue
        if target in links:
            pids.append(int(entry.name))
    return pids


def _disk(lab_dir: Path, host: str, vm: str) -> Path:
    return lab_dir / "hosts" / host / "disks" / f"{vm}.qcow2"


def _assert_disk_ok(report: dict[str, object]) -> None:
    assert report["status"] == "completed", report["error"]
    integrity = report["integrity"]
    assert isinstance(integrity, dict)
    assert integrity["ok"] is True, integrity
    assert integrity["bad_pages"] == 0
    assert integrity["blocks_checked"] == REGION_BLOCKS
    assert integrity["bad_blocks"] == 0


def test_local_disk_moves_live_and_cold_with_every_block_verified(lab_dir: Path) -> None:
    lab = Lab(lab_dir)
    lab.ok("lab", "up", "--hosts", "2")
    created = lab.ok(
        "vm", "create", "d1", "--host", "host-1", "--disk", "256M", "--workload", WRITER
    )
    assert created["disk"] == {"size_bytes": 256 << 20, "bus": "virtio-blk", "storage": "local"}
    source_image = _disk(lab_dir, "host-1", "d1")
    assert source_image.is_file()
    assert lab.ok("verify", "d1")["blocks_checked"] == REGION_BLOCKS

    live = lab.ok("migrate", "d1", "--to", "host-2", "--strategy", "precopy", "--no-plan")
    _assert_disk_ok(live)
    assert live["running_on"] == "host-2"
    moved = _disk(lab_dir, "host-2", "d1")
    assert moved.is_file()
    assert not source_image.exists(), "the source's copy of a local disk is removed after a move"
    # Only allocated data moved: the 256 MiB image holds about the 32 MiB the guest wrote.
    assert int(str(_image_info(moved)["actual-size"])) < 128 << 20
    assert live["transferred_bytes"] > 32 << 20
    # The destination released its NBD export before it took the disk over, so QEMU could
    # activate the image at the switchover (it does not resume a guest whose disk it could not).
    log = (lab_dir / "hosts" / "host-2" / "vms" / "d1" / "qemu.log").read_text()
    assert "Permission conflict" not in log, log

    # Back with post-copy: the mirror completes at the pre-switchover pause, before the
    # destination runs the guest.
    back = lab.ok("migrate", "d1", "--to", "host-1", "--strategy", "postcopy", "--no-plan")
    _assert_disk_ok(back)
    assert not moved.exists()
    # The export was gone before post-copy started the guest on host-1, so QEMU activated the
    # disk and ran the guest at once instead of leaving it paused until the copy ended.
    log = (lab_dir / "hosts" / "host-1" / "vms" / "d1" / "qemu.log").read_text()
    assert "Permission conflict" not in log, log

    cold = lab.ok("migrate", "d1", "--to", "host-2", "--strategy", "cold", "--no-plan")
    _assert_disk_ok(cold)
    # A cold move copies the disk with the guest paused: it is downtime.
    assert cold["downtime_ms"] >= cold["total_ms"] * 0.3
    assert [(v["name"], v["host"], v["state"]) for v in lab.vms()] == [("d1", "host-2", "running")]
    lab.ok("vm", "delete", "d1")
    assert not _disk(lab_dir, "host-2", "d1").exists()


def test_shared_disk_moves_only_ram_and_one_qemu_holds_the_image(lab_dir: Path) -> None:
    lab = Lab(lab_dir)
    lab.ok("lab", "up", "--hosts", "2")
    lab.ok(
        "vm",
        "create",
        "s1",
        "--host",
        "host-1",
        "--disk",
        "128M",
        "--disk-bus",
        "virtio-scsi",
        "--storage",
        "shared",
        "--workload",
        WRITER,
    )
    image = lab_dir / "shared" / "s1.qcow2"
    source_pid = lab.ok("vm", "show", "s1")["pid"]
    assert _holders(image) == [source_pid]

    inode = image.stat().st_ino
    there = lab.ok("migrate", "s1", "--to", "host-2")
    _assert_disk_ok(there)
    # RAM only: the destination opened the very same image file and made no copy of it.
    assert image.stat().st_ino == inode
    assert not _disk(lab_dir, "host-2", "s1").exists()
    assert there["transferred_bytes"] < 512 << 20
    destination_pid = lab.ok("vm", "show", "s1")["pid"]
    assert destination_pid != source_pid
    assert _holders(image) == [destination_pid]
    # The running QEMU holds the image's write lock: nobody else may open it read-write.
    locked = subprocess.run(
        ["qemu-img", "info", str(image)], capture_output=True, text=True, check=False
    )
    assert locked.returncode != 0
    assert "lock" in locked.stderr

    back = lab.ok("migrate", "s1", "--to", "host-1", "--strategy", "postcopy", "--no-plan")
    _assert_disk_ok(back)
    assert image.is_file()


def _wait_for(predicate: object, timeout_s: float, what: str) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_interrupted_disk_mirror_leaves_exactly_one_intact_vm(lab_dir: Path) -> None:
    lab = Lab(lab_dir)
    lab.ok("lab", "up", "--hosts", "2")
    lab.ok("vm", "create", "m1", "--host", "host-1", "--disk", "256M", "--workload", WRITER)
    source_pid = lab.ok("vm", "show", "m1")["pid"]
    target = _disk(lab_dir, "host-2", "m1")

    # 1. The destination QEMU dies while the disk is being mirrored (2 Mbit/s: it takes long).
    migrating = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vmferry.cli.main",
            "migrate",
            "m1",
            "--to",
            "host-2",
            "--strategy",
            "precopy",
            "--bandwidth",
            "2",
            "--json",
            "--no-plan",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "VMFERRY_LAB_DIR": str(lab_dir)},
    )
    try:
        pid_file = lab_dir / "hosts" / "host-2" / "vms" / "m1" / "qemu.pid"
        _wait_for(lambda: pid_file.exists() and target.exists(), 60, "the destination")
        time.sleep(1.5)  # well inside the disk copy
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
        out, err = migrating.communicate(timeout=120)
    finally:
        if migrating.poll() is None:
            migrating.kill()
            migrating.wait()
    assert migrating.returncode != 0, err
    failed = json.loads(out)
    assert failed["status"] == "failed"
    assert failed["running_on"] == "host-1"
    assert "disk" in (failed["error"] or ""), failed["error"]
    vms = lab.vms()
    assert [(v["name"], v["host"], v["state"], v["pid"]) for v in vms] == [
        ("m1", "host-1", "running", source_pid)
    ]
    assert not target.exists(), "the destination is left empty"
    intact = lab.ok("verify", "m1")
    assert intact["ok"] is True
    assert intact["blocks_checked"] == REGION_BLOCKS

    # 2. The deadline runs out during the disk copy: cancelled, the guest stays put.
    late = lab.run("migrate", "m1", "--to", "host-2", "--deadline", "4", *MIRROR_SLOW)
    assert late.returncode != 0
    report = json.loads(late.stdout)
    assert report["status"] == "failed"
    assert report["running_on"] == "host-1"
    assert [(v["name"], v["host"], v["state"]) for v in lab.vms()] == [("m1", "host-1", "running")]
    assert not target.exists()
    assert lab.ok("verify", "m1")["ok"] is True

    # 3. A destination without room refuses before anything starts.
    small = lab.run("vm", "create", "m2", "--host", "host-2", "--disk", "1T")
    assert small.returncode == 2, small.stderr
    assert "free for disks" in small.stderr
