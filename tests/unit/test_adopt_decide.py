"""Adoption's decision as a table: QEMU's run state, migration status, mirror and markers in,
how the agent settles the VM out (no QEMU, no event loop)."""

from __future__ import annotations

import pytest

from vmferry.core.adoption import AdoptionFacts, Decision, Settle, after_cancel, decide
from vmferry.core.outgoing import OutgoingState as S
from vmferry.core.status import MigrationStatus as M
from vmferry.core.status import RunState as R

FOLLOW = Decision(Settle.FOLLOW, S.POSTCOPY)


@pytest.mark.parametrize(
    ("run", "migration", "mirror", "incoming", "postcopy", "expected"),
    [
        # A destination stays incoming, by marker or by QEMU's own run state.
        (R.INMIGRATE, M.NONE, False, False, False, Decision(Settle.INCOMING, None)),
        (R.RUNNING, M.COMPLETED, False, True, False, Decision(Settle.INCOMING, None)),
        (R.RUNNING, M.POSTCOPY_ACTIVE, False, True, False, Decision(Settle.INCOMING, None)),
        # A post-copy in flight (even paused or recovering) is followed, never resumed here.
        (R.POSTMIGRATE, M.POSTCOPY_ACTIVE, False, False, False, FOLLOW),
        (R.POSTMIGRATE, M.POSTCOPY_PAUSED, False, False, True, FOLLOW),
        (R.POSTMIGRATE, M.POSTCOPY_RECOVER, False, False, False, FOLLOW),
        # Completed: migrated.
        (R.POSTMIGRATE, M.COMPLETED, False, False, False, Decision(Settle.COMPLETED, S.COMPLETED)),
        # An orphaned pre-copy: cancel it (and resume the guest here).
        (
            R.RUNNING, M.ACTIVE, False, False, False,
            Decision(Settle.CANCEL, S.CANCELLING, resume=True, cancel_migration=True),
        ),
        (
            R.PAUSED, M.PRE_SWITCHOVER, True, False, False,
            Decision(Settle.CANCEL, S.CANCELLING, resume=True, cancel_migration=True),
        ),
        # Only a disk mirror left: abort it, nothing to cancel in QEMU's migration.
        (
            R.RUNNING, M.NONE, True, False, False,
            Decision(Settle.CANCEL, S.CANCELLING, resume=True, cancel_migration=False),
        ),
        # Handed over with an unknown end: never resumed.
        (R.POSTMIGRATE, M.FAILED, False, False, False, Decision(Settle.HANDED_OVER, S.HANDED_OVER)),
        (R.PAUSED, M.FAILED, False, False, True, Decision(Settle.HANDED_OVER, S.HANDED_OVER)),
        # Paused by a migration that failed or was cancelled: run on here.
        (R.PAUSED, M.CANCELLED, False, False, False, Decision(Settle.RESUME, S.RETURNED, True)),
        (R.PAUSED, M.NONE, False, False, False, Decision(Settle.RESUME, S.RETURNED, True)),
        # Nothing in flight.
        (R.RUNNING, M.NONE, False, False, False, Decision(Settle.KEEP, None)),
        (R.RUNNING, M.CANCELLED, False, False, False, Decision(Settle.KEEP, None)),
    ],
)  # fmt: skip
def test_decide(
    run: R, migration: M, mirror: bool, incoming: bool, postcopy: bool, expected: Decision
) -> None:
    assert decide(AdoptionFacts(run, migration, mirror, incoming, postcopy)) == expected


@pytest.mark.parametrize(
    ("resume", "final", "expected"),
    [
        (True, M.COMPLETED, Decision(Settle.COMPLETED, S.COMPLETED)),  # the cancel lost the race
        (True, M.CANCELLED, Decision(Settle.RESUME, S.RETURNED, resume=True)),
        (True, M.FAILED, Decision(Settle.RESUME, S.RETURNED, resume=True)),
        (True, M.NONE, Decision(Settle.RESUME, S.RETURNED, resume=True)),
        (False, M.CANCELLED, Decision(Settle.HANDED_OVER, S.HANDED_OVER)),
    ],
)
def test_after_cancel(resume: bool, final: M, expected: Decision) -> None:
    cancel = Decision(Settle.CANCEL, S.CANCELLING, resume=resume, cancel_migration=True)
    assert after_cancel(cancel, final) == expected


def test_every_decision_moves_an_outgoing_migration_legally() -> None:
    """Whatever a failed task's settle decides, the record can take it from any live state
    that could have produced those facts."""
    from vmferry.core.outgoing import advance

    live = [S.DISK_COPY, S.RAM, S.SYNCED, S.CANCELLING]
    for run in R:
        for migration in M:
            decision = decide(AdoptionFacts(run, migration, False, False, False))
            if decision.outgoing is None or decision.outgoing is S.POSTCOPY:
                continue
            for state in live:
                assert advance(state, decision.outgoing) is decision.outgoing
