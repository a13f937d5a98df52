"""The vocabulary of one migration's state machine: what it is asked to do, events, actions.

The machine (:mod:`vmferry.core.machine`) takes the frozen *events* below, each the answer of an
agent (or the passing of time), and returns frozen *actions*. An action is either an
:data:`Effect`, which the runner carries out without reporting back (show progress, cancel,
start post-copy), or a :data:`Request`, whose result the runner feeds back as exactly one event.
Every step returns any number of effects followed by exactly one request, so a runner is a loop::

    actions = machine.start(clock.now())
    while not machine.is_done:
        event = await carry_out(actions)          # effects, then the request's answer
        actions = machine.handle(event, clock.now())

Nothing here does I/O or reads a clock: time comes in as :class:`Instant` with every event.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Literal

from vmferry.core.handoff import HandoffVerdict, VerifyMode
from vmferry.core.model import (
    GuestAgentCheck,
    IntegrityReport,
    Mechanism,
    MigrationReport,
    MigrationStats,
)
from vmferry.core.phases import Phase
from vmferry.core.predict import StrategyPrediction
from vmferry.core.recovery import RecoveryPolicy
from vmferry.core.status import MigrationStatus
from vmferry.core.strategy import Goal

__all__ = [
    "AbortDestination",
    "Action",
    "AgentLost",
    "ArrivalFailed",
    "Arrived",
    "Begin",
    "CancelSource",
    "CheckSides",
    "Conclude",
    "DestinationDropped",
    "DestinationFailed",
    "DestinationPrepared",
    "DropDestination",
    "Effect",
    "Event",
    "FinishDestination",
    "HandOverDisk",
    "HandedOff",
    "Handoff",
    "HandoverDone",
    "HandoverFailed",
    "IncomingStatus",
    "Instant",
    "Interrupted",
    "Mode",
    "Move",
    "NotBroken",
    "Notify",
    "Poll",
    "PrepareDestination",
    "Progressed",
    "QueryIncoming",
    "RecoverPostcopy",
    "RecoveryTried",
    "Request",
    "ResumeSource",
    "Side",
    "SidesChecked",
    "SourceOutcome",
    "SourceResumeFailed",
    "SourceResumed",
    "SourceStartFailed",
    "SourceStarted",
    "StartPostcopy",
    "StartSource",
    "Tick",
    "Timing",
    "Wait",
]

Side = Literal["source", "destination"]


class Mode(enum.Enum):
    """``MIGRATE`` runs a move from start to handoff; ``FOLLOW`` attaches to one already in
    flight (``vmferry reconcile``), recovers a broken post-copy, and ends at QEMU's outcome."""

    MIGRATE = "migrate"
    FOLLOW = "follow"


@dataclass(frozen=True, slots=True)
class Instant:
    """A reading of the runner's clock: monotonic seconds and wall-clock milliseconds (the
    guest's heartbeats carry wall-clock times)."""

    mono_s: float
    wall_ms: float


@dataclass(frozen=True, slots=True)
class Timing:
    """The machine's time limits (defaults are the product's; tests may shorten them).

    Attributes:
        poll_wait_s: how long one progress poll waits for new samples.
        postcopy_stall_s: an active post-copy that sent nothing this long, with pages still to
            send, lost its link (a loaded TCG host can be quiet for a second on a good link).
        postcopy_switch_s: how long the switch to post-copy may send nothing before its first
            bytes: QEMU reports ``postcopy-active`` while it still stops the guest, sends the
            discard bitmap and the device state (seconds on a big guest), and a recovery begun
            then fails the migration.
        recovery_grace_s: after a recovery, samples still saying "paused" are ignored this long.
        recovery_call_timeout_s: deadline of a call behind a possibly broken link.
        precopy_stall_s: a pre-copy or disk copy that sent nothing this long is cancelled.
        quiet_check_s: one that sent nothing this long has its sides checked (a dead
            destination QEMU cancels it at once).
        agent_return_s: how long an unreachable agent (being restarted) is waited for.
        agent_retry_s: the pause between calls to an unreachable agent.
        hybrid_switch_iteration: hybrid switches to post-copy after this many dirty syncs.
        compare_s: deadline of hashing and comparing both copies at a handoff.
    """

    poll_wait_s: float = 0.5
    postcopy_stall_s: float = 2.0
    postcopy_switch_s: float = 20.0
    recovery_grace_s: float = 1.0
    recovery_call_timeout_s: float = 3.0
    precopy_stall_s: float = 30.0
    quiet_check_s: float = 5.0
    agent_return_s: float = 60.0
    agent_retry_s: float = 1.0
    hybrid_switch_iteration: int = 2
    compare_s: float = 120.0


@dataclass(frozen=True, slots=True)
class Move:
    """What the machine is asked to do: one VM from ``source`` to ``destination``.

    Attributes:
        uses_postcopy: the QEMUs were set up so post-copy can be started (``auto`` keeps it open).
        prediction: the chosen strategy's prediction (re-planning needs it), if one was made.
        tls: the move was asked for over TLS (the report says what QEMU really used).
        first_attempt: post-copy recovery attempts are numbered from here (agents refuse older
            numbers; a follower starts above any number the original controller used).
        verify: how much of both copies to compare before the destination runs; only a
            destination prepared ``held`` (``MigrationOptions.hold``) can be compared, and only
            when the move ends without post-copy.
    """

    vm: str
    source: str
    destination: str
    strategy: Mechanism
    goal: Goal
    recovery: RecoveryPolicy = field(default_factory=RecoveryPolicy)
    uses_postcopy: bool = False
    prediction: StrategyPrediction | None = None
    tls: bool = False
    mode: Mode = Mode.MIGRATE
    timing: Timing = field(default_factory=Timing)
    first_attempt: int = 1
    verify: VerifyMode = VerifyMode.OFF
    held: bool = False

    @property
    def compares(self) -> bool:
        """Both copies are compared at the handoff (unless post-copy ran)."""
        return self.held and self.verify is not VerifyMode.OFF


@dataclass(frozen=True, slots=True)
class SourceOutcome:
    """How QEMU's migration ended, as the source agent saw it (``last_heartbeat_ms``, wall
    clock, and ``max_gap_ms`` give the guest-felt downtime with the destination's first beat)."""

    status: Literal["completed", "failed", "cancelled"]
    error: str | None = None
    stats: MigrationStats | None = None
    last_heartbeat_ms: float | None = None
    max_gap_ms: int | None = None
    tls: bool = False


# -- events: what happened (each the answer to one request, or the runner's interrupt) ----------


@dataclass(frozen=True, slots=True)
class Begin:
    """The runner starts the machine (not fed through ``handle``; see ``start``)."""


@dataclass(frozen=True, slots=True)
class DestinationPrepared:
    """The destination QEMU listens for the guest."""


@dataclass(frozen=True, slots=True)
class DestinationFailed:
    """The destination could not be prepared (its QEMU died, its agent went away)."""

    error: str


@dataclass(frozen=True, slots=True)
class SourceStarted:
    """The source agent started the outgoing migration."""


@dataclass(frozen=True, slots=True)
class SourceStartFailed:
    error: str


@dataclass(frozen=True, slots=True)
class Progressed:
    """New progress samples from the source (``next_since`` for the next poll), and QEMU's
    outcome once the migration ended."""

    samples: tuple[MigrationStats, ...]
    next_since: int
    outcome: SourceOutcome | None = None


@dataclass(frozen=True, slots=True)
class AgentLost:
    """An agent did not answer (down, restarting, or behind a broken link)."""

    side: Side
    error: str


@dataclass(frozen=True, slots=True)
class IncomingStatus:
    """The destination QEMU's migration status (None: its agent did not answer)."""

    status: MigrationStatus | None


@dataclass(frozen=True, slots=True)
class HandoverDone:
    """The destination released the disk and the source went on with the switchover."""


@dataclass(frozen=True, slots=True)
class HandoverFailed:
    error: str


@dataclass(frozen=True, slots=True)
class NotBroken:
    """Asked to recover a quiet post-copy, the sides found it working, and nothing was paused
    (a pause would fail the migration inside QEMU, which cannot resume it then): the
    destination QEMU had not started the guest yet (QEMU still inside its switch: loading the
    device state, placing the first pages), or the source's link to it still carries the
    stream or has nothing left to carry (a source that sent every page waits for its
    destination to finish). ``why`` says which."""

    why: str


@dataclass(frozen=True, slots=True)
class RecoveryTried:
    """One post-copy recovery attempt: ``ok`` when the post-copy runs (or completed) again."""

    ok: bool
    error: str | None = None


@dataclass(frozen=True, slots=True)
class SidesChecked:
    """Whether each side's QEMU died (its agent reports the VM stopped); unknown is not dead."""

    source_dead: bool
    destination_dead: bool


@dataclass(frozen=True, slots=True)
class Arrived:
    """The guest runs on the destination: the lab guest's first heartbeat there (wall ms) and
    its page check; a user's guest's agent answer."""

    first_heartbeat_ms: float | None
    integrity: IntegrityReport | None
    guest_agent: GuestAgentCheck | None = None


@dataclass(frozen=True, slots=True)
class ArrivalFailed:
    error: str


@dataclass(frozen=True, slots=True)
class DestinationDropped:
    """A destination copy that never ran the guest was removed (``ok``), or was kept."""

    ok: bool


@dataclass(frozen=True, slots=True)
class SourceResumed:
    """The source runs the guest again, checked (the lab guest by its own page check)."""

    integrity: IntegrityReport | None


@dataclass(frozen=True, slots=True)
class SourceResumeFailed:
    error: str


@dataclass(frozen=True, slots=True)
class HandedOff:
    """The source ended its QEMU (``error`` when it could not)."""

    error: str | None = None


@dataclass(frozen=True, slots=True)
class CopiesCompared:
    """Both stopped copies were hashed and compared."""

    verdict: HandoffVerdict


@dataclass(frozen=True, slots=True)
class CompareFailed:
    """The copies could not be compared (an agent could not read its copy, or was away)."""

    error: str


@dataclass(frozen=True, slots=True)
class Tick:
    """A :class:`Wait` is over."""


@dataclass(frozen=True, slots=True)
class Interrupted:
    """The user (or a deadline around the runner) interrupted the move."""


Event = (
    DestinationPrepared
    | DestinationFailed
    | SourceStarted
    | SourceStartFailed
    | Progressed
    | AgentLost
    | IncomingStatus
    | HandoverDone
    | HandoverFailed
    | RecoveryTried
    | NotBroken
    | SidesChecked
    | Arrived
    | ArrivalFailed
    | DestinationDropped
    | SourceResumed
    | SourceResumeFailed
    | HandedOff
    | CopiesCompared
    | CompareFailed
    | Tick
    | Interrupted
)


# -- effects: carried out, nothing reported back ------------------------------------------------


@dataclass(frozen=True, slots=True)
class Notify:
    """Show progress (the CLI's progress line)."""

    phase: Phase
    stats: MigrationStats | None


@dataclass(frozen=True, slots=True)
class StartPostcopy:
    """Switch the running pre-copy to post-copy."""


@dataclass(frozen=True, slots=True)
class CancelSource:
    """Cancel the outgoing migration; the guest runs on at the source."""


@dataclass(frozen=True, slots=True)
class AbortDestination:
    """Remove the destination copy (it never received the guest)."""


Effect = Notify | StartPostcopy | CancelSource | AbortDestination


# -- requests: each answered by one event ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PrepareDestination:
    """-> DestinationPrepared | DestinationFailed (a refusal of bad input is raised instead)."""


@dataclass(frozen=True, slots=True)
class StartSource:
    """-> SourceStarted | SourceStartFailed."""


@dataclass(frozen=True, slots=True)
class Poll:
    """-> Progressed | AgentLost("source")."""

    since: int
    wait_s: float
    timeout_s: float | None = None


@dataclass(frozen=True, slots=True)
class Wait:
    """-> Tick after ``seconds``."""

    seconds: float


@dataclass(frozen=True, slots=True)
class HandOverDisk:
    """Destination drops its disk export, then the source finishes the switchover.
    -> HandoverDone | HandoverFailed."""


@dataclass(frozen=True, slots=True)
class RecoverPostcopy:
    """One recovery attempt: pause both sides (OOB commands only), the destination listens
    again, the source resumes to it. -> RecoveryTried; NotBroken (nothing paused) when the
    destination has not started the guest yet or the source's link still works."""

    attempt: int
    timeout_s: float


@dataclass(frozen=True, slots=True)
class CheckSides:
    """-> SidesChecked."""

    timeout_s: float


@dataclass(frozen=True, slots=True)
class QueryIncoming:
    """-> IncomingStatus."""

    timeout_s: float


@dataclass(frozen=True, slots=True)
class CompareCopies:
    """Hash both stopped copies (RAM, and a local disk) and compare them. -> CopiesCompared |
    CompareFailed."""

    mode: VerifyMode
    timeout_s: float


@dataclass(frozen=True, slots=True)
class FinishDestination:
    """Start the guest on the destination and check it. -> Arrived | ArrivalFailed |
    AgentLost("destination")."""


@dataclass(frozen=True, slots=True)
class DropDestination:
    """Remove a destination that never ran the guest. -> DestinationDropped."""


@dataclass(frozen=True, slots=True)
class ResumeSource:
    """Run the guest again on a completed source, and check it. -> SourceResumed |
    SourceResumeFailed."""


@dataclass(frozen=True, slots=True)
class Handoff:
    """The source ends its QEMU. -> HandedOff."""


@dataclass(frozen=True, slots=True)
class Conclude:
    """The move is over: record and return ``report``. Nothing follows."""

    report: MigrationReport


Request = (
    PrepareDestination
    | StartSource
    | Poll
    | Wait
    | HandOverDisk
    | RecoverPostcopy
    | CheckSides
    | QueryIncoming
    | CompareCopies
    | FinishDestination
    | DropDestination
    | ResumeSource
    | Handoff
    | Conclude
)
Action = Effect | Request
