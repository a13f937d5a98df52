"""Real guests, real pre-copy migrations over TCP loopback, memory verified by the guest.

The lab's hosts are agents in this process; its migrations run the engine ``vmferry migrate``
runs (``controller.migrate``), here as plain pre-copy without a pre-flight plan.
"""

from __future__ import annotations

import asyncio

import pytest

from vmferry.agent.vm import IDLE_HEARTBEAT_HZ
from vmferry.core.heartbeat import HeartbeatGaps
from vmferry.core.model import VmSpec
from vmferry.core.phases import Phase
from vmferry.core.workload import parse_workload
from vmferry.lab.local import LocalLab

pytestmark = [pytest.mark.qemu, pytest.mark.asyncio]

DIRTY = "dirty:rate=50M,size=256M,pattern=random,mode=paced"


async def _beats_per_s(heartbeats: HeartbeatGaps, seconds: float = 1.0) -> float:
    before = heartbeats.received
    await asyncio.sleep(seconds)
    return (heartbeats.received - before) / seconds


async def test_idle_guest_migrates(lab: LocalLab) -> None:
    spec = VmSpec.build("idle-vm", memory="512M", workload=parse_workload("idle"))
    source = await lab.boot(spec, "host-1")
    phases: list[Phase] = []
    # Unmeasured, the guest beats at the idle rate (each beat costs its QEMU and agent CPU);
    # a move raises it to the workload's while it measures the guest's stalls.
    assert await _beats_per_s(source.heartbeats) <= 1.5 * IDLE_HEARTBEAT_HZ
    await source.heartbeat_for(measuring=True)
    assert await _beats_per_s(source.heartbeats) >= 0.6 * spec.workload.heartbeat_hz
    await source.heartbeat_for(measuring=False)
    assert await _beats_per_s(source.heartbeats) <= 1.5 * IDLE_HEARTBEAT_HZ

    report = await lab.migrate(
        "idle-vm",
        "host-2",
        strategy="precopy",
        plan=False,
        on_progress=lambda phase, _stats: phases.append(phase),
    )

    assert report.status == "completed", report.error
    assert report.is_success
    assert report.running_on == "host-2"
    assert report.integrity is not None
    assert report.integrity.pages_checked == (64 << 20) // 4096
    assert report.downtime_ms is not None
    assert report.guest_downtime_ms is not None
    assert report.transferred_bytes > 0
    # The source was torn down only after the switchover; the destination runs the guest.
    assert not source.process.is_running
    assert lab.get("idle-vm").process.is_running
    assert lab.get("idle-vm").role == "host-2"
    assert phases[0] is Phase.PREPARING
    assert Phase.COMPLETED in phases
    assert phases.index(Phase.COMPLETED) > phases.index(Phase.SETUP)
    # Arrived and checked, it beats slowly again.
    assert await _beats_per_s(lab.get("idle-vm").heartbeats) <= 1.5 * IDLE_HEARTBEAT_HZ


async def test_dirtying_guest_migrates_intact_and_back(lab: LocalLab) -> None:
    spec = VmSpec.build("busy-vm", memory="512M", workload=parse_workload(DIRTY))
    vm = await lab.boot(spec, "host-1")
    heartbeats = vm.heartbeats
    dirtied: dict[Phase, int] = {}

    def progress(phase: Phase, _stats: object) -> None:
        dirtied.setdefault(phase, heartbeats.dirtied_pages)

    there = await lab.migrate(
        "busy-vm", "host-2", strategy="precopy", plan=False, on_progress=progress
    )
    back = await lab.migrate("busy-vm", "host-1", strategy="precopy", plan=False)

    for report in (there, back):
        assert report.status == "completed", report.error
        assert report.integrity is not None
        assert report.integrity.bad_pages == 0
        assert report.integrity.pages_checked == (256 << 20) // 4096
        assert report.integrity.ok
        assert report.guest_alive
        assert report.guest_downtime_ms is not None
        assert report.guest_downtime_ms > 0
        assert report.iterations >= 1
    # The guest kept rewriting its pages while they were being copied.
    assert dirtied[Phase.COMPLETED] > dirtied[Phase.PREPARING]
    assert back.running_on == "host-1"


async def test_corrupted_page_is_detected_after_migration(lab: LocalLab) -> None:
    spec = VmSpec.build("hurt-vm", memory="512M", workload=parse_workload("idle"))
    vm = await lab.boot(spec, "host-1")
    before = await vm.verify()
    assert before.ok
    assert before.bad_pages == 0

    await vm.corrupt(1234)
    report = await lab.migrate("hurt-vm", "host-2", strategy="precopy", plan=False)

    assert report.status == "completed"
    assert report.integrity is not None
    assert report.integrity.bad_pages == 1
    assert not report.integrity.ok
    assert not report.is_success


async def test_migration_that_cannot_finish_leaves_the_guest_on_the_source(
    lab: LocalLab,
) -> None:
    # Dirtying far faster than a 2 MB/s (16 Mbit/s) link can carry: never converges; give up
    # after 3 s.
    spec = VmSpec.build("stuck-vm", memory="512M", workload=parse_workload(DIRTY))
    source = await lab.boot(spec, "host-1")

    report = await lab.migrate(
        "stuck-vm", "host-2", strategy="precopy", plan=False, bandwidth_mbps=16, deadline_s=3.0
    )

    assert report.status == "failed"
    assert report.error
    assert report.running_on == "host-1"
    assert report.guest_alive
    assert lab.get("stuck-vm") is source
    assert source.process.is_running
    status = await source.qmp.execute("query-status")
    assert status["status"] == "running"
    after = await source.verify()
    assert after.ok
    assert after.bad_pages == 0


async def test_a_running_migration_takes_a_new_cap(lab: LocalLab) -> None:
    """A move started at 16 Mbit/s is re-capped while it sends, as a job's dispatcher does:
    QEMU runs on at the new cap (pre-copy's and post-copy's), and the move completes."""
    spec = VmSpec.build("recap-vm", memory="256M", workload=parse_workload("idle"))
    source = await lab.boot(spec, "host-1")
    agent = lab.cluster.client("host-1")
    new_cap_bps = 100_000_000

    async def recap() -> dict[str, object]:
        for _ in range(600):  # up to 30 s
            if (await source.qmp.execute("query-migrate")).get("status") == "active":
                break
            await asyncio.sleep(0.05)
        await agent.set_migration_cap("recap-vm", new_cap_bps)
        params = await source.qmp.execute("query-migrate-parameters")
        assert isinstance(params, dict)
        return params

    report, params = await asyncio.gather(
        lab.migrate("recap-vm", "host-2", strategy="precopy", plan=False, bandwidth_mbps=16),
        recap(),
    )

    assert report.status == "completed", report.error
    assert params["max-bandwidth"] == new_cap_bps
    assert params["max-postcopy-bandwidth"] == new_cap_bps
