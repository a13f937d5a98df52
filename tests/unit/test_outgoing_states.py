"""The outgoing migration's lifecycle table: allowed and refused moves."""

from __future__ import annotations

import pytest

from vmferry.core.errors import StateError
from vmferry.core.outgoing import OutgoingState as S
from vmferry.core.outgoing import advance


@pytest.mark.parametrize(
    ("current", "target"),
    [
        (S.DISK_COPY, S.RAM),
        (S.RAM, S.SYNCED),
        (S.SYNCED, S.RAM),  # the go-ahead
        (S.SYNCED, S.CANCELLING),
        (S.RAM, S.POSTCOPY),
        (S.CANCELLING, S.POSTCOPY),  # a cancel that lost the race to post-copy
        (S.CANCELLING, S.COMPLETED),  # ... or to completion
        (S.POSTCOPY, S.COMPLETED),
        (S.POSTCOPY, S.HANDED_OVER),
        (S.RAM, S.RETURNED),
        (S.POSTCOPY, S.POSTCOPY),
    ],
)
def test_allowed(current: S, target: S) -> None:
    assert advance(current, target) is target


@pytest.mark.parametrize(
    ("current", "target"),
    [
        (S.POSTCOPY, S.RETURNED),  # the destination ran the guest: never take it back
        (S.POSTCOPY, S.RAM),
        (S.COMPLETED, S.RETURNED),
        (S.RETURNED, S.RAM),
        (S.DISK_COPY, S.SYNCED),
        (S.LOST, S.COMPLETED),
    ],
)
def test_refused(current: S, target: S) -> None:
    with pytest.raises(StateError):
        advance(current, target)


def test_vm_states() -> None:
    assert {s.vm_state for s in S} == {"migrating", "migrated", "running", "stopped"}
    assert S.POSTCOPY.vm_state == "migrating"
    assert S.COMPLETED.vm_state == S.HANDED_OVER.vm_state == "migrated"
    assert [s for s in S if s.is_final] == [
        S.COMPLETED, S.HANDED_OVER, S.RETURNED, S.LOST, S.UNANSWERED
    ]  # fmt: skip
