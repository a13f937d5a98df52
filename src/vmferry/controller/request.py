"""What a user asks of one move, checked and planned before anything starts.

``MigrationRequest`` validates the user's options into a QEMU mechanism and options; ``precheck``
refuses a move that cannot start (unknown VM or host, no room, no TLS); ``planned`` resolves the
strategy (choosing one for ``auto`` from the plan) and finds its prediction.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from vmferry.agent.api import VmInfo
from vmferry.agent.port import AgentPort
from vmferry.controller.cluster import Cluster, spec_of
from vmferry.controller.history import History
from vmferry.controller.plan import Plan, make_plan, qemu_downtime_limit_ms
from vmferry.core.errors import ConfigError, FerryError, StateError
from vmferry.core.handoff import VerifyMode
from vmferry.core.model import MECHANISMS, STRATEGIES, Mechanism, MigrationOptions
from vmferry.core.predict import StrategyPrediction
from vmferry.core.recovery import RecoveryPolicy
from vmferry.core.strategy import Goal

__all__ = ["STRATEGIES", "GoalUnreachable", "MigrationRequest", "planned", "precheck"]

logger = logging.getLogger(__name__)


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
    # Compare both stopped copies before the destination runs (see core/handoff.py). The
    # default hashes a seeded sample: a few ms of the guest's pause (bench/verify.py).
    verify: VerifyMode = VerifyMode.SAMPLE
    # Its switchover has the source's link to itself (a job's moves: see MigrationOptions).
    switch_priority: bool = False

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
            best_effort=self.force,
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
            # Held for the comparison unless the move is post-copy from the start (then the
            # guest must run on the destination the moment it switches over).
            hold=self.verify is not VerifyMode.OFF and strategy not in ("postcopy", "hybrid"),
            switch_priority=self.switch_priority and strategy not in ("postcopy", "hybrid"),
        )


async def precheck(
    cluster: Cluster, request: MigrationRequest
) -> tuple[VmInfo, AgentPort, AgentPort]:
    """Where the VM runs, and both agents; refuses a move that cannot start.

    The VM is looked for and the destination asked about itself at once (one round trip less
    before the move starts); errors are raised in the order the checks read.

    Raises:
        ConfigError: unknown VM or host, the VM is there already, no room or hardware for it,
            no QEMU TLS credentials for ``--tls``.
        StateError: the VM is not running.
        FerryError: an agent did not answer.
    """
    destination = cluster.client(request.destination)
    info, host = await asyncio.gather(
        cluster.locate(request.vm), destination.host_info(), return_exceptions=True
    )
    if isinstance(info, BaseException):
        raise info
    if info.host == request.destination:
        raise ConfigError(f"VM {request.vm!r} already runs on {request.destination}")
    if info.state != "running":
        raise StateError(f"VM {request.vm}", info.state, "running (one migration at a time)")
    if isinstance(host, BaseException):
        raise host
    spec = spec_of(info)
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


async def planned(
    cluster: Cluster,
    request: MigrationRequest,
    info: VmInfo,
    history: History | None,
    on_plan: Callable[[Plan], None] | None = None,
) -> tuple[Mechanism, MigrationOptions, StrategyPrediction | None]:
    """Resolve the strategy (choosing one for 'auto') and find its prediction; ``on_plan``
    sees the plan, when one was made (the progress line's ETA learns the guest from it)."""
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
    if on_plan is not None:
        on_plan(plan)
    if request.strategy == "auto":
        if not plan.choice.meets_goal and not request.force:
            raise GoalUnreachable(f"{plan.choice.reason} (--force tries the best effort)")
        mechanism, options = request.resolve(plan.choice.strategy)
    else:
        mechanism, options = request.resolve()
    return mechanism, options, plan.prediction_for(mechanism)
