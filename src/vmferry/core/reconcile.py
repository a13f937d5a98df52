"""Deciding what to do with a VM whose migration was left half done (pure; no I/O).

After a crash of an agent, of the controller, or of a QEMU, a VM may be known to more than one
host: a source that completed and waits for its hand-off, a destination that never received
the guest, a record of a QEMU that died. :func:`decide` looks at every host's copy of one VM,
as the agents report them, and says which steps bring it back to exactly one running copy,
without ever starting a second one:

- a copy in flight (``migrating``) is waited for first: someone may still drive it;
- with one running copy, the rest goes: unfinished destinations dropped, completed sources
  handed off, records of dead QEMUs forgotten;
- with none running, a completed source and its destination: the destination is finished
  (started, checked), then the source handed off;
- a completed source whose destination copy is gone: the source takes the guest back (its
  agent refuses if post-copy had started: then the guest is lost);
- a destination whose source is gone: finished if it received everything, else lost;
- two running copies: a conflict no rule may resolve by guessing.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Copy", "Decision", "Step", "StepKind", "Verdict", "decide"]


@dataclass(frozen=True, slots=True)
class Copy:
    """One host's copy of a VM, as its agent reports it."""

    host: str
    state: str  # running | incoming | migrating | migrated | stopped


class StepKind(enum.Enum):
    WAIT = "wait"  # a migration in flight: wait for its outcome, then decide again
    FINISH = "finish"  # a destination that received the guest: make sure it runs, verify
    HANDOFF = "handoff"  # a completed source: end its QEMU
    ABORT = "abort"  # a destination that will not receive the guest: drop it
    RESUME = "resume"  # a completed source whose destination copy is gone: run it again
    FORGET = "forget"  # the record of a QEMU that died: drop it


@dataclass(frozen=True, slots=True)
class Step:
    kind: StepKind
    host: str

    def __str__(self) -> str:
        return f"{self.kind.value} on {self.host}"


class Verdict(enum.Enum):
    OK = "ok"  # exactly one copy runs, nothing else is left
    SETTLE = "settle"  # the steps make it so
    IN_FLIGHT = "in-flight"  # wait for the migration, then decide again
    LOST = "lost"  # no copy runs and none can: say so
    CONFLICT = "conflict"  # needs a human (e.g. two running copies)


@dataclass(frozen=True, slots=True)
class Decision:
    vm: str
    verdict: Verdict
    steps: tuple[Step, ...]
    reason: str
    running_on: str | None = None  # the host with the one running copy, if there is one


def decide(vm: str, copies: Iterable[Copy]) -> Decision:
    """What to do with VM ``vm`` given every host's copy of it (see the module's rules)."""
    by_state: dict[str, list[str]] = {}
    for copy in copies:
        by_state.setdefault(copy.state, []).append(copy.host)
    running = by_state.get("running", [])
    incoming = by_state.get("incoming", [])
    migrating = by_state.get("migrating", [])
    migrated = by_state.get("migrated", [])
    stopped = by_state.get("stopped", [])
    forget = tuple(Step(StepKind.FORGET, host) for host in stopped)

    if len(running) > 1:
        return Decision(
            vm, Verdict.CONFLICT, (), f"runs on {' and '.join(running)}: nothing is touched"
        )
    if migrating:
        steps = tuple(Step(StepKind.WAIT, host) for host in migrating)
        return Decision(vm, Verdict.IN_FLIGHT, steps, f"migrating from {', '.join(migrating)}")
    if running:
        steps = (
            *(Step(StepKind.ABORT, host) for host in incoming),
            *(Step(StepKind.HANDOFF, host) for host in migrated),
            *forget,
        )
        if not steps:
            return Decision(vm, Verdict.OK, (), f"runs on {running[0]}", running[0])
        return Decision(
            vm, Verdict.SETTLE, steps, f"runs on {running[0]}; leftovers elsewhere", running[0]
        )
    if len(incoming) > 1 or len(migrated) > 1:
        return Decision(
            vm,
            Verdict.CONFLICT,
            (),
            f"several destinations ({', '.join(incoming)}) or sources ({', '.join(migrated)})",
        )
    if migrated and incoming:
        steps = (Step(StepKind.FINISH, incoming[0]), Step(StepKind.HANDOFF, migrated[0]), *forget)
        return Decision(
            vm,
            Verdict.SETTLE,
            steps,
            f"migration {migrated[0]} -> {incoming[0]} completed but was not finished",
        )
    if migrated:
        return Decision(
            vm,
            Verdict.SETTLE,
            (Step(StepKind.RESUME, migrated[0]), *forget),
            f"{migrated[0]} completed a migration whose destination copy is gone",
        )
    if incoming:
        return Decision(
            vm,
            Verdict.SETTLE,
            (Step(StepKind.FINISH, incoming[0]), *forget),
            f"{incoming[0]} holds an incoming copy whose source is gone",
        )
    hosts = ", ".join(stopped)
    return Decision(vm, Verdict.LOST, (), f"its QEMU died on {hosts}; it runs nowhere")
