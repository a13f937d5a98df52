"""The lifecycle of one outgoing migration on its source host: every state and every allowed
move, in one table (pure).

The source agent's migration task, the controller's requests (continue, cancel) and adoption
after an agent restart all move an outgoing migration through these states; :func:`advance`
refuses any move the table does not list. What the VM is on its host in each state (the
``state`` an agent reports for it) is :attr:`OutgoingState.vm_state`.

::

    DISK_COPY --> RAM <--> SYNCED            (SYNCED: paused at the switchover, disk complete,
        |          |  \\       |              waiting for the controller's go-ahead)
        |          |   POSTCOPY -----------> COMPLETED | HANDED_OVER | LOST | UNANSWERED
        +----------+-- CANCELLING ---------> RETURNED | COMPLETED | ...
        any non-final state ---------------> RETURNED | COMPLETED | HANDED_OVER | LOST | UNANSWERED

Example:
    >>> advance(OutgoingState.RAM, OutgoingState.POSTCOPY)
    <OutgoingState.POSTCOPY: 'postcopy'>
"""

from __future__ import annotations

import enum

from vmferry.core.errors import StateError

__all__ = ["OutgoingState", "advance"]


class OutgoingState(enum.Enum):
    """Where one outgoing migration is."""

    DISK_COPY = "disk-copy"  # a local disk is mirrored; RAM has not started
    RAM = "ram"  # QEMU migrates RAM (pre-copy); the guest still belongs here
    SYNCED = "synced"  # paused at the switchover, disk complete: waiting for the go-ahead
    CANCELLING = "cancelling"  # a cancel was asked for; QEMU's answer decides the end
    POSTCOPY = "postcopy"  # the destination runs the guest: never resume it here
    COMPLETED = "completed"  # the guest left: paused here for good, awaiting the handoff
    HANDED_OVER = "handed-over"  # ended without completing after the guest left: never resumed
    RETURNED = "returned"  # failed or cancelled before the switchover: the guest runs on here
    LOST = "lost"  # this host's QEMU died
    UNANSWERED = "unanswered"  # QEMU alive but silent for long: a human decides

    @property
    def is_final(self) -> bool:
        return not _ALLOWED[self]

    @property
    def is_cancelled(self) -> bool:
        """The disk copy and the switchover hand-over must stop."""
        return self is OutgoingState.CANCELLING

    @property
    def vm_state(self) -> str:
        """What the VM is on this host in this state (an agent's ``VmState`` value)."""
        return _VM_STATE[self]


_ENDS = frozenset(
    {
        OutgoingState.COMPLETED,
        OutgoingState.HANDED_OVER,
        OutgoingState.RETURNED,
        OutgoingState.LOST,
        OutgoingState.UNANSWERED,
    }
)
# Every allowed move (staying in the same state is always allowed).
_ALLOWED: dict[OutgoingState, frozenset[OutgoingState]] = {
    OutgoingState.DISK_COPY: frozenset({OutgoingState.RAM, OutgoingState.CANCELLING, *_ENDS}),
    OutgoingState.RAM: frozenset(
        {OutgoingState.SYNCED, OutgoingState.POSTCOPY, OutgoingState.CANCELLING, *_ENDS}
    ),
    OutgoingState.SYNCED: frozenset(
        {OutgoingState.RAM, OutgoingState.POSTCOPY, OutgoingState.CANCELLING, *_ENDS}
    ),
    # A cancel that lost the race to post-copy: QEMU cannot cancel a post-copy.
    OutgoingState.CANCELLING: frozenset({OutgoingState.POSTCOPY, *_ENDS}),
    # Never back to RETURNED: the destination ran the guest.
    OutgoingState.POSTCOPY: frozenset(_ENDS - {OutgoingState.RETURNED}),
    OutgoingState.COMPLETED: frozenset(),
    OutgoingState.HANDED_OVER: frozenset(),
    OutgoingState.RETURNED: frozenset(),
    OutgoingState.LOST: frozenset(),
    OutgoingState.UNANSWERED: frozenset(),
}
_VM_STATE: dict[OutgoingState, str] = {
    OutgoingState.DISK_COPY: "migrating",
    OutgoingState.RAM: "migrating",
    OutgoingState.SYNCED: "migrating",
    OutgoingState.CANCELLING: "migrating",
    OutgoingState.POSTCOPY: "migrating",
    OutgoingState.COMPLETED: "migrated",
    OutgoingState.HANDED_OVER: "migrated",
    OutgoingState.RETURNED: "running",
    OutgoingState.LOST: "stopped",
    OutgoingState.UNANSWERED: "migrating",
}


def advance(current: OutgoingState, target: OutgoingState) -> OutgoingState:
    """The state after moving from ``current`` to ``target``.

    Raises:
        StateError: the table does not allow that move.
    """
    if target is current or target in _ALLOWED[current]:
        return target
    raise StateError("outgoing migration", current.value, f"a state that may become {target.value}")
