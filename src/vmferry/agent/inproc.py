"""An agent running in this process, spoken to through :class:`~vmferry.agent.port.AgentPort`.

:class:`InProcessAgent` calls a :class:`~vmferry.agent.host.HostAgent` directly, where
:class:`~vmferry.agent.client.AgentClient` sends the same requests over HTTP to
:mod:`vmferry.agent.server`. What the controller sees is the same: the same values, and the same
errors for the same failure (errors pass through :func:`~vmferry.agent.client.error_from_agent`
as the HTTP server and client pass them; a call that outlives its deadline raises
``AgentUnreachable``). The one-machine lab (:mod:`vmferry.lab.local`) runs the migration engine
over these.

Unlike over HTTP, a deadline here cancels the agent's operation itself (an HTTP agent carries
on after its client gave up); the deadlines are long enough that this is a fault either way.

Example:
    >>> agent = InProcessAgent("host-1", host_agent)                  # doctest: +SKIP
    >>> await agent.create_vm(spec)                                   # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import TypeVar

from vmferry.agent.api import (
    PROGRESS_WAIT_MAX_S,
    SINK_WAIT_MAX_S,
    Arrival,
    GuestMeasurement,
    HandoffDigests,
    HostInfo,
    OutgoingResult,
    Profile,
    VmInfo,
)
from vmferry.agent.client import (
    BOOT_TIMEOUT_S,
    CREATE_TIMEOUT_S,
    DEFAULT_TIMEOUT_S,
    INCOMING_TIMEOUT_S,
    MEASURE_TIMEOUT_S,
    PROBE_SLACK_S,
    SINK_SLACK_S,
    AgentError,
    AgentUnreachable,
    error_from_agent,
)
from vmferry.agent.host import HostAgent
from vmferry.agent.port import AgentPort
from vmferry.core.errors import ConfigError, FerryError
from vmferry.core.handoff import VerifyMode
from vmferry.core.model import (
    IntegrityReport,
    MigrationOptions,
    MigrationStats,
    NbdTarget,
    VmSpec,
)
from vmferry.core.status import MigrationStatus, RunState
from vmferry.qemu.guest_agent import ExecResult

__all__ = ["InProcessAgent"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


@contextlib.contextmanager
def _as_reported(what: str) -> Iterator[None]:
    """Turn an agent-side error into the one an HTTP client of that agent would get."""
    try:
        yield
    except FerryError as err:
        if not isinstance(err, ConfigError):
            logger.error("%s failed: %s", what, err)
        raise error_from_agent(type(err).__name__, str(err), what) from err
    except Exception as err:
        # The service boundary: over HTTP any other error becomes a 500 without a vmferry
        # error body, which the client reports as AgentError.
        logger.error("%s failed: %r", what, err, exc_info=True)
        raise AgentError(f"{what}: HTTP 500") from err


class InProcessAgent:
    """The agent of host ``name``, called directly (no HTTP) in this process."""

    def __init__(self, name: str, host_agent: HostAgent) -> None:
        self.name = name
        self.host_agent = host_agent

    async def _call(self, what: str, operation: Awaitable[T], timeout_s: float) -> T:
        label = f"{self.name}: {what}"
        deadline = asyncio.timeout(timeout_s)
        try:
            async with deadline:
                with _as_reported(label):
                    return await operation
        except TimeoutError as err:
            if not deadline.expired():
                raise
            raise AgentUnreachable(f"{label}: no answer within {timeout_s:g} s") from err

    # -- host and VMs --------------------------------------------------------------------------

    async def host_info(self, timeout_s: float = 5.0) -> HostInfo:
        with _as_reported(f"{self.name}: host"):
            return self.host_agent.info()

    async def list_vms(self) -> list[VmInfo]:
        with _as_reported(f"{self.name}: vms"):
            return self.host_agent.list_vms()

    async def get_vm(self, name: str, timeout_s: float | None = None) -> VmInfo:
        with _as_reported(f"{self.name}: vm {name}"):
            return self.host_agent.get(name)

    async def qemu_state(
        self, name: str, timeout_s: float = 10.0
    ) -> tuple[RunState, MigrationStatus]:
        return await self._call(f"runstate {name}", self.host_agent.qemu_state(name), timeout_s)

    async def create_vm(self, spec: VmSpec, image: Path | None = None) -> VmInfo:
        return await self._call(
            f"create {spec.name}", self.host_agent.create(spec, image), CREATE_TIMEOUT_S
        )

    async def delete_vm(self, name: str) -> None:
        await self._call(f"delete {name}", self.host_agent.delete(name), DEFAULT_TIMEOUT_S)

    async def verify(self, name: str) -> IntegrityReport:
        return await self._call(f"verify {name}", self.host_agent.verify(name), BOOT_TIMEOUT_S)

    # -- pre-flight ----------------------------------------------------------------------------

    async def measure(self, name: str) -> GuestMeasurement:
        return await self._call(f"measure {name}", self.host_agent.measure(name), MEASURE_TIMEOUT_S)

    async def profile(self, name: str, address: str | None = None) -> Profile:
        with _as_reported(f"{self.name}: profile {name}"):
            return self.host_agent.profile(name, address)

    async def record_bandwidth(self, address: str, bandwidth_bps: float) -> None:
        with _as_reported(f"{self.name}: path {address}"):
            self.host_agent.record_bandwidth(address, bandwidth_bps)

    async def open_sink(self) -> int:
        return await self._call("open sink", self.host_agent.open_sink(), DEFAULT_TIMEOUT_S)

    async def sink_result(self, port: int, wait_s: float = 10.0) -> float:
        result = await self._call(
            f"sink {port}",
            self.host_agent.sink_result(port, min(wait_s, SINK_WAIT_MAX_S)),
            wait_s + SINK_SLACK_S,
        )
        return result.bandwidth_bps

    async def probe(self, address: str, port: int, duration_ms: int = 1000) -> float:
        result = await self._call(
            f"probe {address}:{port}",
            self.host_agent.probe(address, port, duration_ms),
            duration_ms / 1000 + PROBE_SLACK_S,
        )
        return result.bandwidth_bps

    # -- destination side ----------------------------------------------------------------------

    async def prepare_incoming(
        self, spec: VmSpec, options: MigrationOptions
    ) -> tuple[str, NbdTarget | None]:
        return await self._call(
            f"incoming {spec.name}",
            self.host_agent.prepare_incoming(spec, options),
            INCOMING_TIMEOUT_S,
        )

    async def finish_incoming(self, name: str) -> Arrival:
        return await self._call(
            f"finish {name}", self.host_agent.finish_incoming(name), BOOT_TIMEOUT_S
        )

    async def abort_incoming(self, name: str) -> None:
        await self._call(f"abort {name}", self.host_agent.abort_incoming(name), DEFAULT_TIMEOUT_S)

    async def release_disk(self, name: str) -> None:
        await self._call(
            f"release disk {name}", self.host_agent.release_disk(name), DEFAULT_TIMEOUT_S
        )

    # -- source side ---------------------------------------------------------------------------

    async def start_migration(
        self, name: str, uri: str, options: MigrationOptions, nbd: NbdTarget | None = None
    ) -> None:
        with _as_reported(f"{self.name}: migrate {name}"):
            self.host_agent.start_outgoing(name, uri, options, nbd)

    async def migration_progress(
        self, name: str, since: int, wait_s: float = 1.0, *, timeout_s: float | None = None
    ) -> tuple[list[MigrationStats], int, OutgoingResult | None]:
        since = max(since, 0)
        samples, result = await self._call(
            f"progress {name}",
            self.host_agent.outgoing_progress(name, since, min(wait_s, PROGRESS_WAIT_MAX_S)),
            wait_s + DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s,
        )
        return samples, since + len(samples), result

    async def start_postcopy(self, name: str) -> None:
        await self._call(
            f"postcopy {name}", self.host_agent.start_postcopy(name), DEFAULT_TIMEOUT_S
        )

    async def set_migration_cap(self, name: str, bandwidth_bps: int) -> None:
        await self._call(
            f"cap {name}", self.host_agent.set_outgoing_cap(name, bandwidth_bps), DEFAULT_TIMEOUT_S
        )

    async def cancel_migration(self, name: str) -> None:
        await self._call(f"cancel {name}", self.host_agent.cancel_outgoing(name), DEFAULT_TIMEOUT_S)

    async def continue_switchover(self, name: str) -> None:
        with _as_reported(f"{self.name}: switchover {name}"):
            self.host_agent.continue_outgoing(name)

    async def handoff_digests(
        self, name: str, mode: VerifyMode, seed: int, timeout_s: float
    ) -> HandoffDigests:
        return await self._call(
            f"digests {name}",
            self.host_agent.handoff_digests(name, mode, seed, timeout_s),
            timeout_s + DEFAULT_TIMEOUT_S,
        )

    async def guest_exec(
        self, name: str, argv: list[str], timeout_s: float, input_bytes: bytes | None = None
    ) -> ExecResult:
        return await self._call(
            f"exec in {name}",
            self.host_agent.guest_exec(name, argv, timeout_s, input_bytes),
            timeout_s + DEFAULT_TIMEOUT_S,
        )

    async def release_hold(self, name: str) -> None:
        await self._call(
            f"release hold {name}", self.host_agent.release_hold(name), DEFAULT_TIMEOUT_S
        )

    async def handoff(self, name: str) -> None:
        await self._call(f"handoff {name}", self.host_agent.handoff(name), DEFAULT_TIMEOUT_S)

    async def forget(self, name: str) -> None:
        await self._call(f"forget {name}", self.host_agent.forget(name), DEFAULT_TIMEOUT_S)

    async def resume_source(self, name: str) -> None:
        await self._call(
            f"resume source {name}", self.host_agent.resume_source(name), DEFAULT_TIMEOUT_S
        )

    # -- post-copy recovery --------------------------------------------------------------------

    async def pause_postcopy(
        self, name: str, attempt: int, timeout_s: float = 15.0
    ) -> MigrationStatus:
        return await self._call(
            f"pause postcopy {name}", self.host_agent.pause_postcopy(name, attempt), timeout_s
        )

    async def recover_postcopy(self, name: str, attempt: int, timeout_s: float = 10.0) -> str:
        return await self._call(
            f"recover postcopy {name}", self.host_agent.recover_incoming(name, attempt), timeout_s
        )

    async def resume_postcopy(
        self, name: str, uri: str, attempt: int, timeout_s: float = 20.0
    ) -> MigrationStatus:
        return await self._call(
            f"resume postcopy {name}",
            self.host_agent.resume_outgoing(name, uri, attempt),
            timeout_s,
        )


def _speaks_port(agent: InProcessAgent) -> AgentPort:
    return agent  # mypy checks here that InProcessAgent satisfies AgentPort
