"""HTTP client of one agent, used by the controller and the lab. Typed methods, typed errors.

Every call has a deadline. An agent's error response is turned back into the vmferry error
class it reported (``NotFound``, ``CapacityError``, ``StateError`` …); a dead agent becomes
:class:`AgentUnreachable`.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import ssl
from pathlib import Path
from types import TracebackType
from typing import Any

from vmferry.agent.api import (
    API_PREFIX,
    ERRORS_BY_NAME,
    Arrival,
    CapacityError,
    GuestMeasurement,
    HandoffDigests,
    HostInfo,
    NotFound,
    OutgoingResult,
    Profile,
    VmInfo,
    exec_from_json,
    integrity_from_json,
    stats_from_json,
)
from vmferry.agent.port import AgentPort
from vmferry.agent.tls import client_context
from vmferry.agent.transport import ConnectionPool, TransportError
from vmferry.core.errors import ConfigError, FerryError, GuestError, QEMUNotFound, StateError
from vmferry.core.handoff import VerifyMode
from vmferry.core.model import (
    IntegrityReport,
    MigrationOptions,
    MigrationStats,
    NbdTarget,
    VmSpec,
    spec_to_json,
)
from vmferry.core.status import MigrationStatus, RunState
from vmferry.qemu.guest_agent import ExecResult

__all__ = [
    "AgentClient",
    "AgentError",
    "AgentUnreachable",
    "agent_ssl",
    "error_from_agent",
    "options_to_json",
]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 30.0
BOOT_TIMEOUT_S = 180.0  # creating a VM boots it under TCG
CREATE_TIMEOUT_S = 3600.0  # creating a VM from a user's image copies the image first
INCOMING_TIMEOUT_S = 60.0  # starting a destination QEMU
MEASURE_TIMEOUT_S = 60.0  # profiling a guest (dirty rate, memory sample, disk writes)
SINK_SLACK_S = 10.0  # on top of a sink's wait
PROBE_SLACK_S = 30.0  # on top of a probe's duration


class AgentUnreachable(FerryError):
    """The agent did not answer (not running, wrong address, network down)."""


class AgentError(FerryError):
    """The agent answered with an error we have no better class for."""


def agent_ssl(url: str, ca_file: Path | None) -> ssl.SSLContext | bool:
    """How to connect to an agent at ``url``: the CA-pinned context for HTTPS, False for HTTP.

    Raises:
        ConfigError: ``https://`` without a CA file, or the CA cannot be read.
    """
    if not url.startswith("https://"):
        return False  # a plain-HTTP agent, run with --insecure-http on purpose
    if ca_file is None:
        raise ConfigError(f"{url} serves HTTPS: the cluster CA file is needed to verify it")
    return client_context(ca_file)


def options_to_json(options: MigrationOptions) -> dict[str, object]:
    return {
        "max_bandwidth_bps": options.max_bandwidth_bps,
        "downtime_limit_ms": options.downtime_limit_ms,
        "timeout_s": options.timeout_s,
        "mechanism": options.mechanism,
        "postcopy_ready": options.postcopy_ready,
        "hold": options.hold,
        "multifd_channels": options.multifd_channels,
        "xbzrle_cache_bytes": options.xbzrle_cache_bytes,
        "tls": options.tls,
        "switch_priority": options.switch_priority,
    }


# Error classes whose constructor takes just a message, so the agent's error comes back as is.
_REBUILDABLE: frozenset[type[FerryError]] = frozenset(
    {NotFound, CapacityError, ConfigError, StateError, GuestError, QEMUNotFound, FerryError}
)


def error_from_agent(type_name: str, message: str, what: str) -> FerryError:
    """The error a caller of an agent gets for the agent's error ``type_name`` (its class
    name) saying ``message``: the same class where it can be rebuilt from a message, else
    :class:`AgentError`. Every :class:`~vmferry.agent.port.AgentPort` maps errors this way."""
    cls = ERRORS_BY_NAME.get(type_name)
    if cls is None or cls not in _REBUILDABLE:
        return AgentError(f"{what}: {message}")
    return cls(message)


def _raise_error(status: int, body: object, what: str) -> None:
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        raise AgentError(f"{what}: HTTP {status}")
    name, message = str(error.get("type")), str(error.get("message"))
    if status == 401:
        raise ConfigError(f"{what}: the agent refused our token ({message})")
    raise error_from_agent(name, message, what)


def _migration_status(data: dict[str, Any], key: str) -> MigrationStatus:
    """Raises: AgentError: not a migration status."""
    try:
        return MigrationStatus(str(data[key]))
    except (KeyError, ValueError) as err:
        raise AgentError(f"malformed migration status in {data!r}") from err


class AgentClient:
    """A connection pool to one agent. Use as ``async with AgentClient(name, url, token, ca)``.

    An ``https://`` agent is verified against ``ca_file`` (the cluster CA) only.

    Raises:
        ConfigError: an ``https://`` URL without a CA file, or an unreadable CA.
    """

    def __init__(self, name: str, url: str, token: str, ca_file: Path | None = None) -> None:
        self.name = name
        self.url = url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"}
        self._ssl = agent_ssl(self.url, ca_file)
        self._pool: ConnectionPool | None = None

    async def __aenter__(self) -> AgentClient:
        self._pool = ConnectionPool(self.url, self._ssl)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def _call(
        self,
        method: str,
        path: str,
        body: dict[str, object] | None = None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        params: dict[str, str] | None = None,
    ) -> Any:
        if self._pool is None:
            raise FerryError("AgentClient used outside 'async with'")
        what = f"{self.name}: {method} {path}"
        logger.debug("--> %s %s", what, body)
        try:
            async with asyncio.timeout(timeout_s):
                status, data = await self._pool.request(
                    method, f"{API_PREFIX}{path}", body, headers=self._headers, params=params
                )
        except TimeoutError as err:
            raise AgentUnreachable(f"{what}: no answer within {timeout_s:g} s") from err
        except TransportError as err:
            raise AgentUnreachable(f"{what}: {err}") from err
        except ValueError as err:
            raise AgentError(f"{what}: malformed reply ({err})") from err
        logger.debug("<-- %s %s %s", what, status, data)
        if status >= 400:
            _raise_error(status, data, what)
        return data

    async def host_info(self, timeout_s: float = 5.0) -> HostInfo:
        return HostInfo.from_json(await self._call("GET", "/host", timeout_s=timeout_s))

    async def list_vms(self) -> list[VmInfo]:
        return [VmInfo.from_json(item) for item in await self._call("GET", "/vms")]

    async def get_vm(self, name: str, timeout_s: float | None = None) -> VmInfo:
        return VmInfo.from_json(
            await self._call("GET", f"/vms/{name}", timeout_s=timeout_s or DEFAULT_TIMEOUT_S)
        )

    async def qemu_state(
        self, name: str, timeout_s: float = 10.0
    ) -> tuple[RunState, MigrationStatus]:
        """QEMU's own run state and migration status of VM ``name`` here (``GONE``: no QEMU
        runs it).

        Raises:
            AgentError: a malformed answer; as for every call.
        """
        data = await self._call("GET", f"/vms/{name}/runstate", timeout_s=timeout_s)
        return RunState.parse(str(data["runstate"])), _migration_status(data, "migration")

    async def create_vm(self, spec: VmSpec, image: Path | None = None) -> VmInfo:
        body: dict[str, object] = {"spec": spec_to_json(spec)}
        body["image"] = None if image is None else str(image)
        data = await self._call("POST", "/vms", body, timeout_s=CREATE_TIMEOUT_S)
        return VmInfo.from_json(data)

    async def delete_vm(self, name: str) -> None:
        await self._call("DELETE", f"/vms/{name}")

    async def verify(self, name: str) -> IntegrityReport:
        return integrity_from_json(
            await self._call("POST", f"/vms/{name}/verify", timeout_s=BOOT_TIMEOUT_S)
        )

    async def prepare_incoming(
        self, spec: VmSpec, options: MigrationOptions
    ) -> tuple[str, NbdTarget | None]:
        """Returns the RAM URI and, for a disk on local storage, the NBD export to mirror to."""
        data = await self._call(
            "POST",
            "/incoming",
            {"spec": spec_to_json(spec), "options": options_to_json(options)},
            timeout_s=INCOMING_TIMEOUT_S,
        )
        nbd = data.get("nbd")
        return str(data["uri"]), None if nbd is None else NbdTarget.from_json(nbd)

    async def finish_incoming(self, name: str) -> Arrival:
        data = await self._call("POST", f"/vms/{name}/finish", timeout_s=BOOT_TIMEOUT_S)
        return Arrival.from_json(data)

    async def abort_incoming(self, name: str) -> None:
        await self._call("POST", f"/vms/{name}/abort")

    async def start_migration(
        self, name: str, uri: str, options: MigrationOptions, nbd: NbdTarget | None = None
    ) -> None:
        await self._call(
            "POST",
            f"/vms/{name}/migrate",
            {
                "uri": uri,
                "options": options_to_json(options),
                "nbd": None if nbd is None else nbd.to_json(),
            },
        )

    async def migration_progress(
        self, name: str, since: int, wait_s: float = 1.0, *, timeout_s: float | None = None
    ) -> tuple[list[MigrationStats], int, OutgoingResult | None]:
        data = await self._call(
            "GET",
            f"/vms/{name}/migration",
            params={"since": str(since), "wait": str(wait_s)},
            timeout_s=wait_s + DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s,
        )
        result = data.get("result")
        return (
            [stats_from_json(s) for s in data["samples"]],
            int(data["next"]),
            None if result is None else OutgoingResult.from_json(result),
        )

    async def measure(self, name: str) -> GuestMeasurement:
        return GuestMeasurement.from_json(
            await self._call("POST", f"/vms/{name}/measure", timeout_s=MEASURE_TIMEOUT_S)
        )

    async def profile(self, name: str, address: str | None = None) -> Profile:
        params = None if address is None else {"address": address}
        return Profile.from_json(await self._call("GET", f"/vms/{name}/profile", params=params))

    async def record_bandwidth(self, address: str, bandwidth_bps: float) -> None:
        await self._call(
            "POST", "/paths/bandwidth", {"address": address, "bandwidth_bps": bandwidth_bps}
        )

    async def open_sink(self) -> int:
        return int((await self._call("POST", "/bandwidth/sinks"))["port"])

    async def sink_result(self, port: int, wait_s: float = 10.0) -> float:
        """Bytes/s the sink measured."""
        data = await self._call(
            "GET",
            f"/bandwidth/sinks/{port}",
            params={"wait": str(wait_s)},
            timeout_s=wait_s + SINK_SLACK_S,
        )
        return float(data["bandwidth_bps"])

    async def probe(self, address: str, port: int, duration_ms: int = 1000) -> float:
        """Bytes/s the sender saw."""
        data = await self._call(
            "POST",
            "/bandwidth/probe",
            {"address": address, "port": port, "duration_ms": duration_ms},
            timeout_s=duration_ms / 1000 + PROBE_SLACK_S,
        )
        return float(data["bandwidth_bps"])

    async def start_postcopy(self, name: str) -> None:
        await self._call("POST", f"/vms/{name}/postcopy")

    async def set_migration_cap(self, name: str, bandwidth_bps: int) -> None:
        await self._call("POST", f"/vms/{name}/bandwidth", {"bandwidth_bps": bandwidth_bps})

    async def cancel_migration(self, name: str) -> None:
        await self._call("POST", f"/vms/{name}/cancel")

    async def release_disk(self, name: str) -> None:
        """Have a destination drop the NBD export of an incoming VM's disk."""
        await self._call("POST", f"/vms/{name}/release-disk")

    async def continue_switchover(self, name: str) -> None:
        """Let a source whose disk is synced (status DISK_SYNCED) finish the switchover."""
        await self._call("POST", f"/vms/{name}/switchover")

    async def handoff_digests(
        self, name: str, mode: VerifyMode, seed: int, timeout_s: float
    ) -> HandoffDigests:
        body: dict[str, object] = {"mode": str(mode), "seed": seed, "timeout_s": timeout_s}
        data = await self._call(
            "POST", f"/vms/{name}/digests", body, timeout_s=timeout_s + DEFAULT_TIMEOUT_S
        )
        return HandoffDigests.from_json(data)

    async def guest_exec(
        self, name: str, argv: list[str], timeout_s: float, input_bytes: bytes | None = None
    ) -> ExecResult:
        body: dict[str, object] = {"argv": argv, "timeout_s": timeout_s}
        if input_bytes is not None:
            body["input"] = base64.b64encode(input_bytes).decode("ascii")
        data = await self._call(
            "POST", f"/vms/{name}/exec", body, timeout_s=timeout_s + DEFAULT_TIMEOUT_S
        )
        try:
            return exec_from_json(data)
        except (KeyError, ValueError) as err:
            raise AgentError(f"malformed exec answer from {self.name}: {err}") from err

    async def release_hold(self, name: str) -> None:
        await self._call("POST", f"/vms/{name}/release-hold")

    async def handoff(self, name: str) -> None:
        await self._call("POST", f"/vms/{name}/handoff")

    async def forget(self, name: str) -> None:
        """Drop the record of a VM whose QEMU died on this host."""
        await self._call("POST", f"/vms/{name}/forget")

    async def resume_source(self, name: str) -> None:
        """Run the guest again on a source whose completed pre-copy lost its destination."""
        await self._call("POST", f"/vms/{name}/resume-source")

    # -- post-copy recovery (short deadlines: the link may be down again) ------------------------

    async def pause_postcopy(
        self, name: str, attempt: int, timeout_s: float = 15.0
    ) -> MigrationStatus:
        """Pause a broken post-copy on this agent's side; returns ``postcopy-paused`` (or
        ``completed`` if it finished meanwhile; ``postcopy-active`` from a source whose link
        to the destination works: nothing paused). ``attempt`` numbers the controller's
        recovery attempts: the agent refuses older ones (requests TCP delivered late)."""
        data = await self._call(
            "POST", f"/vms/{name}/postcopy/pause", {"attempt": attempt}, timeout_s=timeout_s
        )
        return _migration_status(data, "status")

    async def recover_postcopy(self, name: str, attempt: int, timeout_s: float = 10.0) -> str:
        """Have a destination whose post-copy is paused listen again; returns the URI."""
        data = await self._call(
            "POST", f"/vms/{name}/postcopy/recover", {"attempt": attempt}, timeout_s=timeout_s
        )
        return str(data["uri"])

    async def resume_postcopy(
        self, name: str, uri: str, attempt: int, timeout_s: float = 20.0
    ) -> MigrationStatus:
        """Resume a source's paused post-copy to ``uri``; returns the status it reached."""
        data = await self._call(
            "POST",
            f"/vms/{name}/postcopy/resume",
            {"uri": uri, "attempt": attempt},
            timeout_s=timeout_s,
        )
        return _migration_status(data, "status")


def _speaks_port(client: AgentClient) -> AgentPort:
    return client  # mypy checks here that AgentClient satisfies AgentPort
