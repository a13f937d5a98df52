"""A migration's stop-and-copy has its source's link to itself.

Several migrations from one host share its link (a job's moves). When one of them reaches its
switchover (QEMU has paused the guest: ``pre-switchover``), its last pass and device state would
otherwise queue behind the others' pre-copy streams at every shaper and switch port on the way
and share the link's rate with them: QEMU's pause runs past its limit and the guest then waits
for the queue to drain on top (evacuation lab, 30 Nov: a guest felt 100-170 ms beyond QEMU's
pause beside 2-3 other moves, 50-70 ms alone). So the source agent throttles the others'
pre-copy to a trickle for that moment and gives each its cap back once no switchover holds it
(the switching migration completed or failed). A post-copy, a disk copy, or a migration already
at its own switchover is left alone.

Example (the bookkeeping; QEMU is asked through :mod:`vmferry.qemu.migration`):
    >>> held = Held({"vm-a"}, 50_000_000)
    >>> held.owners.discard("vm-a"); not held.owners
    True
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from vmferry.agent.slots import Slots
from vmferry.core.errors import FerryError
from vmferry.core.outgoing import OutgoingState
from vmferry.qemu.migration import precopy_bandwidth, set_precopy_bandwidth
from vmferry.qemu.session import QmpSession

__all__ = ["TRICKLE_BPS", "Held", "SwitchPriority"]

logger = logging.getLogger(__name__)

# What a held pre-copy may still send (1 Mbit/s): enough to keep its connection alive.
TRICKLE_BPS = 125_000
# How long one of them may take to answer while a guest is paused for the switchover.
_QMP_TIMEOUT_S = 0.2
# Giving a cap back: no guest waits for it, but the move that held it reports its end after.
_RELEASE_TIMEOUT_S = 2.0


@dataclass(slots=True)
class Held:
    """A migration throttled for others' switchovers: who holds it, and its cap to restore."""

    owners: set[str]
    cap_bps: int


class SwitchPriority:
    """The source agent's throttling of its other pre-copies during one's switchover."""

    def __init__(self, slots: Slots) -> None:
        self.slots = slots
        self._held: dict[str, Held] = {}

    async def take(self, owner: str) -> None:
        """``owner`` is at its switchover: throttle every other pre-copy sending from here.

        Its guest is paused meanwhile: the others are asked at once, each with a short
        timeout (a QEMU busy with its own switchover is left as it is)."""
        await asyncio.gather(
            *(
                self._hold(slot.spec.name, slot.vm.qmp, owner)
                for slot in self.slots
                if slot.spec.name != owner
                and slot.vm is not None
                and slot.outgoing is not None
                and slot.outgoing.state is OutgoingState.RAM
            )
        )

    async def _hold(self, name: str, qmp: QmpSession, owner: str) -> None:
        held = self._held.get(name)
        if held is not None:
            held.owners.add(owner)
            return
        try:
            cap_bps = await precopy_bandwidth(qmp, _QMP_TIMEOUT_S)
        except FerryError as err:  # busy, or its migration just ended: nothing changed
            logger.warning("switchover.hold %s for %s: %s", name, owner, err)
            return
        # Recorded before the change is asked for: one that times out may still land.
        self._held[name] = Held({owner}, cap_bps)
        try:
            await set_precopy_bandwidth(qmp, TRICKLE_BPS, _QMP_TIMEOUT_S)
        except FerryError as err:
            logger.warning("switchover.hold %s for %s: %s", name, owner, err)
            return
        logger.info("switchover.held %s for %s", name, owner)

    async def give_back(self, owner: str) -> None:
        """``owner``'s switchover is over: restore the caps no other switchover holds."""
        free: list[tuple[str, int]] = []
        for name, held in list(self._held.items()):
            held.owners.discard(owner)
            if not held.owners:
                del self._held[name]
                free.append((name, held.cap_bps))
        await asyncio.gather(*(self._release(name, cap_bps, owner) for name, cap_bps in free))

    async def _release(self, name: str, cap_bps: int, owner: str) -> None:
        if name not in self.slots:
            return
        slot = self.slots.get(name)
        if slot.vm is None or slot.outgoing is None:
            return
        if slot.outgoing.state is not OutgoingState.RAM:
            return  # it ended, or went on to post-copy
        try:
            await set_precopy_bandwidth(slot.vm.qmp, cap_bps, _RELEASE_TIMEOUT_S)
        except FerryError as err:
            logger.warning("switchover.release %s after %s: %s", name, owner, err)
            return
        logger.info("switchover.released %s after %s", name, owner)

    def defer_cap(self, name: str, cap_bps: int) -> bool:
        """A new cap for ``name``: True when it is held (the cap applies on release)."""
        held = self._held.get(name)
        if held is None:
            return False
        held.cap_bps = cap_bps
        return True
