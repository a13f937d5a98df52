"""Post-copy recovery on either side of a migration: pause a broken post-copy, have the
destination listen again, resume the source towards it.

Requests carry the controller's attempt number: one of an older attempt, sent into a cut link
and delivered by TCP once the link is back, would pause the recovered migration again, so it
is refused. Until both sides are paused, only OOB commands reach QEMU (see
:mod:`vmferry.qemu.migration`).
"""

from __future__ import annotations

from vmferry.agent.slots import Slots, VmState
from vmferry.agent.vm import RunningVm
from vmferry.core.errors import StateError
from vmferry.core.status import MigrationStatus
from vmferry.qemu.postcopy_recovery import pause_postcopy, recover_incoming, resume_postcopy

__all__ = ["Recovery"]


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
        if self.slots.get(name).state is VmState.MIGRATED:
            # The source's QEMU completed the post-copy (a slow link looked cut): the
            # destination has every page, nothing is left to pause or recover.
            return MigrationStatus.COMPLETED
        vm = self._recovering(name, attempt, VmState.MIGRATING, VmState.INCOMING)
        # A source's main loop never waits for pages: it may be asked its status; a
        # destination's may be held by a missing page, so it is only sent OOB commands.
        source = self.slots.get(name).state is VmState.MIGRATING
        return await pause_postcopy(vm.qmp, may_query=source)

    async def listen(self, name: str, attempt: int) -> str:
        """See :meth:`HostAgent.recover_incoming`."""
        vm = self._recovering(name, attempt, VmState.INCOMING)
        return await recover_incoming(vm.qmp, self.migration_address)

    async def resume(self, name: str, uri: str, attempt: int) -> MigrationStatus:
        """See :meth:`HostAgent.resume_outgoing`."""
        vm = self._recovering(name, attempt, VmState.MIGRATING)
        return await resume_postcopy(vm.qmp, uri)
