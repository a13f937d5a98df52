"""A switchover holds the source's other pre-copies back and gives each its cap back once no
switchover holds it (vmferry.agent.switch_priority). QEMU is a scripted stand-in here; the
evacuation lab (bench/evacuation_lab.py) runs the real thing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from scriptedqmp import ScriptedQmp
from vmferry.agent.slots import Outgoing, Slots
from vmferry.agent.switch_priority import TRICKLE_BPS, SwitchPriority
from vmferry.core.errors import QMPTimeout
from vmferry.core.outgoing import OutgoingState


class CapQemu(ScriptedQmp):
    """A source QEMU that keeps its ``max-bandwidth``."""

    def __init__(self, name: str, cap_bps: int) -> None:
        super().__init__(name)
        self.cap_bps = cap_bps
        self.busy_s = 0.0  # how long it takes to answer (a QEMU busy with its own switchover)

    async def answer(self, command: str, arguments: dict[str, object], timeout_s: float) -> Any:
        if self.busy_s > timeout_s:
            await asyncio.sleep(timeout_s)
            raise QMPTimeout(f"QMP {command}", timeout_s)
        if command == "query-migrate-parameters":
            return {"max-bandwidth": self.cap_bps}
        assert command == "migrate-set-parameters"
        self.cap_bps = int(cast(int, arguments["max-bandwidth"]))
        return {}


@dataclass
class Spec:
    name: str


@dataclass
class Vm:
    qmp: CapQemu


@dataclass
class FakeSlot:
    spec: Spec
    vm: Vm
    outgoing: Outgoing | None


@dataclass
class FakeSlots:
    table: dict[str, FakeSlot] = field(default_factory=dict)

    def __iter__(self) -> Iterator[FakeSlot]:
        return iter(self.table.values())

    def __contains__(self, name: str) -> bool:
        return name in self.table

    def get(self, name: str) -> FakeSlot:
        return self.table[name]


def _host(**states: OutgoingState | None) -> tuple[SwitchPriority, dict[str, CapQemu]]:
    slots = FakeSlots()
    qemus = {}
    for index, (name, state) in enumerate(states.items()):
        qemus[name] = CapQemu(name, 10_000_000 * (index + 1))
        outgoing = None if state is None else Outgoing(state)
        slots.table[name] = FakeSlot(Spec(name), Vm(qemus[name]), outgoing)
    return SwitchPriority(cast(Slots, slots)), qemus


@pytest.mark.asyncio
async def test_a_switchover_holds_the_other_precopies_then_gives_their_caps_back() -> None:
    priority, qemus = _host(a=OutgoingState.RAM, b=OutgoingState.RAM, c=None)
    await priority.take("a")
    assert qemus["a"].cap_bps == 10_000_000  # the one switching over keeps its own
    assert qemus["b"].cap_bps == TRICKLE_BPS
    assert qemus["c"].cap_bps == 30_000_000  # not migrating
    await priority.give_back("a")
    assert qemus["b"].cap_bps == 20_000_000


@pytest.mark.asyncio
async def test_a_held_migration_runs_again_only_when_no_switchover_holds_it() -> None:
    priority, qemus = _host(a=OutgoingState.RAM, b=OutgoingState.RAM, c=OutgoingState.RAM)
    await priority.take("a")
    await priority.take("b")  # b was held by a; now it holds c too
    await priority.give_back("a")
    assert qemus["c"].cap_bps == TRICKLE_BPS  # b still switching over
    await priority.give_back("b")
    assert qemus["c"].cap_bps == 30_000_000


@pytest.mark.asyncio
async def test_a_cap_asked_for_while_held_applies_when_released() -> None:
    priority, qemus = _host(a=OutgoingState.RAM, b=OutgoingState.RAM)
    await priority.take("a")
    assert priority.defer_cap("b", 5_000_000)
    assert not priority.defer_cap("a", 5_000_000)  # not held
    assert qemus["b"].cap_bps == TRICKLE_BPS
    await priority.give_back("a")
    assert qemus["b"].cap_bps == 5_000_000


@pytest.mark.asyncio
async def test_postcopies_and_disk_copies_are_left_alone() -> None:
    priority, qemus = _host(
        a=OutgoingState.RAM, b=OutgoingState.POSTCOPY, c=OutgoingState.DISK_COPY
    )
    await priority.take("a")
    assert qemus["b"].cap_bps == 20_000_000
    assert qemus["c"].cap_bps == 30_000_000


@pytest.mark.asyncio
async def test_a_busy_qemu_is_left_alone_and_does_not_lengthen_the_pause() -> None:
    priority, qemus = _host(a=OutgoingState.RAM, b=OutgoingState.RAM, c=OutgoingState.RAM)
    qemus["b"].busy_s = 10.0
    started = time.monotonic()
    await priority.take("a")
    assert time.monotonic() - started < 2.0  # asked at once, each with a short timeout
    assert qemus["b"].cap_bps == 20_000_000
    assert qemus["c"].cap_bps == TRICKLE_BPS
    qemus["b"].busy_s = 0.0
    await priority.give_back("a")
    assert qemus["b"].cap_bps == 20_000_000
    assert qemus["c"].cap_bps == 30_000_000
