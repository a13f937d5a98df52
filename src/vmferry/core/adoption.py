"""What to do with a VM whose migration no one follows any more (pure).

A restarted agent finds its QEMUs still running; a failed migration task leaves its QEMU in
an unknown state. Either way the agent reads what QEMU itself reports (run state, migration
status, whether a disk mirror job exists) and the marker files it keeps, and :func:`decide`
says how to settle it, so that no guest stays paused with no one to steer it. The agent
(:mod:`vmferry.agent.adopt`) carries the decision out.

Example:
    >>> facts = AdoptionFacts(RunState.POSTMIGRATE, MigrationStatus.COMPLETED, False, False, False)
    >>> decide(facts).step
    <Settle.COMPLETED: 'completed'>
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from vmferry.core.outgoing import OutgoingState
from vmferry.core.status import MigrationStatus, RunState

__all__ = ["AdoptionFacts", "Decision", "Settle", "after_cancel", "decide"]


@dataclass(frozen=True, slots=True)
class AdoptionFacts:
    """What QEMU and the VM's directory say.

    Attributes:
        run_state: QEMU's run state.
        migration: QEMU's migration status.
        mirror_active: a disk mirror job exists.
        incoming_marker: this host is the destination of an unfinished migration.
        postcopy_marker: this source's migration entered post-copy (never resume it).
    """

    run_state: RunState
    migration: MigrationStatus
    mirror_active: bool
    incoming_marker: bool
    postcopy_marker: bool


class Settle(enum.Enum):
    """The step that settles the VM."""

    INCOMING = "incoming"  # a destination: stays incoming (the controller or reconcile ends it)
    FOLLOW = "follow"  # a post-copy in flight: follow it to its end (mark it post-copy first)
    COMPLETED = "completed"  # migrated: the outcome is QEMU's final sample
    CANCEL = "cancel"  # an orphaned pre-copy or disk mirror: cancel, then see after_cancel
    HANDED_OVER = "handed-over"  # the guest left, the end is unknown: failed, never resumed
    RESUME = "resume"  # paused by a migration that ended: run on here (outcome failed)
    KEEP = "keep"  # nothing was in flight


@dataclass(frozen=True, slots=True)
class Decision:
    """How to settle one VM.

    Attributes:
        step: what to do.
        outgoing: the outgoing migration's state afterwards (None: no outgoing migration,
            i.e. a destination, or nothing was in flight).
        resume: run the guest here (False when a post-copy marker forbids it).
        cancel_migration: for CANCEL: QEMU's migration is in flight and must be cancelled
            (else only the disk mirror is left to abort).
    """

    step: Settle
    outgoing: OutgoingState | None
    resume: bool = False
    cancel_migration: bool = False


def decide(facts: AdoptionFacts) -> Decision:
    """How to settle a VM found in the state ``facts`` describe."""
    migration, run_state = facts.migration, facts.run_state
    if facts.incoming_marker or run_state is RunState.INMIGRATE:
        return Decision(Settle.INCOMING, None)
    if migration.is_postcopy:
        return Decision(Settle.FOLLOW, OutgoingState.POSTCOPY)
    if migration is MigrationStatus.COMPLETED and run_state is RunState.POSTMIGRATE:
        return Decision(Settle.COMPLETED, OutgoingState.COMPLETED)
    if migration.is_precopy_in_flight or facts.mirror_active:
        return Decision(
            Settle.CANCEL,
            OutgoingState.CANCELLING,
            resume=not facts.postcopy_marker,
            cancel_migration=migration.is_precopy_in_flight,
        )
    if run_state is RunState.POSTMIGRATE or facts.postcopy_marker:
        # Handed over (a post-copy that failed in QEMU, or an unknown end).
        return Decision(Settle.HANDED_OVER, OutgoingState.HANDED_OVER)
    if run_state is not RunState.RUNNING:
        # Paused by a migration that failed or was cancelled while no agent watched.
        return Decision(Settle.RESUME, OutgoingState.RETURNED, resume=True)
    return Decision(Settle.KEEP, None)


def after_cancel(decision: Decision, final: MigrationStatus) -> Decision:
    """The step after a CANCEL decision's cancel ended with QEMU status ``final``: the
    switchover may have won the race (the guest left), else the guest runs on here."""
    if final is MigrationStatus.COMPLETED:
        return Decision(Settle.COMPLETED, OutgoingState.COMPLETED)
    if not decision.resume:  # a post-copy marker: the guest left once, never run it here
        return Decision(Settle.HANDED_OVER, OutgoingState.HANDED_OVER)
    return Decision(Settle.RESUME, OutgoingState.RETURNED, resume=True)
