"""A real distribution as a user's own VM: Debian 12 built from Debian's packages, booted from
its disk image by direct kernel boot, moved live with its disk on local storage, the handoff
verified by digests of both stopped copies (all of RAM and of the disk's content), its guest
agent answering with the guest clock set from the host's, its heartbeats (vmferry's workload
program, in the image) giving the downtime it felt; then a damaged destination is caught
before it runs and the source keeps the guest, intact. (Firmware boot, shared storage and the
CLI: test_own_guest_cli.py. The Debian boot under TCG takes ~10 s: one test tells the story.)
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from damage import corrupting

from vmferry.core.boot import GuestBoot
from vmferry.core.handoff import HandoffStatus, VerifyMode
from vmferry.core.model import DiskSpec, MigrationReport, StorageMode, VmName, VmSpec
from vmferry.guest.debian import debian_image
from vmferry.lab.local import LocalLab

# The two Debian tests (here and test_own_guest_cli.py) run one after the other on one worker:
# two systemd boots at once under TCG starve each other (an agent missed its 150 s).
pytestmark = [pytest.mark.qemu, pytest.mark.asyncio, pytest.mark.xdist_group("debian")]

AGENT_TIMEOUT_S = 150.0
FULL = VerifyMode.FULL
MEMORY_BYTES = 512 << 20
_CORRUPT_AT = 300 << 20


def _spec(name: str, storage: StorageMode, boot: GuestBoot) -> VmSpec:
    # The disk's size is the image's (the agent sizes it from the image it copies).
    return VmSpec(
        name=VmName(name),
        memory_bytes=MEMORY_BYTES,
        vcpus=1,  # leaves the other test worker a core (TCG runs one thread per vCPU)
        disk=DiskSpec(1 << 30, storage=storage),
        boot=boot,
    )


async def _clock_skew_s(lab: LocalLab, name: str) -> float:
    guest_ns = await lab.get(name).guest_agent.guest_time_ns(5.0)
    return abs(guest_ns - time.time_ns()) / 1e9


def _verified(report: MigrationReport, *, disk: bool) -> None:
    assert report.is_success, report.error
    handoff = report.handoff
    assert handoff is not None
    assert handoff.status is HandoffStatus.VERIFIED, handoff
    assert handoff.ram is not None
    assert handoff.ram.differing_chunks == 0
    assert (handoff.disk is not None) is disk
    agent = report.guest_agent
    assert agent is not None
    assert agent.answered
    assert agent.clock_synced
    assert agent.clock_offset_ms is not None
    assert abs(agent.clock_offset_ms) < 1000


async def test_debian_guest_boots_moves_verified_and_a_damaged_copy_is_caught(
    lab: LocalLab, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = await asyncio.to_thread(debian_image)
    # The image's workload program, idle, sends heartbeats on the port --heartbeat wires.
    append = f"{image.root_append} vmferry.mode=idle vmferry.ws={16 << 20}"
    direct = GuestBoot(kernel=image.kernel, initrd=image.initrd, append=append, heartbeat=True)
    await lab.boot(_spec("deb-local", "local", direct), "host-1", image=image.disk)
    await lab.wait_guest_agent("deb-local", AGENT_TIMEOUT_S)
    host1, host2 = lab.cluster.client("host-1"), lab.cluster.client("host-2")
    started = ["sh", "-c", "until systemctl -q is-active vmferry-workload; do sleep 1; done"]
    assert (await host1.guest_exec("deb-local", started, 60.0)).exit_code == 0
    release = await host1.guest_exec("deb-local", ["cat", "/etc/os-release"], 20.0)
    assert release.exit_code == 0
    assert b'VERSION_ID="12"' in release.stdout
    failing = await host1.guest_exec("deb-local", ["sh", "-c", "echo no >&2; exit 3"], 20.0)
    assert (failing.exit_code, failing.stderr) == (3, b"no\n")
    write = "head -c 4M /dev/urandom | tee /root/m | sha256sum"
    marker = await host1.guest_exec("deb-local", ["sh", "-c", write], 20.0)
    assert marker.exit_code == 0

    # Live with local storage: RAM and the disk's guest-visible content compared in full.
    moved = await lab.migrate("deb-local", "host-2", strategy="precopy", plan=False, verify=FULL)
    _verified(moved, disk=True)
    assert moved.running_on == "host-2"
    assert moved.guest_downtime_ms is not None, "no heartbeats from the Debian guest"
    assert moved.guest_downtime_ms > 0
    assert await _clock_skew_s(lab, "deb-local") < 1.0

    # A damaged destination: caught before it runs; the source keeps the guest, intact.
    monkeypatch.setattr(host1, "handoff_digests", corrupting(host1, _CORRUPT_AT, MEMORY_BYTES))
    damaged = await lab.migrate("deb-local", "host-1", strategy="precopy", plan=False, verify=FULL)
    assert damaged.status == "failed"
    assert damaged.running_on == "host-2"
    assert damaged.handoff is not None
    assert damaged.handoff.status is HandoffStatus.DIFFERS
    assert damaged.handoff.ram is not None
    (where,) = damaged.handoff.ram.differing_ranges
    assert where.start_bytes <= _CORRUPT_AT < where.end_bytes
    assert [vm.name for vm in await host1.list_vms()] == []
    assert lab.get("deb-local").role == "host-2"
    again = await host2.guest_exec("deb-local", ["sha256sum", "/root/m"], 20.0)
    assert again.stdout.split()[0] == marker.stdout.split()[0]
    state = await host2.guest_exec("deb-local", ["systemctl", "is-system-running"], 20.0)
    assert state.stdout.strip() in (b"running", b"degraded"), state
    assert Path(image.disk).exists()  # the cached image itself is never run
