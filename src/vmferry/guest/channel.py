"""Host side of the lab guest's workload channel (its second serial port, a UNIX socket).

One :class:`GuestChannel` per QEMU instance. It owns one reader task, which feeds heartbeats to
a shared :class:`HeartbeatGaps` and queues every other message for :meth:`request`. During a
migration, the source's and the destination's channels feed the same ``HeartbeatGaps``: the
guest-observed downtime is then the largest gap across both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import TypeVar

from vmferry.core.errors import GuestError
from vmferry.core.heartbeat import HeartbeatGaps
from vmferry.guest.protocol import (
    Ack,
    Corrupted,
    CorruptedBlock,
    ErrorReply,
    GuestMessage,
    Heartbeat,
    Ready,
    VerifyResult,
    corrupt_block_command,
    corrupt_command,
    heartbeat_rate_command,
    parse_line,
    verify_command,
)

__all__ = ["GuestChannel", "now_ms"]

logger = logging.getLogger(__name__)

M = TypeVar("M")


def now_ms() -> float:
    """Heartbeat clock: wall time in ms, so arrivals on different hosts can be compared."""
    return time.time() * 1000.0


_CONNECT_RETRY_S = 0.05
# How long a channel whose connection QEMU closed waits for QEMU to accept it again.
_RECONNECT_TIMEOUT_S = 2.0
_COMMAND_TIMEOUT_S = 10.0
# Verify timeouts: a floor, plus the slowest plausible check rates under TCG on a loaded host
# (memory checksums run at hundreds of MB/s; disk blocks are read back through the device).
_VERIFY_BASE_S = 30.0
_VERIFY_MEMORY_BPS = 20 << 20
_VERIFY_DISK_BPS = 5 << 20
_BLOCK_BYTES = 4096


class GuestChannel:
    """A connection to the guest's workload channel."""

    def __init__(self, name: str, heartbeats: HeartbeatGaps) -> None:
        self.name = name
        self.heartbeats = heartbeats
        self.logger = logger.getChild(name)
        self.ready: Ready | None = None
        self._ready_event = asyncio.Event()
        self._heartbeat_event = asyncio.Event()
        self._messages: asyncio.Queue[GuestMessage] = asyncio.Queue()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._path: Path | None = None
        # One command at a time: a reply waiter drops replies of other types.
        self._requests = asyncio.Lock()

    async def connect(self, path: Path, timeout_s: float = 10.0) -> None:
        """Connect to QEMU's chardev socket, retrying until it accepts.

        Raises:
            GuestError: when it cannot be reached in time.
        """
        self._path = path
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    try:
                        self._reader, self._writer = await asyncio.open_unix_connection(str(path))
                        break
                    except (FileNotFoundError, ConnectionRefusedError):
                        await asyncio.sleep(_CONNECT_RETRY_S)
        except TimeoutError as err:
            raise GuestError(f"guest channel {path} not reachable in {timeout_s:g} s") from err
        # The channel owns its reader; close() cancels and awaits it.
        self._task = asyncio.create_task(self._read_loop(), name=f"channel-{self.name}")

    async def _read_loop(self) -> None:
        assert self._reader is not None
        try:
            while True:
                raw = await self._reader.readline()
                if not raw:
                    break
                message = parse_line(raw.decode(errors="replace"))
                if message is None:
                    continue
                if isinstance(message, Heartbeat):
                    self.heartbeats.observe(message.seq, now_ms(), message.dirtied_pages)
                    self._heartbeat_event.set()
                    continue
                if isinstance(message, Ready):
                    self.ready = message
                    self._ready_event.set()
                    continue
                self.logger.debug("<-- %s", message)
                self._messages.put_nowait(message)
        except (ConnectionError, OSError) as err:
            self.logger.debug("channel read ended: %s", err)

    async def wait_ready(self, timeout_s: float) -> Ready:
        """Wait for the guest's READY line (working set written).

        Raises:
            GuestError: if it does not come in time.
        """
        try:
            async with asyncio.timeout(timeout_s):
                await self._ready_event.wait()
        except TimeoutError as err:
            raise GuestError(f"guest {self.name} not ready within {timeout_s:g} s") from err
        assert self.ready is not None
        return self.ready

    async def wait_heartbeat_after(self, since_ms: float, timeout_s: float) -> None:
        """Wait until a heartbeat arrives later than ``since_ms`` (:func:`now_ms` clock).

        Raises:
            GuestError: when the guest stays silent.
        """
        try:
            async with asyncio.timeout(timeout_s):
                while (
                    self.heartbeats.last_arrival_ms is None
                    or self.heartbeats.last_arrival_ms <= since_ms
                ):
                    self._heartbeat_event.clear()
                    await self._heartbeat_event.wait()
        except TimeoutError as err:
            raise GuestError(f"guest {self.name} sent no heartbeat in {timeout_s:g} s") from err

    async def request(self, command: bytes, reply_type: type[M], timeout_s: float) -> M:
        """Send a command line and wait for its reply message of ``reply_type`` (after any
        command in flight has its reply); a connection QEMU closed is made again first
        (:meth:`_reconnect`), and once more if it breaks as the command is sent.

        Raises:
            GuestError: no reply in time, the guest refused the command (``ERR``), or the
                channel closed.
        """
        if self._writer is None:
            raise GuestError(f"guest channel {self.name} is not connected")
        async with self._requests:
            if self._task is not None and self._task.done():
                await self._reconnect()
            try:
                return await self._exchange(command, reply_type, timeout_s)
            except GuestError as err:
                if not isinstance(err.__cause__, ConnectionError) or self._path is None:
                    raise
            await self._reconnect()
            return await self._exchange(command, reply_type, timeout_s)

    async def _exchange(self, command: bytes, reply_type: type[M], timeout_s: float) -> M:
        assert self._writer is not None
        while not self._messages.empty():  # stale replies from an earlier request
            self._messages.get_nowait()
        self.logger.debug("--> %r", command)
        self._writer.write(command)
        try:
            async with asyncio.timeout(timeout_s):
                await self._writer.drain()
                while True:
                    message = await self._messages.get()
                    if isinstance(message, reply_type):
                        return message
                    if isinstance(message, ErrorReply):
                        raise GuestError(f"guest {self.name} refused {command!r}: {message.text}")
                    self.logger.debug("ignoring %s while waiting for %s", message, reply_type)
        except TimeoutError as err:
            raise GuestError(
                f"guest {self.name} did not answer {command!r} within {timeout_s:g} s"
            ) from err
        except (ConnectionError, OSError) as err:
            raise GuestError(f"guest channel {self.name} broke: {err}") from err

    def verify_timeout_s(self) -> float:
        """A generous deadline for `verify`, from the sizes in the guest's READY line."""
        if self.ready is None:
            return _VERIFY_BASE_S + (1 << 30) / _VERIFY_MEMORY_BPS
        return (
            _VERIFY_BASE_S
            + self.ready.pages * _BLOCK_BYTES / _VERIFY_MEMORY_BPS
            + self.ready.disk_blocks * _BLOCK_BYTES / _VERIFY_DISK_BPS
        )

    async def verify(self, timeout_s: float | None = None) -> VerifyResult:
        """Have the guest check every page of its working set and every block of its disk region.

        Args:
            timeout_s: how long to wait for the answer; default `verify_timeout_s`.

        Raises:
            GuestError: no answer in time, or the channel closed.
        """
        deadline_s = self.verify_timeout_s() if timeout_s is None else timeout_s
        return await self.request(verify_command(), VerifyResult, deadline_s)

    async def corrupt(self, page: int, timeout_s: float = _COMMAND_TIMEOUT_S) -> Corrupted:
        """Have the guest damage working-set ``page`` behind its checksum table (test hook).

        Raises:
            ConfigError: ``page`` is negative.
            GuestError: the guest refused (a page out of range), did not confirm in time, or
                the channel closed.
        """
        return await self.request(corrupt_command(page), Corrupted, timeout_s)

    async def corrupt_block(
        self, block: int, timeout_s: float = _COMMAND_TIMEOUT_S
    ) -> CorruptedBlock:
        """Have the guest damage disk-region ``block`` on the device, behind its table.

        Pause the guest first (``pause``) if the corruption must survive until a verify: its
        disk writer could otherwise rewrite the block.

        Raises:
            ConfigError: ``block`` is negative.
            GuestError: the guest refused (no disk, or a block out of range), did not confirm
                in time, or the channel closed.
        """
        return await self.request(corrupt_block_command(block), CorruptedBlock, timeout_s)

    async def set_heartbeat_rate(self, hz: int, timeout_s: float = _COMMAND_TIMEOUT_S) -> Ack:
        """Have the guest send ``hz`` heartbeats per second from the next one.

        Raises:
            ConfigError: ``hz`` out of range.
            GuestError: the guest refused (built before the command), did not confirm in
                time, or the channel closed.
        """
        return await self.request(heartbeat_rate_command(hz), Ack, timeout_s)

    async def _reconnect(self) -> None:
        """Connect again after QEMU closed our connection while the guest runs on. QEMU's
        chardev serves one client: an agent restarted right after its predecessor died can be
        accepted before QEMU saw that one's hang-up, and is then dropped (fault matrix,
        kill-src-agent: `verify` failed with "Connection lost").

        Raises:
            GuestError: QEMU does not accept again in time (it is gone).
        """
        assert self._path is not None
        self.logger.info("channel.reconnect %s", self._path)
        await self.close()
        await self.connect(self._path, timeout_s=_RECONNECT_TIMEOUT_S)

    async def close(self) -> None:
        """Close the socket and reap the reader task."""
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await self._writer.wait_closed()
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task})
            self._task = None
