"""The verified handoff with real QEMUs: both stopped copies hashed from guest RAM (QEMU's
memfd) and compared before the destination runs; a damaged destination is caught and the
source keeps the guest.
"""

from __future__ import annotations

import pytest
from damage import corrupting, damage_ram

from vmferry.controller.reconcile import reconcile
from vmferry.core.handoff import HandoffStatus, VerifyMode
from vmferry.core.model import MigrationOptions, VmSpec
from vmferry.core.workload import parse_workload
from vmferry.lab.local import LocalLab

pytestmark = [pytest.mark.qemu, pytest.mark.asyncio]

DIRTY = "dirty:rate=20M,size=128M,pattern=random,mode=paced"
_CORRUPT_AT = 200 << 20  # a byte of guest RAM, 200 MiB in


async def test_full_handoff_compares_every_byte_and_the_move_completes(lab: LocalLab) -> None:
    spec = VmSpec.build("hv1", memory="512M", workload=parse_workload(DIRTY))
    await lab.boot(spec, "host-1")

    report = await lab.migrate(
        "hv1", "host-2", strategy="precopy", plan=False, verify=VerifyMode.FULL
    )

    assert report.is_success, report.error
    assert report.handoff is not None
    assert report.handoff.status is HandoffStatus.VERIFIED
    assert report.handoff.ram is not None
    assert report.handoff.ram.bytes_compared == 512 << 20
    assert report.running_on == "host-2"


async def test_a_damaged_destination_is_dropped_and_the_source_keeps_the_guest(
    lab: LocalLab, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = VmSpec.build("hv2", memory="512M", workload=parse_workload(DIRTY))
    await lab.boot(spec, "host-1")
    destination = lab.cluster.client("host-2")
    monkeypatch.setattr(
        destination, "handoff_digests", corrupting(destination, _CORRUPT_AT, spec.memory_bytes)
    )

    report = await lab.migrate(
        "hv2", "host-2", strategy="precopy", plan=False, verify=VerifyMode.FULL
    )

    assert report.status == "failed"
    assert report.running_on == "host-1"
    assert report.error is not None
    assert "differ" in report.error
    verdict = report.handoff
    assert verdict is not None
    assert verdict.status is HandoffStatus.DIFFERS
    assert verdict.ram is not None
    assert verdict.ram.differing_chunks == 1
    (damaged,) = verdict.ram.differing_ranges
    assert damaged.start_bytes <= _CORRUPT_AT < damaged.end_bytes
    # The guest runs on the source again, every page of its working set intact, and the
    # destination copy is gone.
    assert report.integrity is not None
    assert report.integrity.ok
    assert lab.get("hv2").role == "host-1"
    assert (await lab.get("hv2").verify()).ok
    assert [vm.name for vm in await destination.list_vms()] == []
    # It can still move, this time intact.
    monkeypatch.undo()
    again = await lab.migrate("hv2", "host-2", strategy="precopy", plan=False)
    assert again.is_success, again.error
    assert again.handoff is not None
    assert again.handoff.status is HandoffStatus.VERIFIED


async def test_reconcile_compares_a_held_copy_its_controller_never_compared(
    lab: LocalLab,
) -> None:
    """The controller died after QEMU completed and before the handoff's comparison: the source
    is stopped in postmigrate, the destination held unrun, and its copy was damaged meanwhile.
    `reconcile` compares them as the move would have, drops that copy and resumes the source."""
    spec = VmSpec.build("hv3", memory="512M", workload=parse_workload(DIRTY))
    await lab.boot(spec, "host-1")
    source, destination = lab.cluster.client("host-1"), lab.cluster.client("host-2")
    options = MigrationOptions(hold=True)
    uri, _ = await destination.prepare_incoming(spec, options)
    await source.start_migration("hv3", uri, options)
    since, result = 0, None
    while result is None:  # what the dead controller would have watched
        _, since, result = await source.migration_progress("hv3", since, 1.0)
    assert result.status == "completed"
    await damage_ram(destination, "hv3", 0, spec.memory_bytes)  # the sample always checks 0

    [settled] = await reconcile(lab.cluster)

    assert settled.verdict == "settled", settled
    assert settled.running_on == "host-1"
    assert settled.done[0] == "compared the copies: differs"
    assert "resume on host-1" in settled.done
    assert settled.integrity is not None
    assert settled.integrity.ok
    assert [vm.name for vm in await destination.list_vms()] == []
    assert lab.get("hv3").role == "host-1"
