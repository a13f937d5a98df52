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

import logging
from dataclasses import dataclass

from vmferry.agent.slots import Slots
from vmferry.core.errors import FerryError
from vmferry.core.outgoing import OutgoingState
from vmferry.qemu.migration import precopy_bandwidth, set_precopy_bandwidth

__all__ = ["TRICKLE_BPS", "Held", "SwitchPriority"]

logger = logging.getLogger(__name__)

# What a held pre-copy may still send (1 Mbit/s): enough to keep its connection alive.
TRICKLE_BPS = 125_000


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
        """``owner`` is at its switchover: throttle every other pre-copy sending from here."""
        for slot in self.slots:
            name, outgoing, vm = slot.spec.name, slot.outgoing, slot.vm
            if name == owner or outgoing is None or vm is None:
                continue
            if outgoing.state is not OutgoingState.RAM:
                continue
            held = self._held.get(name)
            if held is not None:
                held.owners.add(owner)
                continue
            try:
                cap_bps = await precopy_bandwidth(vm.qmp)
                await set_precopy_bandwidth(vm.qmp, TRICKLE_BPS)
            except FerryError as err:  # its migration may just have ended
                logger.warning("switchover.hold %s for %s: %s", name, owner, err)
                continue
            self._held[name] = Held({owner}, cap_bps)
            logger.info("switchover.held %s for %s", name, owner)

    async def give_back(self, owner: str) -> None:
        """``owner``'s switchover is over: restore the caps no other switchover holds."""
        for name, held in list(self._held.items()):
            held.owners.discard(owner)
            if held.owners:
                continue
            del self._held[name]
            if name not in self.slots:
                continue
            slot = self.slots.get(name)
            if slot.vm is None or slot.outgoing is None:
                continue
            if slot.outgoing.state is not OutgoingState.RAM:
                continue  # it went on to its own switchover (QEMU lifts caps there) or ended
            try:
                await set_precopy_bandwidth(slot.vm.qmp, held.cap_bps)
            except FerryError as err:
                logger.warning("switchover.release %s after %s: %s", name, owner, err)
                continue
            logger.info("switchover.released %s after %s", name, owner)

    def defer_cap(self, name: str, cap_bps: int) -> bool:
        """A new cap for ``name``: True when it is held (the cap applies on release)."""
        held = self._held.get(name)
        if held is None:
            return False
        held.cap_bps = cap_bps
        return True
