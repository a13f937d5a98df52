"""Resuming a job of many moves whose controller died: settle what it left in flight, then
plan what is left, under the same job id.

:func:`settle` asks every agent for its copies of the job's VMs, lets
:func:`vmferry.core.job_resume.resolve_moves` say what became of each recorded move, has
``reconcile`` settle the moves left half done (one intact running copy; a migration still in
flight is followed to its end) and records where each move ended up, one transaction per
move. :func:`replan` then plans, on fresh measurements, the VMs the job still has to move
(an evacuation: every VM still on its host; a bring-back: the VMs not yet back; a balance:
the moves that did not happen, to the hosts it chose); the caller
records those moves (:meth:`~vmferry.controller.jobs.JobStore.extend`) and runs them with
:func:`vmferry.controller.job_runner.run_plan`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from vmferry.controller.cluster import Cluster
from vmferry.controller.evacuation import (
    JobPlan,
    JobRequest,
    plan_bring_back,
    plan_evacuation,
    plan_placed,
)
from vmferry.controller.history import History
from vmferry.controller.jobs import JobRecord, JobStore
from vmferry.controller.placing import live_cluster
from vmferry.controller.reconcile import Reconciled, reconcile
from vmferry.core import cluster_model as cm
from vmferry.core.errors import FerryError, StateError
from vmferry.core.job_resume import (
    BRING_BACK,
    EMPTYING_KINDS,
    Fate,
    RecordedMove,
    Resolution,
    given_up,
    resolve_moves,
)
from vmferry.core.placement import Placement
from vmferry.core.reconcile import Copy

__all__ = ["Settled", "recorded_request", "replan", "settle"]

logger = logging.getLogger(__name__)

_RETRY_S = 1.0  # between two rounds of settling a job's moves
_GIVEN_UP = ("lost", "conflict")  # what reconcile found of a VM no later round changes


@dataclass(frozen=True, slots=True)
class Settled:
    """What a resume found of one recorded move, and what ``reconcile`` did to settle it."""

    resolution: Resolution
    reconciled: Reconciled | None

    @property
    def vm(self) -> str:
        return self.resolution.vm

    def to_json(self) -> dict[str, Any]:
        return {
            **self.resolution.to_json(),
            "reconcile": None if self.reconciled is None else self.reconciled.to_json(),
        }


def recorded_request(record: JobRecord) -> JobRequest:
    """The request ``record`` was planned with, less its deadline (counted from the job's
    first start, it means nothing for what is left)."""
    return replace(JobRequest.from_json(record.host, record.plan.get("request")), deadline_s=None)


async def _copies(cluster: Cluster, record: JobRecord) -> dict[str, list[Copy]]:
    """Every host's copies of the job's VMs.

    Raises:
        FerryError: a host does not answer (a copy there could make any decision wrong).
    """
    listing = await cluster.list_vms()
    if listing.unreachable:
        raise FerryError(
            f"cannot resume job {record.id}: {', '.join(listing.unreachable)} did not answer "
            "(nothing changed)"
        )
    wanted = {m.vm for m in record.moves}
    copies: dict[str, list[Copy]] = {}
    for vm in listing.vms:
        if vm.name in wanted:
            copies.setdefault(vm.name, []).append(Copy(vm.host, vm.state))
    return copies


def _recorded(record: JobRecord) -> list[RecordedMove]:
    return [RecordedMove(m.vm, m.source, m.destination, m.state) for m in record.moves]


def _record_state(settled: Settled) -> str | None:
    """What the move's record becomes: the resolution's, unless reconcile found the copy it
    finished not intact."""
    integrity = None if settled.reconciled is None else settled.reconciled.integrity
    if integrity is not None and not integrity.ok:
        return "failed"
    return settled.resolution.record_state


async def _rounds(
    cluster: Cluster, record: JobRecord, wait_s: float
) -> tuple[list[Resolution], dict[str, Reconciled]]:
    """Let ``reconcile`` settle the moves left half done, round after round, until none is or
    ``wait_s`` passed. A move a round could not settle (a step refused, e.g. on a destination
    its dead controller was still starting) is tried again a second later; one ``reconcile``
    found lost, or in conflict, is not."""
    moves = _recorded(record)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    reconciled: dict[str, Reconciled] = {}
    while True:
        found = resolve_moves(record.kind, record.host, moves, await _copies(cluster, record))
        found = [
            r
            if (rec := reconciled.get(r.vm)) is None or rec.verdict not in _GIVEN_UP
            else given_up(r, rec.error or rec.reason)
            for r in found
        ]
        unsettled = [r.vm for r in found if r.fate is Fate.SETTLE]
        left_s = deadline - loop.time()
        if not unsettled or left_s <= 0:
            return found, reconciled
        if reconciled:
            await asyncio.sleep(min(_RETRY_S, left_s))
        logger.info("job.settling %s: %s", record.id, ", ".join(unsettled))
        for result in await reconcile(cluster, wait_s=max(1.0, left_s), only=unsettled):
            if result.done or result.vm not in reconciled:
                reconciled[result.vm] = result


async def settle(
    cluster: Cluster, store: JobStore, record: JobRecord, *, wait_s: float = 300.0
) -> list[Settled]:
    """Settle every move of the claimed job ``record`` left half done (as ``reconcile`` does:
    see :func:`_rounds`); record where each ended.

    Returns:
        Each recorded move's fate, in the record's order.

    Raises:
        FerryError: a host does not answer (nothing changed).
        StateError: a move was still unsettled after ``wait_s`` (what was settled is
            recorded; a later resume goes on from there).
    """
    found, reconciled = await _rounds(cluster, record, wait_s)
    settled = [Settled(r, reconciled.get(r.vm)) for r in found]
    for one in settled:
        state = _record_state(one)
        if one.resolution.fate is not Fate.SETTLE and state is not None:
            store.move_state(record.id, one.vm, state, {"resumed": one.to_json()})
    still = [s.resolution for s in settled if s.resolution.fate is Fate.SETTLE]
    if still:
        raise StateError(
            f"job {record.id}'s move of {', '.join(r.vm for r in still)}",
            f"still unsettled ({'; '.join(r.reason for r in still)})",
            "settled before the job goes on: resume it again later",
        )
    return settled


async def replan(
    cluster: Cluster,
    store: JobStore,
    record: JobRecord,
    request: JobRequest,
    history: History | None,
    settled: Sequence[Settled],
) -> JobPlan | None:
    """Plan, on fresh measurements, what the job has left (None: nothing).

    Raises:
        PlacementError: a VM left cannot move (named with why; nothing moved).
        UnknownHost, ConfigError, DeadlineUnreachable, FerryError: as
            :func:`~vmferry.controller.evacuation.plan_evacuation` raises them.
    """
    live = await live_cluster(cluster, store)
    again = [s.vm for s in settled if s.resolution.fate is Fate.AGAIN]
    if record.kind in EMPTYING_KINDS:
        plan = await plan_evacuation(cluster, live, request, history, kind=record.kind)
    elif record.kind == BRING_BACK:
        plan = await plan_bring_back(cluster, live, request, again, history)
    elif not again:
        return None
    else:  # a balance: the moves that did not happen, to the hosts it chose
        destination = {m.vm: m.destination for m in record.moves}
        placed = Placement(
            tuple(cm.Move(live.model.vm(vm), cm.HostName(destination[vm])) for vm in again)
        )
        plan = await plan_placed(cluster, live, request, history, record.kind, placed)
    plan.require_movable()
    return plan if plan.moves else None
