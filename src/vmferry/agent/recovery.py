"""Post-copy recovery on either side of a migration: pause a broken post-copy, have the
destination listen again, resume the source towards it.

Requests carry the controller's attempt number: one of an older attempt, sent into a cut link
and delivered by TCP once the link is back, would pause the recovered migration again, so it
is refused. Until both sides are paused, only OOB commands reach QEMU (see
:mod:`vmferry.qemu.migration`).
"""

from __future__ import annotations

import logging

from vmferry.agent.slots import Slots, VmState
from vmferry.agent.vm import RunningVm
from vmferry.core.errors import StateError
from vmferry.core.status import MigrationStatus
from vmferry.qemu.postcopy_recovery import pause_postcopy, recover_incoming, resume_postcopy
from vmferry.qemu.sockets import link_alive

__all__ = ["Recovery"]

logger = logging.getLogger(__name__)


class Recovery:
    """Post-copy recovery requests for this host's VMs."""

    def __init__(self, slots: Slots, migration_address: str) -> None:
        self.slots = slots
        self.migration_address = migration_address

    def _recovering(self, name: str, attempt: int, *states: VmState) -> RunningVm:
        """VM ``name``'s QEMU for recovery ``attempt``, if it is in one of ``states``.

        Raises:
            NotFound: no such VM.
            StateError: in another state, or ``attempt`` is older than one already seen.
        """
        slot = self.slots.get(name)
        if slot.state not in states or slot.vm is None:
            raise StateError(f"VM {name}", slot.state.value, " or ".join(x.value for x in states))
        if attempt < slot.recovery_attempt:
            raise StateError(
                f"recovery attempt {attempt} of {name}",
                "stale",
                f"attempt >= {slot.recovery_attempt}",
            )
        slot.recovery_attempt = attempt
        return slot.vm

    async def pause(self, name: str, attempt: int) -> MigrationStatus:
        """See :meth:`HostAgent.pause_postcopy`."""
        slot = self.slots.get(name)
        if slot.state is VmState.MIGRATED:
            # The source's QEMU completed the post-copy (a slow link looked cut): the
            # destination has every page, nothing is left to pause or recover.
            return MigrationStatus.COMPLETED
        vm = self._recovering(name, attempt, VmState.MIGRATING, VmState.INCOMING)
        # A source's main loop never waits for pages: it may be asked its status; a
        # destination's may be held by a missing page, so it is only sent OOB commands.
        source = slot.state is VmState.MIGRATING
        outgoing = slot.outgoing
        if source and outgoing is not None and await _link_works(vm, outgoing.peer_address):
            return MigrationStatus.POSTCOPY_ACTIVE
        return await pause_postcopy(vm.qmp, may_query=source)

    async def listen(self, name: str, attempt: int) -> str:
        """See :meth:`HostAgent.recover_incoming`."""
        vm = self._recovering(name, attempt, VmState.INCOMING)
        return await recover_incoming(vm.qmp, self.migration_address)

    async def resume(self, name: str, uri: str, attempt: int) -> MigrationStatus:
        """See :meth:`HostAgent.resume_outgoing`."""
        vm = self._recovering(name, attempt, VmState.MIGRATING)
        return await resume_postcopy(vm.qmp, uri)


async def _link_works(vm: RunningVm, peer_address: str | None) -> bool:
    """Whether the source QEMU's link to its destination still carries the post-copy. A quiet
    post-copy is not always a broken one: a source that sent every page waits for its
    destination to finish, one sending its last pages holds the lock its status is asked under.
    Pausing either fails the migration inside QEMU (it cannot be resumed), so the source is
    paused only when what it sent goes unacknowledged and nothing comes back."""
    pid = vm.process.pid
    if pid is None or peer_address is None:
        return False
    why = await link_alive(pid, peer_address)
    if why is None:
        return False
    logger.warning(
        "migration.pause_skipped %s: its link to %s works (%s)", vm.spec.name, peer_address, why
    )
    return True
