"""`vmferry reconcile`: bring every VM back to exactly one running copy after a crash.

Asks every agent what it holds, lets :func:`vmferry.core.reconcile.decide` say what to do
with each VM, and carries the steps out. Migrations still in flight are waited for (a broken
post-copy is recovered on the way); afterwards the VM is looked at again. Nothing is done
while a host does not answer: a copy there could make any decision wrong.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection
from dataclasses import dataclass, field

from vmferry.agent.port import AgentPort
from vmferry.controller.cluster import Cluster
from vmferry.controller.migrate import follow
from vmferry.controller.sides import compare_copies, drop_unstarted
from vmferry.core.arrival import describe_difference
from vmferry.core.errors import FerryError, StateError
from vmferry.core.handoff import VerifyMode
from vmferry.core.migration import CopiesCompared, Mode, Move, Timing
from vmferry.core.model import IntegrityReport
from vmferry.core.reconcile import Copy, Decision, Step, StepKind, Verdict, decide
from vmferry.core.recovery import RecoveryPolicy
from vmferry.core.strategy import Goal

__all__ = ["Reconciled", "reconcile"]

logger = logging.getLogger(__name__)

_ROUNDS = 3  # decide, act, look again (a wait is followed by a second decision)
_STALL_S = 2.0


@dataclass(slots=True)
class Reconciled:
    """What reconciling one VM found and did."""

    vm: str
    verdict: str  # ok | settled | lost | conflict | failed | in-flight
    reason: str
    done: list[str] = field(default_factory=list)
    running_on: str | None = None
    integrity: IntegrityReport | None = None
    error: str | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "vm": self.vm,
            "verdict": self.verdict,
            "reason": self.reason,
            "done": list(self.done),
            "running_on": self.running_on,
            "integrity": None if self.integrity is None else self.integrity.to_json(),
            "error": self.error,
        }


async def reconcile(
    cluster: Cluster,
    *,
    wait_s: float = 300.0,
    recovery: RecoveryPolicy | None = None,
    only: Collection[str] | None = None,
) -> list[Reconciled]:
    """Reconcile every VM of ``cluster`` (or those named in ``only``).

    Args:
        wait_s: how long to wait for one migration still in flight.
        recovery: how long to keep recovering a broken post-copy met on the way.
        only: the VMs to reconcile (a resumed job's); None: every VM.

    Raises:
        FerryError: a host does not answer (nothing was changed).
    """
    policy = recovery or RecoveryPolicy()
    results: dict[str, Reconciled] = {}
    pending: set[str] | None = None
    for _ in range(_ROUNDS):
        copies = await _copies(cluster)
        names = sorted(copies) if pending is None else sorted(pending & set(copies))
        if only is not None:
            names = [n for n in names if n in only]
        pending = set()
        for name in names:
            decision = decide(name, copies[name])
            result = results.setdefault(name, Reconciled(name, "ok", decision.reason))
            if decision.verdict is Verdict.IN_FLIGHT:
                await _wait(cluster, decision, copies[name], result, wait_s, policy)
                if result.verdict != "lost":
                    pending.add(name)  # look again once it ended
                continue
            await _carry_out(cluster, decision, result)
        if not pending:
            break
    for name in pending or ():
        results[name].verdict = "in-flight"
    return [results[name] for name in sorted(results)]


async def _copies(cluster: Cluster) -> dict[str, list[Copy]]:
    listing = await cluster.list_vms()
    if listing.unreachable:
        raise FerryError(
            f"cannot reconcile: {', '.join(listing.unreachable)} did not answer (nothing changed)"
        )
    copies: dict[str, list[Copy]] = {}
    for vm in listing.vms:
        copies.setdefault(vm.name, []).append(Copy(vm.host, vm.state))
    return copies


async def _carry_out(cluster: Cluster, decision: Decision, result: Reconciled) -> None:
    result.reason = decision.reason
    result.running_on = decision.running_on
    if decision.verdict is Verdict.OK:
        return
    if decision.verdict in (Verdict.LOST, Verdict.CONFLICT):
        result.verdict = decision.verdict.value
        logger.error("reconcile.%s %s: %s", decision.verdict.value, decision.vm, decision.reason)
        return
    source = next((s.host for s in decision.steps if s.kind is StepKind.HANDOFF), None)
    for step in decision.steps:
        client = cluster.client(step.host)
        try:
            if step.kind is StepKind.FINISH and source is not None:
                await _compare_first(cluster, source, step.host, decision.vm, result)
            await _step(client, step, decision.vm, result)
        except FerryError as err:
            if step.kind is StepKind.FINISH and source is not None:
                # A completed source whose destination never started the guest: if that
                # copy can be dropped (its agent refuses once it received the guest), the
                # source takes the guest back.
                await _take_back(cluster, source, step, decision.vm, result, err)
                return
            if step.kind is StepKind.FINISH:
                # Its source is gone too: what the destination holds is all there is.
                result.verdict = "lost"
                result.error = (
                    f"{step}: {err} — the source is gone and the copy on {step.host} did "
                    "not come up intact: the guest is lost (that QEMU is kept for inspection)"
                )
                logger.error("reconcile.lost %s: %s", decision.vm, result.error)
                return
            result.verdict = "lost" if step.kind is StepKind.RESUME else "failed"
            result.error = f"{step}: {err}"
            logger.error("reconcile.step_failed %s %s: %s", decision.vm, step, err)
            return
        result.done.append(str(step))
        logger.info("reconcile.done %s: %s", decision.vm, step)
    result.verdict = "settled"


class _CopiesDiffer(FerryError):
    """Both stopped copies were compared and differ: the destination must not run."""


async def _compare_first(
    cluster: Cluster, source: str, destination: str, name: str, result: Reconciled
) -> None:
    """A completed source and a destination held before it ran (its controller died before the
    handoff's comparison): compare them now, as the move would have.

    Raises:
        _CopiesDiffer: they differ (the caller drops the destination, the source takes back).
    """
    try:
        event = await compare_copies(
            cluster.client(source), cluster.client(destination), name, VerifyMode.SAMPLE, 120.0
        )
    except StateError:
        return  # not held (it ran the guest already, e.g. post-copy): nothing to compare
    except FerryError as err:
        logger.warning("reconcile.uncompared %s: %s", name, err)
        return
    if isinstance(event, CopiesCompared):
        result.done.append(f"compared the copies: {event.verdict.status}")
        if not event.verdict.ok:
            raise _CopiesDiffer(describe_difference(event.verdict))


async def _take_back(
    cluster: Cluster, source: str, failed: Step, name: str, result: Reconciled, err: FerryError
) -> None:
    result.error = f"{failed}: {err}"
    if not await drop_unstarted(cluster.client(failed.host), name):
        result.verdict = "failed"
        return
    result.done.append(f"dropped the unstarted copy on {failed.host}")
    try:
        await _step(cluster.client(source), Step(StepKind.RESUME, source), name, result)
    except FerryError as resume_err:
        result.verdict = "lost"
        result.error += f"; taking the guest back on {source} failed: {resume_err}"
        return
    result.done.append(f"resume on {source}")
    result.verdict = "settled"


async def _step(client: AgentPort, step: Step, name: str, result: Reconciled) -> None:
    match step.kind:
        case StepKind.FINISH:
            result.integrity = (await client.finish_incoming(name)).integrity
            result.running_on = step.host
        case StepKind.HANDOFF:
            await client.handoff(name)
        case StepKind.ABORT:
            await client.abort_incoming(name)
        case StepKind.RESUME:
            try:
                await client.resume_source(name)
            except StateError as err:
                raise StateError(f"VM {name}", "handed over in post-copy", "resumable") from err
            result.running_on = step.host
            result.integrity = await client.verify(name)
        case StepKind.FORGET:
            await client.forget(name)
        case StepKind.WAIT:
            raise AssertionError("waits are not steps to carry out")


async def _wait(
    cluster: Cluster,
    decision: Decision,
    copies: list[Copy],
    result: Reconciled,
    wait_s: float,
    policy: RecoveryPolicy,
) -> None:
    """Follow the migration in flight to its outcome (the migration engine in follow mode),
    recovering a broken post-copy."""
    source_host = decision.steps[0].host
    # Its destination: incoming, or a record of a QEMU that died (a post-copy is then lost).
    destinations = [c.host for c in copies if c.state in ("incoming", "stopped")]
    destination_host = destinations[0] if destinations else "its destination"
    result.done.append(f"waited for the migration from {source_host}")
    move = Move(
        vm=decision.vm,
        source=source_host,
        destination=destination_host,
        strategy="precopy",  # not known here; the report only says how it ended
        goal=Goal(max_downtime_ms=600_000),
        recovery=policy,
        mode=Mode.FOLLOW,
        timing=Timing(postcopy_stall_s=_STALL_S),
        first_attempt=10_000,  # above any attempt number the original controller used
    )
    destination = cluster.client(destinations[0]) if destinations else None
    try:
        async with asyncio.timeout(wait_s):
            report, lost_host = await follow(cluster.client(source_host), destination, move)
    except TimeoutError:
        result.reason = f"the migration from {source_host} did not end within {wait_s:g} s"
        return
    if lost_host is not None:
        result.verdict = "lost"
        result.error = report.error
        logger.error("reconcile.lost %s: %s", decision.vm, result.error)
        return
    if report.recoveries:
        result.done.append("recovered the post-copy")
    logger.info("reconcile.waited %s: %s", decision.vm, report.status)
