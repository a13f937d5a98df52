"""Migration lifecycle as shown to users: phases, the events that move between them, and
``transition`` (the state machine's own states are in :mod:`vmferry.core.migration_state`).

QEMU's own migration status strings are translated into :class:`QemuStatus` events at the QEMU
boundary; everything else (destination ready, guest verified, failures) comes from vmferry.

Example:
    >>> phase = Phase.PREPARING
    >>> phase = transition(phase, DestinationReady())
    >>> transition(phase, QemuStatus("active"))
    <Phase.ACTIVE: 'active'>
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from vmferry.core.errors import StateError
from vmferry.core.status import MigrationStatus

__all__ = [
    "TERMINAL",
    "Cancelled",
    "DestinationReady",
    "Failed",
    "MigrationEvent",
    "Phase",
    "QemuStatus",
    "Verified",
    "transition",
]


class Phase(enum.Enum):
    PREPARING = "preparing"  # destination being started, pre-checks
    SETUP = "setup"  # migration started, QEMU setting up
    ACTIVE = "active"  # pre-copy iterations
    SWITCHOVER = "switchover"  # source paused, last pages and device state in flight
    POSTCOPY = "postcopy"  # destination runs, pulls the remaining pages
    COMPLETED = "completed"  # QEMU finished; guest not yet checked
    DONE = "done"  # guest verified on the destination
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"  # stopped; the guest runs on the source
    FAILED = "failed"


TERMINAL = frozenset({Phase.DONE, Phase.CANCELLED, Phase.FAILED})


@dataclass(frozen=True, slots=True)
class DestinationReady:
    """The destination QEMU listens for the incoming stream."""


@dataclass(frozen=True, slots=True)
class QemuStatus:
    """The source QEMU's ``MigrationStatus`` string changed (from an event or a query)."""

    status: str


@dataclass(frozen=True, slots=True)
class Verified:
    """The guest was checked on the destination."""


@dataclass(frozen=True, slots=True)
class Cancelled:
    """The user (or a deadline) asked to cancel."""


@dataclass(frozen=True, slots=True)
class Failed:
    """Something outside QEMU's status failed (a process died, a timeout)."""

    reason: str


MigrationEvent = DestinationReady | QemuStatus | Verified | Cancelled | Failed

_QEMU_STATUS: dict[str, Phase] = {
    MigrationStatus.NONE: Phase.SETUP,
    MigrationStatus.SETUP: Phase.SETUP,
    MigrationStatus.WAIT_UNPLUG: Phase.SETUP,
    MigrationStatus.ACTIVE: Phase.ACTIVE,
    MigrationStatus.PRE_SWITCHOVER: Phase.SWITCHOVER,
    MigrationStatus.DEVICE: Phase.SWITCHOVER,
    MigrationStatus.POSTCOPY_ACTIVE: Phase.POSTCOPY,
    MigrationStatus.POSTCOPY_PAUSED: Phase.POSTCOPY,
    MigrationStatus.POSTCOPY_RECOVER_SETUP: Phase.POSTCOPY,
    MigrationStatus.POSTCOPY_RECOVER: Phase.POSTCOPY,
    MigrationStatus.COMPLETED: Phase.COMPLETED,
    MigrationStatus.FAILED: Phase.FAILED,
    MigrationStatus.CANCELLING: Phase.CANCELLING,
    MigrationStatus.CANCELLED: Phase.CANCELLED,
}

# Where each phase may go next on a QEMU status (order of the pipeline; no going back).
_FORWARD: dict[Phase, frozenset[Phase]] = {
    Phase.SETUP: frozenset(
        {Phase.SETUP, Phase.ACTIVE, Phase.SWITCHOVER, Phase.COMPLETED, Phase.POSTCOPY}
    ),
    Phase.ACTIVE: frozenset({Phase.ACTIVE, Phase.SWITCHOVER, Phase.POSTCOPY, Phase.COMPLETED}),
    Phase.SWITCHOVER: frozenset({Phase.SWITCHOVER, Phase.POSTCOPY, Phase.COMPLETED}),
    Phase.POSTCOPY: frozenset({Phase.POSTCOPY, Phase.COMPLETED}),
    Phase.COMPLETED: frozenset({Phase.COMPLETED}),
    Phase.CANCELLING: frozenset({Phase.CANCELLING, Phase.CANCELLED}),
}


def transition(phase: Phase, event: MigrationEvent) -> Phase:
    """Return the phase after ``event``.

    Raises:
        StateError: if the event makes no sense in ``phase`` (e.g. anything after a terminal
            phase, or QEMU reporting a status that goes backwards).
    """
    if phase in TERMINAL:
        raise StateError("migration", phase.value, "a non-terminal phase")
    match event:
        case Failed():
            return Phase.FAILED
        case DestinationReady():
            if phase is not Phase.PREPARING:
                raise StateError("migration", phase.value, Phase.PREPARING.value)
            return Phase.SETUP
        case Verified():
            if phase is not Phase.COMPLETED:
                raise StateError("migration", phase.value, Phase.COMPLETED.value)
            return Phase.DONE
        case Cancelled():
            if phase in (Phase.COMPLETED, Phase.POSTCOPY):
                # Past the point of no return: the destination holds the only current state.
                raise StateError("migration", phase.value, "a phase before switchover")
            return Phase.CANCELLING if phase is not Phase.PREPARING else Phase.CANCELLED
        case QemuStatus(status=status):
            target = _QEMU_STATUS.get(status)
            if target is None:
                raise StateError("migration", phase.value, f"a known QEMU status, not {status!r}")
            if target in (Phase.FAILED, Phase.CANCELLED, Phase.CANCELLING):
                return target
            allowed = _FORWARD.get(phase, frozenset())
            if target not in allowed:
                raise StateError("migration", phase.value, f"no step back to {target.value}")
            return target
