"""Statuses as enums: QEMU's own wire values, and vmferry's stages kept apart from them.

QEMU reports a migration's ``MigrationStatus`` and a VM's ``RunState`` as strings; they are
parsed into these enums at the QEMU boundary (``vmferry/qemu``) and travel as enums from there.
What vmferry does around QEMU's migration (copy a local disk first, hold the guest at the
switchover until the destination releases the disk) is a :class:`Stage`, never written into
QEMU's status field.

Members are ``StrEnum``s, so their JSON form is QEMU's own spelling.

Example:
    >>> MigrationStatus("postcopy-active").is_postcopy
    True
    >>> RunState.parse("colo")
    <RunState.OTHER: 'other'>
"""

from __future__ import annotations

import enum

__all__ = ["MigrationStatus", "RunState", "Stage"]


class MigrationStatus(enum.StrEnum):
    """QEMU's ``MigrationStatus`` (qapi/migration.json), wire values."""

    NONE = "none"
    SETUP = "setup"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    ACTIVE = "active"
    POSTCOPY_ACTIVE = "postcopy-active"
    POSTCOPY_PAUSED = "postcopy-paused"
    POSTCOPY_RECOVER_SETUP = "postcopy-recover-setup"
    POSTCOPY_RECOVER = "postcopy-recover"
    COMPLETED = "completed"
    FAILED = "failed"
    COLO = "colo"
    PRE_SWITCHOVER = "pre-switchover"
    DEVICE = "device"
    WAIT_UNPLUG = "wait-unplug"
    # Not QEMU's: no QEMU runs the VM on this host (it died, or was never started).
    GONE = "gone"

    @property
    def is_postcopy(self) -> bool:
        """The guest already runs on the destination: the source must never run it again."""
        return self in _POSTCOPY

    @property
    def is_postcopy_broken(self) -> bool:
        """A post-copy paused by a fault, or being resumed after one."""
        return self in _POSTCOPY_RECOVERING

    @property
    def is_precopy_in_flight(self) -> bool:
        """A migration running before the switchover (the source still owns the guest)."""
        return self in _PRECOPY_IN_FLIGHT

    @property
    def is_terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset(
    {MigrationStatus.COMPLETED, MigrationStatus.FAILED, MigrationStatus.CANCELLED}
)
_POSTCOPY_RECOVERING = frozenset(
    {
        MigrationStatus.POSTCOPY_PAUSED,
        MigrationStatus.POSTCOPY_RECOVER_SETUP,
        MigrationStatus.POSTCOPY_RECOVER,
    }
)
_POSTCOPY = frozenset({MigrationStatus.POSTCOPY_ACTIVE, *_POSTCOPY_RECOVERING})
_PRECOPY_IN_FLIGHT = frozenset(
    {
        MigrationStatus.SETUP,
        MigrationStatus.ACTIVE,
        MigrationStatus.PRE_SWITCHOVER,
        MigrationStatus.DEVICE,
        MigrationStatus.WAIT_UNPLUG,
        MigrationStatus.CANCELLING,
    }
)


class RunState(enum.StrEnum):
    """QEMU's ``RunState`` (qapi/run-state.json) as far as vmferry tells them apart."""

    RUNNING = "running"
    PAUSED = "paused"
    POSTMIGRATE = "postmigrate"  # source after a completed migration
    INMIGRATE = "inmigrate"  # destination waiting for (or receiving) the guest
    FINISH_MIGRATE = "finish-migrate"  # source in the stop-and-copy
    PRELAUNCH = "prelaunch"
    SHUTDOWN = "shutdown"
    INTERNAL_ERROR = "internal-error"
    IO_ERROR = "io-error"
    RESTORE_VM = "restore-vm"
    SUSPENDED = "suspended"
    DEBUG = "debug"
    GUEST_PANICKED = "guest-panicked"
    WATCHDOG = "watchdog"
    # Not QEMU's: any other run state, and no QEMU at all.
    OTHER = "other"
    GONE = "gone"

    @classmethod
    def parse(cls, value: str) -> RunState:
        """QEMU's run state string; unknown values become ``OTHER`` rather than an error."""
        try:
            return cls(value)
        except ValueError:
            return cls.OTHER


class Stage(enum.StrEnum):
    """What vmferry's outgoing side is doing, apart from QEMU's migration status."""

    DISK_COPY = "disk-copy"  # a local disk is mirrored; QEMU's RAM migration has not started
    MIGRATION = "migration"  # QEMU migrates RAM (and device state); its status says how far
    DISK_SYNCED = "disk-synced"  # paused at the switchover, disk complete: hand the disk over
