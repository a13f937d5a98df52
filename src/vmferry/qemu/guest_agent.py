"""Host side of qemu-guest-agent (QGA): ping, clock, command execution, agent and OS info.

QEMU exposes the guest's virtio-serial port ``org.qemu.guest_agent.0`` as a UNIX socket on the
host (a ``socket`` chardev, ``server=on,wait=off``). The protocol is QMP-like JSON without a
greeting, and the socket cannot tell whether an agent runs in the guest: QEMU accepts the
connection and takes writes either way. Hence every call has a deadline, and a silent agent is
a :class:`GuestAgentTimeout` (or ``False`` from :meth:`GuestAgent.ping`), never a hang.

One connection per call: QEMU's chardev serves one client at a time and leaves a second one
connected but unanswered until the first disconnects. Holding the connection between calls
would lock out every other client (an operator's ``socat``, a second vmferry process) for the
VM's lifetime; connecting per call costs one extra round trip (and up to ~100 ms in a guest:
qemu-ga polls its virtio port every 100 ms while no host client is attached) and lets them take
turns. Each connection starts with ``guest-sync-delimited`` (a 0xFF byte first, so the agent
drops any half-read request of an earlier client; then everything up to the agent's 0xFF
sentinel and any stale sync answer is discarded), so replies to an earlier, timed-out request
are never taken for ours. Within one :class:`GuestAgent` a lock keeps one request in flight.

Raw JSON stays in this module: replies are parsed into frozen dataclasses. Traffic is logged
at DEBUG as ``-->`` / ``<--``, long strings (exec input and output) shortened to their length.

Example:
    >>> agent = GuestAgent(Path("/run/vm1/qga.sock"), "vm1")     # doctest: +SKIP
    >>> await agent.ping(timeout_s=2.0)                           # doctest: +SKIP
    True
    >>> (await agent.exec(["uname", "-r"], timeout_s=10.0)).stdout  # doctest: +SKIP
    b'6.1.0-31-cloud-amd64\\n'
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from vmferry.core.errors import (
    ConfigError,
    GuestAgentCommandError,
    GuestAgentError,
    GuestAgentTimeout,
)

__all__ = ["ExecResult", "GuestAgent", "GuestInfo"]

logger = logging.getLogger(__name__)

_SENTINEL = b"\xff"
# A reply line may carry 16 MiB of captured output per stream (qemu-ga's cap), base64-encoded.
_LINE_LIMIT_BYTES = 64 << 20
_CONNECT_RETRY_S = 0.05
# guest-exec-status polling: quick for short commands, then backing off to spare the channel.
_POLL_FIRST_S = 0.01
_POLL_MAX_S = 0.25
# qemu-ga parses ids as signed 64-bit integers (it rejects larger ones).
_SYNC_ID_BITS = 62
_LOG_STRING_CHARS = 64


@dataclass(frozen=True, slots=True)
class ExecResult:
    """A command's end in the guest (``guest-exec-status`` once it exited).

    Attributes:
        exit_code: its exit status; None when a signal ended it.
        signal: the signal that ended it (Windows: the exception code), else None.
        stdout, stderr: what it wrote, decoded from base64.
        truncated: the agent kept only the first part of stdout or stderr (qemu-ga: 16 MiB).
    """

    exit_code: int | None
    signal: int | None
    stdout: bytes
    stderr: bytes
    truncated: bool


@dataclass(frozen=True, slots=True)
class GuestInfo:
    """The agent's version and commands (``guest-info``) and the guest OS (``guest-get-osinfo``).

    Attributes:
        agent_version: qemu-ga's version (e.g. ``7.2.22``).
        enabled_commands: the commands the guest's administrator left enabled (distributions
            and admins block some, e.g. ``guest-exec``).
        os_pretty_name: os-release's PRETTY_NAME (Windows: the product name); None when the
            agent cannot tell.
        kernel_release: uname's release (Windows: the build number); None when unknown.
    """

    agent_version: str
    enabled_commands: frozenset[str]
    os_pretty_name: str | None
    kernel_release: str | None

    def can(self, command: str) -> bool:
        """Whether the agent runs ``command`` (known and enabled)."""
        return command in self.enabled_commands


class GuestAgent:
    """Client of one VM's qemu-guest-agent socket.

    Every method connects, synchronises, runs its command(s) and disconnects within its
    ``timeout_s`` (waiting for an earlier call on this object included).
    """

    def __init__(self, socket_path: Path, label: str) -> None:
        self.socket_path = socket_path
        self.label = label
        self.logger = logger.getChild(label)
        self._lock = asyncio.Lock()

    async def ping(self, timeout_s: float) -> bool:
        """Whether an agent answers ``guest-ping`` within ``timeout_s``.

        Returns:
            False when nothing answers in time (the guest may not run an agent, or not yet).

        Raises:
            GuestAgentError: the socket is missing or refuses (QEMU is not running), the
                connection dropped, or the agent broke the protocol or refused the ping.
        """
        try:
            async with self._session(timeout_s) as session:
                await session.call("guest-ping")
        except GuestAgentTimeout:
            return False
        return True

    async def sync_time(self, timeout_s: float) -> None:
        """Set the guest's clock to the host's (``guest-set-time`` with the host's time in ns;
        the agent then writes it to the guest's RTC too), as OpenStack Nova does after a
        migration or resume, when the guest's clock lags by the time it was paused.

        Raises:
            GuestAgentTimeout: no answer in time.
            GuestAgentCommandError: the agent refused (e.g. the command is blocked).
            GuestAgentError: the socket is unreachable or the connection broke.
        """
        async with self._session(timeout_s) as session:
            # Read the host clock after the sync round trip, as close to the send as we can.
            await session.call("guest-set-time", {"time": time.time_ns()})

    async def guest_time_ns(self, timeout_s: float) -> int:
        """The guest's system time (``guest-get-time``), ns since the Unix epoch.

        Raises:
            GuestAgentTimeout, GuestAgentCommandError, GuestAgentError: as for :meth:`sync_time`.
        """
        async with self._session(timeout_s) as session:
            return _as_int(await session.call("guest-get-time"), self.label, "guest-get-time")

    async def info(self, timeout_s: float) -> GuestInfo:
        """The agent's version and enabled commands, and the guest OS's name when the agent
        offers ``guest-get-osinfo`` (qemu-ga >= 2.10).

        Raises:
            GuestAgentTimeout, GuestAgentCommandError, GuestAgentError: as for :meth:`sync_time`.
        """
        async with self._session(timeout_s) as session:
            agent = _as_mapping(await session.call("guest-info"), self.label, "guest-info")
            version, enabled = _parse_agent_info(agent, self.label)
            osinfo: Mapping[str, object] = {}
            if "guest-get-osinfo" in enabled:
                try:
                    reply = await session.call("guest-get-osinfo")
                except GuestAgentCommandError as err:  # e.g. no os-release in the guest
                    self.logger.debug("guest-get-osinfo refused: %s", err.desc)
                else:
                    osinfo = _as_mapping(reply, self.label, "guest-get-osinfo")
        return GuestInfo(
            agent_version=version,
            enabled_commands=enabled,
            os_pretty_name=_optional_str(osinfo, "pretty-name"),
            kernel_release=_optional_str(osinfo, "kernel-release"),
        )

    async def exec(
        self, argv: Sequence[str], *, timeout_s: float, input_bytes: bytes | None = None
    ) -> ExecResult:
        """Run ``argv`` in the guest (``guest-exec``, output captured) and wait until it exits.

        ``argv[0]`` is looked up in the guest's PATH. Without ``input_bytes`` its stdin is
        ``/dev/null``. QGA cannot kill a command: one still running at the deadline is left
        running in the guest.

        Raises:
            ConfigError: ``argv`` is empty.
            GuestAgentTimeout: it did not exit (or the agent did not answer) in time.
            GuestAgentCommandError: the agent refused (no such program, ``guest-exec`` blocked).
            GuestAgentError: the socket is unreachable, the connection broke, or a reply was
                malformed.
        """
        if not argv:
            raise ConfigError("guest exec needs a command")
        arguments: dict[str, object] = {
            "path": argv[0],
            "arg": list(argv[1:]),
            "capture-output": True,
        }
        if input_bytes is not None:
            arguments["input-data"] = base64.b64encode(input_bytes).decode("ascii")
        async with self._session(timeout_s) as session:
            reply = _as_mapping(
                await session.call("guest-exec", arguments), self.label, "guest-exec"
            )
            pid = _as_int(reply.get("pid"), self.label, "guest-exec pid")
            session.awaiting = f"the exit of {argv[0]} (guest pid {pid}, left running)"
            poll_s = _POLL_FIRST_S
            while True:
                status = await session.call("guest-exec-status", {"pid": pid})
                result = _parse_exec_status(status, self.label)
                if result is not None:
                    return result
                await asyncio.sleep(poll_s)
                poll_s = min(poll_s * 2, _POLL_MAX_S)

    @contextlib.asynccontextmanager
    async def _session(self, timeout_s: float) -> AsyncIterator[_Session]:
        """A synchronised connection for one call, closed after it; the deadline covers the
        lock, the connect, the sync and the caller's commands."""
        session = _Session(self.label, self.logger)
        try:
            async with asyncio.timeout(timeout_s), self._lock:
                await session.open(self.socket_path)
                await session.sync()
                yield session
        except TimeoutError as err:
            if session.refused is not None:
                raise GuestAgentError(
                    self.label, f"{self.socket_path} refused connections: {session.refused}"
                ) from err
            what = session.awaiting or session.step
            raise GuestAgentTimeout(self.label, what, timeout_s) from err
        finally:
            session.close()


class _Session:
    """One connection to the agent: connect, sync, then one request at a time."""

    def __init__(self, label: str, log: logging.Logger) -> None:
        self.label = label
        self.logger = log
        # For the timeout message: the request in flight, or what the caller waits for
        # across requests (an exec's exit).
        self.step = "an earlier call to finish"
        self.awaiting: str | None = None
        self.refused: OSError | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def open(self, path: Path) -> None:
        self.step = "connect"
        while True:
            try:
                self._reader, self._writer = await asyncio.open_unix_connection(
                    str(path), limit=_LINE_LIMIT_BYTES
                )
                self.refused = None
                return
            except FileNotFoundError as err:
                raise GuestAgentError(self.label, f"no guest agent socket at {path}") from err
            except ConnectionRefusedError as err:
                # QEMU creates its socket file a moment before it listens; a dead QEMU leaves
                # it behind. Retry until the deadline, then say which it was.
                self.refused = err
                await asyncio.sleep(_CONNECT_RETRY_S)
            except OSError as err:
                raise GuestAgentError(self.label, f"cannot connect to {path}: {err}") from err

    async def sync(self) -> None:
        """``guest-sync-delimited``: discard everything up to the agent's sentinel and the
        answer carrying our id (answers to earlier requests may still be on their way)."""
        sync_id = random.getrandbits(_SYNC_ID_BITS)
        self.step = "guest-sync-delimited"
        # The leading 0xFF makes the agent drop a request an earlier client left half-written
        # (it answers with a parse error, which we skip with the rest).
        request = {"execute": "guest-sync-delimited", "arguments": {"id": sync_id}}
        await self._send(_SENTINEL, request)
        while True:
            await self._skip_to_sentinel()
            reply = _parse_line(await self._read_line())
            if reply is not None and reply.get("return") == sync_id:
                self.logger.debug("<-- %s", _brief(reply))
                return
            self.logger.debug("skipping a stale reply while synchronising")

    async def call(self, command: str, arguments: Mapping[str, object] | None = None) -> object:
        """Send one command and return its ``return`` value.

        Raises:
            GuestAgentCommandError: the agent answered with an error.
            GuestAgentError: malformed reply or lost connection.
        """
        request: dict[str, object] = {"execute": command}
        if arguments is not None:
            request["arguments"] = dict(arguments)
        self.step = command
        await self._send(b"", request)
        line = await self._read_line()
        reply = _parse_line(line)
        if reply is None:
            raise GuestAgentError(self.label, f"{command}: malformed reply {line[:80]!r}")
        self.logger.debug("<-- %s", _brief(reply))
        if "error" in reply:
            error = reply["error"]
            if not isinstance(error, Mapping):
                raise GuestAgentError(self.label, f"{command}: malformed error {error!r:.80}")
            raise GuestAgentCommandError(
                self.label, command, str(error.get("class")), str(error.get("desc"))
            )
        if "return" not in reply:
            raise GuestAgentError(self.label, f"{command}: reply without a result")
        return reply["return"]

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()  # the transport closes at once; nothing left to flush

    async def _send(self, prefix: bytes, request: Mapping[str, object]) -> None:
        assert self._writer is not None
        self.logger.debug("--> %s", _brief(request))
        self._writer.write(prefix + json.dumps(request).encode() + b"\n")
        try:
            await self._writer.drain()
        except OSError as err:
            raise GuestAgentError(self.label, f"connection lost: {err}") from err

    async def _skip_to_sentinel(self) -> None:
        assert self._reader is not None
        try:
            while True:
                try:
                    await self._reader.readuntil(_SENTINEL)
                    return
                except asyncio.LimitOverrunError as err:  # a long stale reply: drop it
                    await self._reader.readexactly(err.consumed)
        except asyncio.IncompleteReadError as err:
            raise GuestAgentError(self.label, "connection closed while synchronising") from err
        except OSError as err:
            raise GuestAgentError(self.label, f"connection lost: {err}") from err

    async def _read_line(self) -> bytes:
        """The next non-blank line (the agent ends each reply with a newline)."""
        assert self._reader is not None
        while True:
            try:
                line = await self._reader.readuntil(b"\n")
            except asyncio.IncompleteReadError as err:
                raise GuestAgentError(
                    self.label, f"connection closed after {len(err.partial)} bytes of a reply"
                ) from err
            except asyncio.LimitOverrunError as err:
                raise GuestAgentError(
                    self.label, f"reply longer than {_LINE_LIMIT_BYTES} bytes"
                ) from err
            except OSError as err:
                raise GuestAgentError(self.label, f"connection lost: {err}") from err
            if line.strip():
                return line


def _parse_line(line: bytes) -> dict[str, object] | None:
    """A reply object, None if ``line`` is not one."""
    try:
        reply = json.loads(line)
    except ValueError:  # also invalid UTF-8
        return None
    return reply if isinstance(reply, dict) else None


def _parse_agent_info(agent: Mapping[str, object], label: str) -> tuple[str, frozenset[str]]:
    version = agent.get("version")
    commands = agent.get("supported_commands")
    if not isinstance(version, str) or not isinstance(commands, list):
        raise GuestAgentError(label, "guest-info: malformed reply")
    enabled = frozenset(
        str(c["name"])
        for c in commands
        if isinstance(c, Mapping) and "name" in c and c.get("enabled") is True
    )
    return version, enabled


def _parse_exec_status(value: object, label: str) -> ExecResult | None:
    """The command's result, None while it runs."""
    status = _as_mapping(value, label, "guest-exec-status")
    if status.get("exited") is not True:
        return None
    exit_code, signal = status.get("exitcode"), status.get("signal")
    return ExecResult(
        exit_code=None if exit_code is None else _as_int(exit_code, label, "exitcode"),
        signal=None if signal is None else _as_int(signal, label, "signal"),
        stdout=_decode_output(status.get("out-data"), label, "out-data"),
        stderr=_decode_output(status.get("err-data"), label, "err-data"),
        truncated=status.get("out-truncated") is True or status.get("err-truncated") is True,
    )


def _decode_output(value: object, label: str, field: str) -> bytes:
    if value is None:  # qemu-ga leaves out an empty stream
        return b""
    if not isinstance(value, str):
        raise GuestAgentError(label, f"guest-exec-status: {field} is not a string")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error as err:
        raise GuestAgentError(label, f"guest-exec-status: {field} is not base64") from err


def _as_mapping(value: object, label: str, what: str) -> Mapping[str, object]:
    if not isinstance(value, dict):
        raise GuestAgentError(label, f"{what}: expected an object, got {value!r:.80}")
    return value


def _as_int(value: object, label: str, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise GuestAgentError(label, f"{what}: expected an integer, got {value!r:.80}")
    return value


def _optional_str(data: Mapping[str, object], key: str) -> str | None:
    value = data.get(key)
    return value if isinstance(value, str) else None


def _brief(message: Mapping[str, object]) -> str:
    """``message`` for the log, long strings (exec input, output) replaced by their length."""

    def shorten(value: object) -> object:
        if isinstance(value, str) and len(value) > _LOG_STRING_CHARS:
            return f"<{len(value)} chars>"
        if isinstance(value, dict):
            return {k: shorten(v) for k, v in value.items()}
        if isinstance(value, list):
            return [shorten(v) for v in value]
        return value

    return json.dumps(shorten(message))
