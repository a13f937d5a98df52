"""The order in which an adopting agent ends an orphaned migration with a disk mirror: the
mirror first, then the migration (QEMU 10.0 cancelling a migration paused at
``pre-switchover`` with a write-blocking mirror attached segfaulted the source now and then:
tests/integration/test_faults.py::test_source_agent_killed_during_precopy_and_restarted).

A scripted stand-in for QEMU's QMP answers; the real sequence runs in the fault test."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from scriptedqmp import ScriptedQmp
from vmferry.agent.adopt import settle
from vmferry.core.adoption import Settle
from vmferry.qemu.block import MIRROR_JOB


class ScriptedQemu(ScriptedQmp):
    """A source QEMU paused at ``pre-switchover`` with a ready mirror."""

    def __init__(self) -> None:
        super().__init__("scripted")
        self.mirror = True
        self.migration = "pre-switchover"
        self.running = False

    async def answer(self, command: str, arguments: dict[str, object], timeout_s: float) -> Any:
        match command:
            case "query-status":
                return {"status": "running" if self.running else "paused"}
            case "query-migrate":
                return {"status": self.migration}
            case "query-block-jobs":
                job = {"device": MIRROR_JOB, "offset": 1, "len": 1, "ready": True}
                return [job | {"status": "ready"}] if self.mirror else []
            case "block-job-cancel":
                self.mirror = False
            case "migrate_cancel":
                self.migration = "cancelled"
            case "cont":
                self.running = True
        return {}

    @contextlib.contextmanager
    def listener(self, *names: str) -> Iterator[Any]:
        yield None

    async def next_event(self, listener: Any, timeout_s: float) -> Mapping[str, Any]:
        return {"event": "BLOCK_JOB_CANCELLED", "data": {"device": MIRROR_JOB}}


@pytest.mark.asyncio
async def test_an_orphaned_switchover_loses_its_mirror_before_its_migration(
    tmp_path: Path,
) -> None:
    qemu = ScriptedQemu()
    adopted = await settle(qemu, tmp_path)
    assert adopted.decision.step is Settle.RESUME
    assert qemu.commands.index("block-job-cancel") < qemu.commands.index("migrate_cancel")
    assert qemu.running
    assert adopted.outcome is not None
    assert adopted.outcome.status == "failed"
