"""The one vocabulary for talking to a host agent: what the controller may ask of it.

Two implementations speak it: :class:`vmferry.agent.client.AgentClient` (HTTP, the agent runs
elsewhere) and :class:`vmferry.agent.inproc.InProcessAgent` (the agent runs in this process,
as in the one-machine lab). Both raise the same errors for the same failure: ``NotFound``,
``CapacityError``, ``ConfigError``, ``StateError``, ``GuestError``, ``QEMUNotFound`` come back
as themselves, any other agent-side error as ``AgentError``, and an agent that did not answer
in time as ``AgentUnreachable`` (see :mod:`vmferry.agent.client`).

mypy checks that both satisfy :class:`AgentPort` (see the end of each module).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from vmferry.agent.api import (
    Arrival,
    GuestMeasurement,
    HandoffDigests,
    HostInfo,
    OutgoingResult,
    Profile,
    VmInfo,
)
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

__all__ = ["AgentPort"]


class AgentPort(Protocol):
    """One host's agent, as the controller uses it. Every call has a deadline.

    Raises (every method):
        AgentUnreachable: no answer within the call's deadline.
        AgentError: the agent failed in a way the caller cannot act on specifically.
        NotFound, CapacityError, ConfigError, StateError, GuestError: as the agent reported.
    """

    @property
    def name(self) -> str:
        """The host this agent runs."""
        ...

    # -- host and VMs --------------------------------------------------------------------------

    async def host_info(self, timeout_s: float = ...) -> HostInfo: ...

    async def list_vms(self) -> list[VmInfo]: ...

    async def get_vm(self, name: str, timeout_s: float | None = ...) -> VmInfo: ...

    async def qemu_state(
        self, name: str, timeout_s: float = ...
    ) -> tuple[RunState, MigrationStatus]:
        """QEMU's own run state and migration status of VM ``name`` (``gone``: no QEMU)."""
        ...

    async def create_vm(self, spec: VmSpec, image: Path | None = ...) -> VmInfo:
        """Boot a new VM; with ``image`` its disk is a copy of that image (a path on the
        agent's host), and the disk's size is the image's."""
        ...

    async def delete_vm(self, name: str) -> None: ...

    async def verify(self, name: str) -> IntegrityReport: ...

    # -- pre-flight ----------------------------------------------------------------------------

    async def measure(self, name: str) -> GuestMeasurement:
        """Measure VM ``name`` now (~1 s); it becomes its rolling profile."""
        ...

    async def profile(self, name: str, address: str | None = ...) -> Profile:
        """VM ``name``'s rolling profile and the path from this host to migration address
        ``address``, as last measured, with their ages (answers at once)."""
        ...

    async def record_bandwidth(self, address: str, bandwidth_bps: float) -> None:
        """Remember a probe's figure for the path from this host to ``address``."""
        ...

    async def open_sink(self) -> int:
        """Open a bandwidth sink; returns its TCP port."""
        ...

    async def sink_result(self, port: int, wait_s: float = ...) -> float:
        """Bytes/s the sink measured."""
        ...

    async def probe(self, address: str, port: int, duration_ms: int = ...) -> float:
        """Bytes/s the sender saw."""
        ...

    # -- destination side ----------------------------------------------------------------------

    async def prepare_incoming(
        self, spec: VmSpec, options: MigrationOptions
    ) -> tuple[str, NbdTarget | None]:
        """The RAM URI and, for a disk on local storage, the NBD export to mirror to."""
        ...

    async def finish_incoming(self, name: str) -> Arrival:
        """The guest runs here: its first heartbeat, its page check, its guest agent."""
        ...

    async def abort_incoming(self, name: str) -> None: ...

    async def release_disk(self, name: str) -> None: ...

    # -- source side ---------------------------------------------------------------------------

    async def start_migration(
        self, name: str, uri: str, options: MigrationOptions, nbd: NbdTarget | None = ...
    ) -> None: ...

    async def migration_progress(
        self, name: str, since: int, wait_s: float = ..., *, timeout_s: float | None = ...
    ) -> tuple[list[MigrationStats], int, OutgoingResult | None]:
        """Samples from number ``since`` on, the number of the next one, and the outcome
        once there is one; waits up to ``wait_s`` for something new."""
        ...

    async def start_postcopy(self, name: str) -> None: ...

    async def set_migration_cap(self, name: str, bandwidth_bps: int) -> None:
        """Change the bandwidth cap of VM ``name``'s outgoing migration while it sends (QEMU's
        pre-copy and post-copy caps, or the disk mirror's during the disk copy)."""
        ...

    async def cancel_migration(self, name: str) -> None: ...

    async def continue_switchover(self, name: str) -> None: ...

    async def handoff_digests(
        self, name: str, mode: VerifyMode, seed: int, timeout_s: float
    ) -> HandoffDigests:
        """Digests of this side's stopped copy (see :mod:`vmferry.agent.handoff`)."""
        ...

    async def guest_exec(
        self, name: str, argv: list[str], timeout_s: float, input_bytes: bytes | None = ...
    ) -> ExecResult:
        """Run a command in the guest through its guest agent; its exit and output."""
        ...

    async def release_hold(self, name: str) -> None:
        """A held destination runs the guest as soon as it arrives (post-copy starts)."""
        ...

    async def handoff(self, name: str) -> None: ...

    async def forget(self, name: str) -> None: ...

    async def resume_source(self, name: str) -> None: ...

    # -- post-copy recovery --------------------------------------------------------------------

    async def pause_postcopy(
        self, name: str, attempt: int, timeout_s: float = ...
    ) -> MigrationStatus: ...

    async def recover_postcopy(self, name: str, attempt: int, timeout_s: float = ...) -> str: ...

    async def resume_postcopy(
        self, name: str, uri: str, attempt: int, timeout_s: float = ...
    ) -> MigrationStatus: ...
