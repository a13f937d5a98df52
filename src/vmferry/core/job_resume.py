"""What resuming a job whose controller died does with each of its recorded moves (pure; no I/O).

A job of many moves records each move as ``waiting``, ``running``, ``completed`` or
``failed``. A controller killed mid-job leaves moves recorded ``running`` whose migrations
went on, ended or were left half done on the agents. Resuming the job looks at every host's
copy of each recorded VM (as :func:`vmferry.core.reconcile.decide` does) and gives each move
a :class:`Fate`:

- ``settle``: a copy is in flight or half done (held destination, completed source, record
  of a dead QEMU): ``reconcile`` settles it first, then the move is looked at again;
- ``moved``: one running copy, where the job wants it (off the emptied host; on the host VMs
  are brought back to; for a balance, off the move's source): the move is done, whatever its
  record said;
- ``again``: one running copy, still where the job takes it from: it is planned again;
- ``gone``: no host knows the VM (deleted meanwhile): nothing to move;
- ``lost``: no copy runs and none can, or two run (a conflict ``reconcile`` leaves to a
  human): the job cannot finish this move.

The record of each move then says where it ended up (:attr:`Resolution.record_state`).

Example::

    resolve_moves("evacuate", "h1", [RecordedMove("a", "h1", "h2", "running")],
                  {"a": [Copy("h1", "migrated"), Copy("h2", "incoming")]})
    # -> [Resolution("a", Fate.SETTLE, ...)]: reconcile finishes it on h2, then "moved"
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from vmferry.core.reconcile import Copy, Verdict, decide

__all__ = [
    "BRING_BACK",
    "EMPTYING_KINDS",
    "MOVE_STATES",
    "Fate",
    "RecordedMove",
    "Resolution",
    "given_up",
    "job_outcome",
    "resolve_move",
    "resolve_moves",
]

# Jobs that empty their host; the job that brings VMs back to its host. Any other kind (a
# balance) wants each VM off its move's source.
EMPTYING_KINDS = frozenset({"evacuate", "maintenance-enter"})
BRING_BACK = "bring-back"
# What a job's record says of one of its moves.
MOVE_STATES = ("waiting", "running", "completed", "failed", "gone")


class Fate(enum.Enum):
    SETTLE = "settle"
    MOVED = "moved"
    AGAIN = "again"
    GONE = "gone"
    LOST = "lost"


@dataclass(frozen=True, slots=True)
class RecordedMove:
    """A move as a job's record has it."""

    vm: str
    source: str
    destination: str
    state: str


@dataclass(frozen=True, slots=True)
class Resolution:
    """What becomes of one recorded move.

    Attributes:
        fate: see :class:`Fate`.
        reason: why, in words.
        running_on: the host with the one running copy, if one runs.
        record_state: what the move's record becomes (None: unchanged, or not yet: settling).
    """

    vm: str
    fate: Fate
    reason: str
    running_on: str | None
    record_state: str | None

    def to_json(self) -> dict[str, object]:
        return {
            "vm": self.vm,
            "fate": self.fate.value,
            "reason": self.reason,
            "running_on": self.running_on,
            "record_state": self.record_state,
        }


def _is_there(kind: str, host: str, move: RecordedMove, running_on: str) -> bool:
    """Whether a VM running on ``running_on`` is where a ``kind`` job about ``host`` wants it:
    off the host it empties, on the host VMs are brought back to, else (a balance) off the
    move's source."""
    if kind in EMPTYING_KINDS:
        return running_on != host
    if kind == BRING_BACK:
        return running_on == host
    return running_on != move.source


def _changed(recorded: str, new: str) -> str | None:
    return None if recorded == new else new


def resolve_move(kind: str, host: str, move: RecordedMove, copies: Sequence[Copy]) -> Resolution:
    """The fate of ``move`` of a ``kind`` job about ``host``, given every host's copy of its VM."""
    if not copies:
        return Resolution(
            move.vm, Fate.GONE, "no host has it (deleted?)", None, _changed(move.state, "gone")
        )
    decision = decide(move.vm, copies)
    if decision.verdict in (Verdict.SETTLE, Verdict.IN_FLIGHT):
        return Resolution(move.vm, Fate.SETTLE, decision.reason, decision.running_on, None)
    if decision.verdict is not Verdict.OK or decision.running_on is None:
        return Resolution(move.vm, Fate.LOST, decision.reason, None, _changed(move.state, "failed"))
    on = decision.running_on
    if _is_there(kind, host, move, on):
        why = f"runs on {on}" + (
            "" if on == move.destination else f" (planned: {move.destination})"
        )
        return Resolution(move.vm, Fate.MOVED, why, on, _changed(move.state, "completed"))
    return Resolution(
        move.vm,
        Fate.AGAIN,
        f"still runs on {on}: planned again",
        on,
        _changed(move.state, "waiting"),
    )


def resolve_moves(
    kind: str,
    host: str,
    moves: Sequence[RecordedMove],
    copies: Mapping[str, Sequence[Copy]],
) -> list[Resolution]:
    """:func:`resolve_move` for every recorded move (``copies``: by VM, as the agents list
    them; a VM no agent lists has none)."""
    return [resolve_move(kind, host, m, copies.get(m.vm, ())) for m in moves]


def given_up(resolution: Resolution, reason: str) -> Resolution:
    """``resolution`` of a move ``reconcile`` could not settle and will not (the guest lost, or
    a conflict it leaves to a human): the job cannot finish it."""
    return Resolution(resolution.vm, Fate.LOST, reason, None, "failed")


def job_outcome(states: Sequence[str]) -> str:
    """The state a job ends in, from its moves' recorded states: ``completed`` when every move
    completed (or its VM is gone), else ``failed``."""
    return "completed" if all(s in ("completed", "gone") for s in states) else "failed"
