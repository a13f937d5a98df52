"""One migration across two agents: pre-checks, destination, source, follow, switch, verify.

The rule that governs every branch: at every moment exactly one intact copy of the guest runs.
The source agent ends its QEMU (``handoff``) only after QEMU reported completion *and* the
destination agent confirmed the guest runs there; any failure before that aborts the
destination and leaves (or puts) the guest running on the source.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from vmferry.agent.api import OutgoingResult, VmInfo
from vmferry.agent.client import AgentUnreachable
from vmferry.agent.port import AgentPort
from vmferry.controller.cluster import Cluster, spec_of
from vmferry.controller.history import History
from vmferry.controller.plan import make_plan, qemu_downtime_limit_ms
from vmferry.core.errors import ConfigError, FerryError, StateError
from vmferry.core.model import (
    DISK_PHASE,
    DISK_SYNCED,
    MECHANISMS,
    IntegrityReport,
    Mechanism,
    MigrationOptions,
    MigrationReport,
    MigrationStats,
)
from vmferry.core.phases import DestinationReady, Phase, QemuStatus, Verified, transition
from vmferry.core.predict import StrategyPrediction
from vmferry.core.recovery import POSTCOPY_RECOVERING, RecoveryPolicy, is_postcopy, is_stalled
from vmferry.core.strategy import Action, Goal, Progress, replan

__all__ = [
    "STRATEGIES",
    "GoalUnreachable",
    "MigrationRequest",
    "PostcopyLost",
    "ProgressCallback",
    "drop_unstarted",
    "migrate",
    "postcopy_loss",
    "recover_postcopy",
]

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[Phase, MigrationStats | None], None]
STRATEGIES = ("auto", *MECHANISMS)
# Hybrid: one full pre-copy pass (and the first re-send), then switch to post-copy.
_HYBRID_SWITCH_ITERATION = 2
_POLL_WAIT_S = 0.5
# An active post-copy that sent nothing for this long has lost its link: pause and recover it
# rather than wait minutes for TCP to give up.
POSTCOPY_STALL_S = 1.0
# After a recovery, samples queued before it still say "paused": ignore those for this long.
_RECOVERY_GRACE_S = 1.0
# Calls to a destination behind a broken link fail fast, so the next attempt comes sooner.
_RECOVERY_CALL_TIMEOUT_S = 3.0
# A pre-copy (or disk copy) that sent nothing for this long is cancelled (the guest runs on
# at the source); statuses in which that is checked:
PRECOPY_STALL_S = 30.0
_STALLABLE = frozenset({"setup", "active", "device", DISK_PHASE})
# How long an agent may be unreachable (e.g. being restarted) before the controller gives up
# on following the migration and leaves it to `vmferry reconcile`.
AGENT_RETURN_S = 60.0


@dataclass(frozen=True, slots=True)
class MigrationRequest:
    """What the user asked for."""

    vm: str
    destination: str
    strategy: str = "auto"
    max_downtime_ms: int = 300
    deadline_s: float | None = None
    bandwidth_mbps: int | None = None
    force: bool = False  # go ahead with the best effort when the goal cannot be met
    allow_postcopy: bool = True
    plan: bool = True  # measure and predict first (the report then carries the prediction)
    # How long to keep trying to recover a post-copy broken by a network fault.
    recovery_limit_s: float = 600.0
    # Encrypt and authenticate the migration stream and the disk mirror (mutual TLS).
    tls: bool = False

    @property
    def recovery(self) -> RecoveryPolicy:
        """Raises: ConfigError for a limit out of range."""
        return RecoveryPolicy(limit_s=self.recovery_limit_s)

    @property
    def goal(self) -> Goal:
        return Goal(
            max_downtime_ms=self.max_downtime_ms,
            deadline_ms=None if self.deadline_s is None else round(self.deadline_s * 1000),
            allow_postcopy=self.allow_postcopy,
        )

    def resolve(self, mechanism: Mechanism | None = None) -> tuple[Mechanism, MigrationOptions]:
        """Validate and turn into a mechanism and QEMU options.

        Args:
            mechanism: what ``auto`` resolved to (ignored for explicit strategies).

        Raises:
            ConfigError: unknown strategy, bad numbers.
        """
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"unknown strategy {self.strategy!r}: use {', '.join(STRATEGIES)}")
        if not self.plan and self.strategy == "auto":
            raise ConfigError("--no-plan needs an explicit --strategy (auto chooses by the plan)")
        strategy: Mechanism = next(
            (m for m in MECHANISMS if m == self.strategy), mechanism or "precopy"
        )
        if not 1 <= self.max_downtime_ms <= 600_000:
            raise ConfigError("--max-downtime must be 1..600000 ms")
        if self.deadline_s is not None and not 0 < self.deadline_s <= 86_400:
            raise ConfigError("--deadline must be in (0, 86400] seconds")
        if self.bandwidth_mbps is not None and not 1 <= self.bandwidth_mbps <= 1_000_000:
            raise ConfigError("--bandwidth must be 1..1000000 Mbit/s")
        RecoveryPolicy(limit_s=self.recovery_limit_s)  # raises ConfigError when out of range
        return strategy, MigrationOptions(
            max_bandwidth_bps=None
            if self.bandwidth_mbps is None
            else self.bandwidth_mbps * 125_000,
            downtime_limit_ms=qemu_downtime_limit_ms(self.max_downtime_ms),
            timeout_s=self.deadline_s or 600.0,
            mechanism=strategy,
            # 'auto' keeps the way to post-copy open, to switch if pre-copy stalls.
            postcopy_ready=self.strategy == "auto"
            and self.allow_postcopy
            and strategy not in ("cold", "multifd"),
            tls=self.tls,
        )


async def _precheck(
    cluster: Cluster, request: MigrationRequest
) -> tuple[VmInfo, AgentPort, AgentPort]:
    destination = cluster.client(request.destination)
    info = await cluster.locate(request.vm)
    if info.host == request.destination:
        raise ConfigError(f"VM {request.vm!r} already runs on {request.destination}")
    if info.state != "running":
        raise StateError(f"VM {request.vm}", info.state, "running (one migration at a time)")
    spec = spec_of(info)
    host = await destination.host_info()
    if spec.memory_bytes > host.memory_free_bytes:
        raise ConfigError(
            f"{request.destination} has {host.memory_free_bytes >> 20} MiB free; "
            f"{request.vm} needs {spec.memory_bytes >> 20} MiB"
        )
    if spec.machine_type not in host.machine_types:
        raise ConfigError(f"{request.destination} cannot build machine type {spec.machine_type}")
    if spec.cpu_model not in host.cpu_models:
        raise ConfigError(f"{request.destination} has no CPU model {spec.cpu_model}")
    source = cluster.client(info.host)
    if request.tls:
        # Refused here, before anything starts (each agent would refuse it too).
        for checked in (await source.host_info(), host):
            if not checked.qemu_tls:
                raise ConfigError(
                    f"{checked.host} has no QEMU TLS credentials: --tls needs both agents "
                    "started with --qemu-tls-dir"
                )
    return info, source, destination


class GoalUnreachable(ConfigError):
    """No strategy is predicted to meet the goal; nothing was started."""


async def _planned(
    cluster: Cluster, request: MigrationRequest, info: VmInfo, history: History | None
) -> tuple[Mechanism, MigrationOptions, StrategyPrediction | None]:
    """Resolve the strategy (choosing one for 'auto') and find its prediction."""
    if not request.plan and request.strategy != "auto":
        mechanism, options = request.resolve()
        return mechanism, options, None
    cap = None if request.bandwidth_mbps is None else request.bandwidth_mbps * 125_000
    try:
        plan = await make_plan(
            cluster, info, request.destination, request.goal, cap_bps=cap, history=history
        )
    except FerryError as err:
        if request.strategy == "auto":
            raise
        logger.warning("plan.failed %s: %s; migrating without a prediction", info.name, err)
        mechanism, options = request.resolve()
        return mechanism, options, None
    if request.strategy == "auto":
        if not plan.choice.meets_goal and not request.force:
            raise GoalUnreachable(f"{plan.choice.reason} (--force tries the best effort)")
        mechanism, options = request.resolve(plan.choice.strategy)
    else:
        mechanism, options = request.resolve()
    return mechanism, options, plan.prediction_for(mechanism)


async def migrate(
    cluster: Cluster,
    request: MigrationRequest,
    *,
    history: History | None = None,
    on_progress: ProgressCallback | None = None,
) -> MigrationReport:
    """Migrate a VM between two hosts of ``cluster`` and verify it on arrival.

    Returns the report (also recorded in ``history``); a failed migration is a report with
    status ``failed``, not an exception.

    Raises:
        ConfigError: bad request, unknown VM or host, no room on the destination.
        StateError: the VM is not in a state to migrate (e.g. already migrating).
        FerryError: an agent became unreachable before anything started.
    """
    request.resolve()  # bad options are refused before anything is measured
    info, source, destination = await _precheck(cluster, request)
    spec, source_host = spec_of(info), info.host
    strategy, options, prediction = await _planned(cluster, request, info, history)
    goal = request.goal
    progress: list[Progress] = []
    started_at = datetime.now(UTC)
    started_wall_ms = time.time() * 1000
    loop = asyncio.get_running_loop()
    started_s = loop.time()
    phase = Phase.PREPARING
    last: MigrationStats | None = None
    disk_ms = 0
    policy = request.recovery
    recoveries = 0
    attempts = itertools.count(1)

    def notify(stats: MigrationStats | None) -> None:
        if on_progress is not None:
            on_progress(phase, stats)

    def report(**fields: object) -> MigrationReport:
        values: dict[str, object] = {
            "vm": spec.name,
            "source": source_host,
            "destination": request.destination,
            "running_on": source_host,
            "strategy": strategy,
            "status": "failed",
            "error": None,
            "total_ms": round((loop.time() - started_s) * 1000),
            "downtime_ms": None,
            "guest_downtime_ms": None,
            "transferred_bytes": (
                last.transferred_bytes + last.disk_copied_bytes if last is not None else 0
            ),
            "iterations": last.iterations if last is not None else 0,
            "predicted": None if prediction is None else prediction.to_prediction(),
            "integrity": None,
            "guest_alive": True,
            "recoveries": recoveries,
            # Attempted over TLS; a completed report says what QEMU really used.
            "tls": options.tls,
        }
        values.update(fields)
        result = MigrationReport(**values)  # type: ignore[arg-type]
        if history is not None:
            history.record(result, started_at)
        return result

    notify(None)
    try:
        uri, nbd = await destination.prepare_incoming(spec, options)
    except ConfigError:
        raise  # bad input, no room: refused, nothing changed
    except FerryError as err:
        # The destination failed to come up (its QEMU died, its agent went away): the guest
        # never left the source. Whatever the destination kept is a leftover for reconcile.
        logger.error("migration.destination_failed %s: %s", spec.name, err)
        return report(
            status="failed",
            guest_alive=await _state_of(source, spec.name) != "stopped",
            error=f"the destination on {request.destination} could not be prepared: {err}",
        )
    try:
        await source.start_migration(spec.name, uri, options, nbd)
    except FerryError as err:
        with contextlib.suppress(FerryError):
            await destination.abort_incoming(spec.name)
        alive = await _state_of(source, spec.name) != "stopped"
        logger.error("migration.not_started %s: %s", spec.name, err)
        return report(
            status="failed",
            guest_alive=alive,
            error=f"could not start the migration on {source_host}: {err}"
            if alive
            else f"the source QEMU on {source_host} died ({err}): the guest is lost; no copy "
            f"runs (the destination on {request.destination} was removed)",
        )
    except BaseException:
        await asyncio.shield(destination.abort_incoming(spec.name))
        raise
    phase = transition(phase, DestinationReady())
    notify(None)

    outcome: OutgoingResult | None = None
    since = 0
    cancel_sent = False
    switched = False
    handed_over = False
    replan_error: str | None = None
    postcopy = False  # once True the destination owns the guest: never abort it
    sent_bytes, disk_sent_bytes, progress_at = -1, -1, loop.time()
    grace_until = 0.0
    lost_since: float | None = None
    while outcome is None:
        try:
            samples, since, outcome = await source.migration_progress(
                spec.name,
                since,
                _POLL_WAIT_S,
                timeout_s=_POLL_WAIT_S + _RECOVERY_CALL_TIMEOUT_S if postcopy else None,
            )
        except AgentUnreachable as err:
            # The next answer may come from a restarted agent, which numbers samples anew.
            since = 0
            samples = []
            if postcopy:
                # Broken link, or only the source's agent gone? The destination's QEMU knows
                # whether the post-copy itself still runs.
                incoming = await _incoming_status(destination, spec.name)
                if incoming == "completed":
                    logger.warning("migration.completed_without_source_agent %s", spec.name)
                    outcome = OutgoingResult("completed", None, last, None, None)
                    continue
                if incoming == "postcopy-active":
                    logger.warning("migration.source_agent_away %s: post-copy runs", spec.name)
                    progress_at = loop.time()
                    await asyncio.sleep(1.0)
                    continue
                # The source is behind a broken link too: the stall check below starts a
                # recovery, which keeps trying to reach it.
                logger.warning("migration.source_unreachable %s: %s", spec.name, err)
            else:
                # QEMU goes on without its agent; a restarted agent settles the migration
                # (see agent.adopt) and answers with its outcome. Wait for it a while.
                lost_since = lost_since if lost_since is not None else loop.time()
                if loop.time() - lost_since > AGENT_RETURN_S:
                    phase = Phase.FAILED
                    notify(last)
                    return report(
                        status="failed",
                        error=(
                            f"{source_host}'s agent did not answer for {AGENT_RETURN_S:g} s "
                            f"({err}): the migration's outcome is unknown. Restart the agent "
                            "and run `vmferry reconcile`."
                        ),
                    )
                logger.warning("migration.source_unreachable %s: %s", spec.name, err)
                await asyncio.sleep(1.0)
                continue
        except asyncio.CancelledError:
            # Interrupted: cancel, then keep following (shielded) so we know where the guest is.
            if not cancel_sent:
                cancel_sent = True
                with contextlib.suppress(FerryError):
                    await asyncio.shield(source.cancel_migration(spec.name))
            outcome = await asyncio.shield(_wait_outcome(source, spec.name, since))
            if outcome.status != "completed" and not postcopy:
                # (After post-copy began the destination holds the guest: never abort it.)
                await asyncio.shield(destination.abort_incoming(spec.name))
            else:
                await asyncio.shield(_switch(source, destination, spec.name))
            raise
        lost_since = None
        for stats in samples:
            last = stats
            if stats.status == DISK_PHASE:
                # The disk copy precedes QEMU's migration: progress to show, nothing to re-plan.
                disk_ms = stats.total_ms
                if stats.disk_copied_bytes != disk_sent_bytes:
                    disk_sent_bytes, progress_at = stats.disk_copied_bytes, loop.time()
                notify(stats)
                continue
            if stats.status == DISK_SYNCED:
                # Paused at the switchover with the disk complete: the destination must drop
                # its export before it can take the disk over; then the source goes on.
                notify(stats)
                if not handed_over:
                    handed_over = True
                    try:
                        await destination.release_disk(spec.name)
                        await source.continue_switchover(spec.name)
                    except FerryError as err:
                        logger.error("migration.handover_failed %s: %s", spec.name, err)
                        replan_error = f"disk handover failed: {err}"
                        with contextlib.suppress(FerryError):
                            await source.cancel_migration(spec.name)
                continue
            postcopy = postcopy or is_postcopy(stats.status)
            if stats.transferred_bytes != sent_bytes:
                sent_bytes, progress_at = stats.transferred_bytes, loop.time()
            if stats.status not in ("failed", "cancelled"):
                with contextlib.suppress(StateError):
                    phase = transition(phase, QemuStatus(stats.status))
            # The re-plan's deadline counts from before the disk copy, QEMU's clock from after.
            progress.append(Progress.from_stats(replace(stats, total_ms=stats.total_ms + disk_ms)))
            notify(stats)
        now = loop.time()
        if (
            outcome is None
            and last is not None
            and now >= grace_until
            and (
                last.status in POSTCOPY_RECOVERING
                or is_stalled(last.status, progress_at, now, POSTCOPY_STALL_S)
            )
        ):
            broke = last.status if last.status in POSTCOPY_RECOVERING else "stalled"
            logger.warning("migration.postcopy_broken %s: %s", spec.name, broke)
            notify(replace(last, status="postcopy-paused"))
            try:
                recovered_in_s = await recover_postcopy(
                    source, destination, spec.name, policy, attempts
                )
            except PostcopyLost as lost:
                phase = Phase.FAILED
                notify(last)
                logger.error("migration.postcopy_lost %s: %s", spec.name, lost)
                return report(
                    status="failed",
                    running_on=request.destination,
                    guest_alive=False,
                    error=postcopy_loss(lost.dead_host, source_host, request.destination),
                )
            if recovered_in_s is None:
                phase = Phase.FAILED
                notify(last)
                logger.error("migration.unrecovered %s", spec.name)
                return report(
                    status="failed",
                    running_on=request.destination,
                    guest_alive=False,
                    error=(
                        f"post-copy broken and not recovered within {policy.limit_s:g} s: the "
                        f"guest is paused on {request.destination} with part of its memory "
                        f"still on {source_host}; both QEMUs are kept as they are (the source "
                        "copy is never started). Restore the network and recover the "
                        "migration, or accept the loss."
                    ),
                )
            recoveries += 1
            logger.info(
                "migration.recovered %s in %.1f s (recovery %d)",
                spec.name,
                recovered_in_s,
                recoveries,
            )
            grace_until = loop.time() + _RECOVERY_GRACE_S
            progress_at = loop.time()
            continue
        if (
            outcome is None
            and not postcopy
            and not cancel_sent
            and last is not None
            and last.status in _STALLABLE
            and now - progress_at > PRECOPY_STALL_S
        ):
            # Nothing moved for long (a dead link, a destination that stopped reading): give
            # up while the guest still runs here rather than wait for TCP's timeout.
            cancel_sent = True
            what = "the disk copy" if last.status == DISK_PHASE else "the migration"
            replan_error = (
                f"{what} sent nothing for {PRECOPY_STALL_S:g} s (link down? destination "
                f"gone?): cancelled; the guest stays on {source_host}"
            )
            logger.warning("migration.stalled %s: cancelling", spec.name)
            with contextlib.suppress(FerryError):
                await source.cancel_migration(spec.name)
        if (
            outcome is None
            and not postcopy
            and prediction is not None
            and last is not None
            and last.status not in (DISK_PHASE, DISK_SYNCED)
        ):
            decision = replan(strategy, progress, prediction, goal)
            if decision.action is Action.SWITCH_TO_POSTCOPY and options.uses_postcopy:
                if not switched:
                    switched = True
                    logger.info("migration.replan %s: %s", spec.name, decision.reason)
                    with contextlib.suppress(FerryError):
                        await source.start_postcopy(spec.name)
            elif decision.action is Action.CANCEL and not cancel_sent:
                cancel_sent = True
                logger.warning("migration.replan %s: %s", spec.name, decision.reason)
                replan_error = decision.reason
                with contextlib.suppress(FerryError):
                    await source.cancel_migration(spec.name)
        if (
            not switched
            and outcome is None
            and strategy == "hybrid"
            and last is not None
            and last.status == "active"
            and last.iterations >= _HYBRID_SWITCH_ITERATION
        ):
            switched = True
            with contextlib.suppress(FerryError):
                await source.start_postcopy(spec.name)

    if outcome.status != "completed" and postcopy:
        # QEMU failed a post-copy: the guest's state is split between both hosts. Keep both
        # QEMUs for inspection; neither may be resumed or removed automatically.
        phase = Phase.FAILED
        notify(last)
        logger.error("migration.failed %s in post-copy: %s", spec.name, outcome.error)
        dead = await _dead_side(source, destination, spec.name)
        split = f"post-copy failed ({outcome.error or outcome.status}); the guest's memory "
        split += f"is split between {source_host} and {request.destination}"
        return report(
            status="failed",
            running_on=request.destination,
            guest_alive=False,
            error=split if dead is None else postcopy_loss(dead, source_host, request.destination),
        )
    if outcome.status != "completed":
        phase = Phase.FAILED
        notify(last)
        with contextlib.suppress(FerryError):
            await destination.abort_incoming(spec.name)
        logger.error("migration.failed %s: %s", spec.name, outcome.error)
        reason = replan_error or outcome.error or outcome.status
        alive = await _state_of(source, spec.name) != "stopped"
        if not alive:
            reason = (
                f"the source QEMU on {source_host} died before the switchover ({reason}): "
                "the guest is lost; no copy runs (nothing was started on "
                f"{request.destination})"
            )
        return report(status="failed", error=reason, guest_alive=alive)

    final = outcome.stats or last
    last = final
    completed_wall_ms = time.time() * 1000
    phase = transition(phase, QemuStatus("completed"))
    notify(final)
    # Past completion the destination holds the only current copy of the guest.
    integrity: IntegrityReport | None = None
    try:
        first_ms, integrity = await _finish(destination, spec.name)
    except FerryError as err:
        logger.error("migration.arrival_failed %s: %s", spec.name, err)
        if not postcopy and await drop_unstarted(destination, spec.name):
            # The destination QEMU died, or never received the whole guest, before the guest
            # ran there (the agent refuses to drop a copy that did); the source still holds
            # the complete, current guest: take it back.
            try:
                await source.resume_source(spec.name)
                integrity = await source.verify(spec.name)
            except FerryError as resume_err:
                err = FerryError(f"{err}; taking the guest back failed: {resume_err}")
            else:
                return report(
                    status="failed",
                    error=f"the guest did not start on {request.destination} ({err}); it "
                    f"runs on {source_host} again",
                    integrity=integrity,
                    downtime_ms=_downtime_ms(strategy, final, disk_ms),
                )
        return report(
            status="completed",
            running_on=request.destination,
            error=f"guest did not come up on {request.destination}: {err} "
            "(see `vmferry reconcile`)",
            guest_alive=False,
            downtime_ms=_downtime_ms(strategy, final, disk_ms),
        )
    phase = transition(phase, Verified())
    notify(final)
    # From the first request to the guest running on the destination with all its memory
    # there (post-copy keeps pulling pages after the guest already runs).
    total_ms = round(max(first_ms, completed_wall_ms) - started_wall_ms)
    error: str | None = None
    try:
        await source.handoff(spec.name)
    except FerryError as err:
        error = f"source QEMU not cleaned up: {err} (`vmferry reconcile` removes it)"
    gap = None
    if outcome.last_heartbeat_ms is not None:
        gap = round(max(outcome.max_gap_ms or 0, first_ms - outcome.last_heartbeat_ms))
    return report(
        status="completed",
        running_on=request.destination,
        error=error,
        total_ms=total_ms,
        downtime_ms=_downtime_ms(strategy, final, disk_ms),
        guest_downtime_ms=gap,
        integrity=integrity,
        tls=outcome.tls,
    )


def _downtime_ms(strategy: Mechanism, final: MigrationStats | None, disk_ms: int) -> int | None:
    """QEMU's downtime; for a cold move the guest was paused for the disk copy and QEMU's
    whole migration, which QEMU does not count as downtime (it did not pause the guest)."""
    if final is None:
        return None
    if strategy == "cold":
        return disk_ms + max(final.total_ms, final.downtime_ms or 0)
    return final.downtime_ms


async def recover_postcopy(
    source: AgentPort,
    destination: AgentPort,
    name: str,
    policy: RecoveryPolicy,
    attempts: Iterator[int],
) -> float | None:
    """Recover a broken post-copy: pause both sides (each tolerates a QEMU that paused
    itself), have the destination listen again, resume the source to it; retry with backoff
    until it works or ``policy.limit_s`` passes.

    Args:
        attempts: attempt numbers, increasing over the whole migration (the agents refuse a
            request of an older attempt: one sent into a cut link arrives after the link is
            back and would pause the recovered migration again).

    Returns:
        Seconds it took, or None when the limit passed (both sides stay paused).
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    failed = 0
    while True:
        attempt = next(attempts)
        try:
            if await _recover_once(source, destination, name, attempt):
                return loop.time() - started
        except FerryError as err:
            logger.info("migration.recover_attempt %s #%d: %s", name, attempt, err)
        dead = await _dead_side(source, destination, name)
        if dead is not None:
            raise PostcopyLost(dead)
        failed += 1
        wait_s = policy.next_wait_s(failed, loop.time() - started)
        if wait_s is None:
            return None
        await asyncio.sleep(wait_s)


async def _recover_once(source: AgentPort, destination: AgentPort, name: str, attempt: int) -> bool:
    """One recovery attempt; True when the post-copy runs (or completed) again.

    Raises:
        FerryError: a step failed (an agent unreachable behind the broken link, QEMU not
            paused yet, ...): the caller retries.
    """
    timeout_s = _RECOVERY_CALL_TIMEOUT_S
    if await source.pause_postcopy(name, attempt, timeout_s=timeout_s + 2) == "completed":
        return True
    await destination.pause_postcopy(name, attempt, timeout_s=timeout_s)
    uri = await destination.recover_postcopy(name, attempt, timeout_s=timeout_s)
    status = await source.resume_postcopy(name, uri, attempt)
    logger.info("migration.resume_attempt %s #%d -> %s: %s", name, attempt, uri, status)
    return status in ("postcopy-active", "completed")


class PostcopyLost(FerryError):
    """A QEMU of a post-copy died: the pages only it held are gone; nothing can recover it."""

    def __init__(self, dead_host: str) -> None:
        super().__init__(f"the QEMU on {dead_host} died during post-copy")
        self.dead_host = dead_host


def postcopy_loss(dead_host: str, source_host: str, destination_host: str) -> str:
    if dead_host == source_host:
        return (
            f"the source QEMU on {source_host} died during post-copy: the guest's pages that "
            f"were still there are lost. The guest on {destination_host} cannot go on (it "
            "waits for them, paused); its QEMU is kept for inspection. No copy runs."
        )
    return (
        f"the destination QEMU on {destination_host} died during post-copy, while it ran the "
        f"guest: the guest is lost. The source copy on {source_host} is older than what the "
        "guest had done and is never resumed; it is kept for inspection. No copy runs."
    )


async def _dead_side(source: AgentPort, destination: AgentPort, name: str) -> str | None:
    """The host whose QEMU died (its agent reports the VM stopped), if one did."""
    for agent in (source, destination):
        if await _state_of(agent, name) == "stopped":
            return agent.name
    return None


async def drop_unstarted(destination: AgentPort, name: str) -> bool:
    """Remove a destination copy that never ran the guest: its QEMU died, or is still waiting
    for the state (the agent refuses one that received it). True when it is gone."""
    try:
        if await _state_of(destination, name) == "stopped":
            await destination.forget(name)
        else:
            await destination.abort_incoming(name)
    except FerryError as err:
        logger.warning("migration.destination_kept %s: %s", name, err)
        return False
    return True


async def _incoming_status(destination: AgentPort, name: str) -> str | None:
    """The destination QEMU's migration status; None if its agent does not answer."""
    try:
        _, migration = await destination.qemu_state(name, timeout_s=_RECOVERY_CALL_TIMEOUT_S)
        return migration
    except FerryError:
        return None


async def _state_of(agent: AgentPort, name: str) -> str | None:
    """VM ``name``'s state on ``agent`` (``stopped``: its QEMU died); None if unknown."""
    try:
        return (await agent.get_vm(name, timeout_s=_RECOVERY_CALL_TIMEOUT_S)).state
    except FerryError:
        return None


async def _finish(destination: AgentPort, name: str) -> tuple[float, IntegrityReport]:
    """``finish_incoming``, tolerating a destination agent that is being restarted (the
    guest runs there meanwhile; a restarted agent keeps the VM incoming)."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + AGENT_RETURN_S
    while True:
        try:
            return await destination.finish_incoming(name)
        except AgentUnreachable as err:
            if loop.time() > give_up:
                raise
            logger.warning("migration.destination_unreachable %s: %s", name, err)
            await asyncio.sleep(1.0)


async def _wait_outcome(source: AgentPort, name: str, since: int) -> OutgoingResult:
    while True:
        _, since, outcome = await source.migration_progress(name, since, _POLL_WAIT_S)
        if outcome is not None:
            return outcome


async def _switch(source: AgentPort, destination: AgentPort, name: str) -> None:
    with contextlib.suppress(FerryError):
        await destination.finish_incoming(name)
        await source.handoff(name)
