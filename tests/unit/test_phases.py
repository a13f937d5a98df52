"""Migration phase transitions."""

from __future__ import annotations

import pytest

from vmferry.core.errors import StateError
from vmferry.core.phases import (
    Cancelled,
    DestinationReady,
    Failed,
    Phase,
    QemuStatus,
    Verified,
    transition,
)


def _run(*events: object) -> list[Phase]:
    phase = Phase.PREPARING
    seen = [phase]
    for event in events:
        phase = transition(phase, event)  # type: ignore[arg-type]
        seen.append(phase)
    return seen


def test_happy_path_sequence() -> None:
    assert _run(
        DestinationReady(),
        QemuStatus("setup"),
        QemuStatus("active"),
        QemuStatus("active"),
        QemuStatus("device"),
        QemuStatus("completed"),
        Verified(),
    ) == [
        Phase.PREPARING,
        Phase.SETUP,
        Phase.SETUP,
        Phase.ACTIVE,
        Phase.ACTIVE,
        Phase.SWITCHOVER,
        Phase.COMPLETED,
        Phase.DONE,
    ]


@pytest.mark.parametrize(
    ("start", "event", "expected"),
    [
        (Phase.ACTIVE, QemuStatus("failed"), Phase.FAILED),
        (Phase.ACTIVE, QemuStatus("cancelling"), Phase.CANCELLING),
        (Phase.CANCELLING, QemuStatus("cancelled"), Phase.CANCELLED),
        (Phase.ACTIVE, Cancelled(), Phase.CANCELLING),
        (Phase.PREPARING, Cancelled(), Phase.CANCELLED),
        (Phase.SWITCHOVER, Failed("dst died"), Phase.FAILED),
        (Phase.ACTIVE, QemuStatus("postcopy-active"), Phase.POSTCOPY),
    ],
)
def test_transitions(start: Phase, event: object, expected: Phase) -> None:
    assert transition(start, event) is expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("start", "event"),
    [
        (Phase.DONE, QemuStatus("active")),
        (Phase.FAILED, Verified()),
        (Phase.ACTIVE, Verified()),
        (Phase.SWITCHOVER, QemuStatus("active")),
        (Phase.COMPLETED, Cancelled()),
        (Phase.POSTCOPY, Cancelled()),
        (Phase.SETUP, DestinationReady()),
        (Phase.ACTIVE, QemuStatus("no-such-status")),
    ],
)
def test_rejected_transitions(start: Phase, event: object) -> None:
    with pytest.raises(StateError):
        transition(start, event)  # type: ignore[arg-type]
