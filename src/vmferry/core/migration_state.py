"""The migration state machine's states (:mod:`vmferry.core.machine`), each with its own data.

A move is in exactly one of these; what it knows travels with it (no flags beside the state).
"""

from __future__ import annotations

from dataclasses import dataclass

from vmferry.core.handoff import HandoffVerdict
from vmferry.core.migration import Arrived, SourceOutcome, Timing
from vmferry.core.model import MigrationReport, MigrationStats
from vmferry.core.phases import Phase
from vmferry.core.status import MigrationStatus, Stage
from vmferry.core.strategy import Progress

# QEMU statuses in which a copy that sends nothing is checked on, then cancelled.
_STALLABLE = frozenset({MigrationStatus.SETUP, MigrationStatus.ACTIVE, MigrationStatus.DEVICE})

__all__ = [
    "Arriving",
    "Cancelling",
    "Comparing",
    "Concluding",
    "Copying",
    "Done",
    "Dropping",
    "Flow",
    "HandingOff",
    "Postcopy",
    "Precopy",
    "Preparing",
    "Recovering",
    "Resuming",
    "Starting",
    "State",
    "Winding",
    "is_postcopy",
]


@dataclass(frozen=True, slots=True)
class Flow:
    """What the machine knows while the migration runs (every copying state carries one).

    Attributes:
        since: the next progress poll's cursor.
        progress: samples for re-planning (elapsed counted from before the disk copy).
        disk_ms: how long the disk copy took (QEMU's clock starts after it).
        progress_at_s: when the sent byte count (RAM or disk) last grew.
        attempt: the number of the next post-copy recovery attempt.
        postcopy_from_bytes: the sent byte count at the first post-copy sample (None before).
        quiet_waits: times a recovery found the quiet post-copy not broken (``NotBroken``).
    """

    phase: Phase
    progress_at_s: float
    attempt: int
    since: int = 0
    last: MigrationStats | None = None
    progress: tuple[Progress, ...] = ()
    disk_ms: int = 0
    sent_bytes: int = -1
    disk_sent_bytes: int = -1
    recoveries: int = 0
    postcopy_from_bytes: int | None = None
    quiet_waits: int = 0

    def quiet_s(self, now_s: float) -> float:
        """How long a pre-copy or disk copy has sent nothing (0 where silence is normal)."""
        last = self.last
        if last is None:
            return 0.0
        copying = last.stage is Stage.DISK_COPY or (
            last.stage is Stage.MIGRATION and last.status in _STALLABLE
        )
        return now_s - self.progress_at_s if copying else 0.0

    @property
    def postcopy_moving(self) -> bool:
        """Post-copy sent bytes since its first sample: the switch is over."""
        return self.postcopy_from_bytes is not None and self.sent_bytes > self.postcopy_from_bytes

    def is_broken(self, now_s: float, timing: Timing) -> bool:
        """A post-copy paused by a fault, or an active one that sent nothing for
        ``postcopy_stall_s`` while pages were left to send (it lost its link; with every page
        sent, the source only waits for the destination to finish). Before its first bytes
        the switch itself may be quiet for ``postcopy_switch_s``."""
        quiet_s = timing.postcopy_stall_s if self.postcopy_moving else timing.postcopy_switch_s
        stalled = (
            self.last is not None
            and self.last.status == MigrationStatus.POSTCOPY_ACTIVE
            and self.last.remaining_bytes > 0
            and now_s - self.progress_at_s >= quiet_s
        )
        return stalled or self.is_postcopy_broken

    @property
    def is_postcopy_broken(self) -> bool:
        """The last sample says a post-copy is paused by a fault (or being resumed)."""
        return self.last is not None and self.last.status.is_postcopy_broken


@dataclass(frozen=True, slots=True)
class Preparing:
    """The destination is being started."""


@dataclass(frozen=True, slots=True)
class Starting:
    """The source is being asked to start the migration."""


@dataclass(frozen=True, slots=True)
class Precopy:
    """Before post-copy: the source owns the guest.

    Attributes:
        handed_over: the disk was handed over at the switchover (QEMU may still report the
            synced pause once more afterwards).
        switch_requested: post-copy was asked for (re-plan or hybrid); QEMU has not said so yet.
        away_since_s: since when the source agent does not answer.
        handing_over: a disk handover is in flight.
        checking: the sides are being checked for a dead QEMU (the copy went quiet).
        checked_at_s: the progress mark of the last such check (one check per quiet spell).
    """

    flow: Flow
    handed_over: bool = False
    switch_requested: bool = False
    away_since_s: float | None = None
    handing_over: bool = False
    checking: bool = False
    checked_at_s: float | None = None


@dataclass(frozen=True, slots=True)
class Cancelling:
    """Cancel sent (stall, re-plan, failed handover): waiting for QEMU's outcome."""

    flow: Flow
    reason: str
    away_since_s: float | None = None


@dataclass(frozen=True, slots=True)
class Postcopy:
    """The destination runs the guest and pulls what it lacks: never remove it.

    Attributes:
        grace_until_s: samples from before a recovery still say "paused": ignore until then.
        asking_destination: the source agent is away; the destination's QEMU is being asked.
    """

    flow: Flow
    grace_until_s: float = 0.0
    asking_destination: bool = False

    def is_broken(self, now_s: float, timing: Timing) -> bool:
        return now_s >= self.grace_until_s and self.flow.is_broken(now_s, timing)


@dataclass(frozen=True, slots=True)
class Recovering:
    """A broken post-copy is being recovered: attempts with backoff until ``recovery.limit_s``.

    Attributes:
        began_s: when the post-copy was found broken.
        failed: attempts that failed so far.
        checking: the sides are being checked for a dead QEMU after a failed attempt.
    """

    flow: Flow
    began_s: float
    failed: int = 0
    checking: bool = False


@dataclass(frozen=True, slots=True)
class Winding:
    """Interrupted: no new decisions; follow QEMU to its outcome, then end the move cleanly."""

    flow: Flow
    postcopy: bool


@dataclass(frozen=True, slots=True)
class Concluding:
    """QEMU's migration failed: the sides are checked before the report says what is left."""

    flow: Flow
    outcome: SourceOutcome
    postcopy: bool
    reason: str | None


@dataclass(frozen=True, slots=True)
class Arriving:
    """QEMU completed: the guest is being started and checked on the destination."""

    flow: Flow
    outcome: SourceOutcome
    final: MigrationStats | None
    completed_wall_ms: float
    postcopy: bool
    away_since_s: float | None = None
    # What comparing both copies found (None: the move did not compare them).
    handoff: HandoffVerdict | None = None


@dataclass(frozen=True, slots=True)
class Comparing:
    """QEMU completed a pre-copy; both copies are stopped and being compared before the
    destination's runs."""

    arriving: Arriving


@dataclass(frozen=True, slots=True)
class Dropping:
    """The guest did not start on the destination: removing that copy (it never ran it)."""

    arriving: Arriving
    error: str


@dataclass(frozen=True, slots=True)
class Resuming:
    """Taking the guest back on the completed source."""

    arriving: Arriving
    error: str


@dataclass(frozen=True, slots=True)
class HandingOff:
    """The guest runs on the destination; the source ends its QEMU."""

    arriving: Arriving
    arrived: Arrived


@dataclass(frozen=True, slots=True)
class Done:
    report: MigrationReport


State = (
    Preparing
    | Comparing
    | Starting
    | Precopy
    | Cancelling
    | Postcopy
    | Recovering
    | Winding
    | Concluding
    | Arriving
    | Dropping
    | Resuming
    | HandingOff
    | Done
)
Copying = Precopy | Cancelling | Postcopy


def is_postcopy(state: State) -> bool:
    """Once any sample said post-copy, the destination owns the guest for good."""
    return isinstance(state, Postcopy) or (isinstance(state, Winding) and state.postcopy)
