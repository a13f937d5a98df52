"""Achievable TCP throughput on a migration path, measured between two agents.

The destination agent opens a :class:`BandwidthSink` on its migration address; the source agent
(possibly in another network namespace) streams incompressible bytes to it with
:func:`send_probe`. The figure to plan with is the sink's: bytes it received over the time from
the first to the last byte. The sender's own figure counts bytes handed to its kernel, so it
is only as good as its wait for the sink to hang up (see :func:`send_probe`).

Example:
    >>> sink = BandwidthSink("10.0.0.2")                  # doctest: +SKIP
    >>> port = await sink.start()                         # doctest: +SKIP
    >>> await send_probe("10.0.0.2", port)                # doctest: +SKIP  (on the source)
    >>> (await sink.result(timeout_s=5)).bandwidth_bps    # doctest: +SKIP
    1183522816.0
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from dataclasses import dataclass

from vmferry.core.errors import FerryError

__all__ = [
    "BandwidthProbeError",
    "BandwidthSink",
    "ProbeResult",
    "SinkResult",
    "send_probe",
]

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 256 << 10
_CONNECT_TIMEOUT_S = 5.0
# A write that cannot drain, or a sink that does not hang up, for this long is a dead path.
_STALL_TIMEOUT_S = 5.0
_CLOSE_TIMEOUT_S = 2.0


class BandwidthProbeError(FerryError):
    """The probe could not run: no connection, a stalled or reset stream, or no data in time."""


@dataclass(frozen=True, slots=True)
class SinkResult:
    """What a sink saw of one probe.

    Attributes:
        received_bytes: bytes received.
        elapsed_ms: time from the first to the last byte received.
    """

    received_bytes: int
    elapsed_ms: float

    @property
    def bandwidth_bps(self) -> float:
        """Received bytes per second over ``elapsed_ms`` (0.0 if nothing was timed)."""
        return self.received_bytes * 1000 / self.elapsed_ms if self.elapsed_ms > 0 else 0.0


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """What the sender saw of its probe.

    Attributes:
        sent_bytes: bytes written.
        elapsed_ms: from the connection until the sink hung up after the last byte.
        bandwidth_bps: ``sent_bytes`` per second over ``elapsed_ms``.
    """

    sent_bytes: int
    elapsed_ms: float
    bandwidth_bps: float


class _SinkProtocol(asyncio.Protocol):
    """Counts the bytes of one connection and tells its sink when it ends."""

    def __init__(self, sink: BandwidthSink) -> None:
        self._sink = sink
        self.transport: asyncio.Transport | None = None
        self.received_bytes = 0
        self.first_ns: int | None = None
        self.last_ns = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._sink._on_connection(self)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()
        if self.first_ns is None:
            self.first_ns = now
        self.last_ns = now
        self.received_bytes += len(data)

    def eof_received(self) -> bool:
        self._sink._on_finished(self, None)
        return False  # close our side too: that is the sender's signal that all arrived

    def connection_lost(self, exc: Exception | None) -> None:
        self._sink._on_finished(self, exc)


class BandwidthSink:
    """A one-shot TCP server that measures the throughput of the first connection to it.

    It stops listening once a sender connects, refuses any further connection, and gives up
    after ``timeout_s`` from :meth:`start` (then :meth:`result` raises). Always :meth:`close` it.
    """

    def __init__(self, address: str, *, timeout_s: float = 30.0) -> None:
        """Prepare a sink on ``address`` (a literal IP: a host name that resolves to both IPv4
        and IPv6 would get two listening sockets on different ports)."""
        self.address = address
        self.timeout_s = timeout_s
        self._server: asyncio.Server | None = None
        self._connection: _SinkProtocol | None = None
        self._done: asyncio.Future[SinkResult] | None = None
        self._expiry: asyncio.TimerHandle | None = None

    async def start(self) -> int:
        """Listen on ``(address, an ephemeral port)``.

        Returns:
            The port to give the sender.

        Raises:
            BandwidthProbeError: the address cannot be bound.
        """
        loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        try:
            self._server = await loop.create_server(
                lambda: _SinkProtocol(self), self.address, 0, backlog=1
            )
        except OSError as err:
            raise BandwidthProbeError(f"cannot listen on {self.address}: {err}") from err
        self._expiry = loop.call_later(self.timeout_s, self._on_expired)
        port: int = self._server.sockets[0].getsockname()[1]
        logger.debug("bandwidth.sink listening on %s port %d", self.address, port)
        return port

    async def result(self, timeout_s: float) -> SinkResult:
        """Wait for the probe to end and return what arrived.

        Raises:
            BandwidthProbeError: nothing complete arrived within ``timeout_s`` (or the sink's
                own deadline), the stream broke, or it was too short to time.
        """
        if self._done is None:
            raise BandwidthProbeError("the sink was never started")
        try:
            async with asyncio.timeout(timeout_s):
                return await asyncio.shield(self._done)
        except TimeoutError as err:
            raise BandwidthProbeError(
                f"no complete probe reached {self.address} within {timeout_s:g} s"
            ) from err

    async def close(self) -> None:
        """Stop listening and drop any connection; safe to call more than once."""
        if self._expiry is not None:
            self._expiry.cancel()
        self._stop_listening()
        if self._connection is not None and self._connection.transport is not None:
            self._connection.transport.abort()
        if self._done is not None and not self._done.done():
            self._done.set_exception(BandwidthProbeError("the sink was closed"))
        if self._done is not None and self._done.done():
            # Mark a failure as seen when nobody asked for the result.
            self._done.exception()

    def _stop_listening(self) -> None:
        if self._server is not None:
            self._server.close()

    def _on_connection(self, connection: _SinkProtocol) -> None:
        if self._connection is not None:
            # One probe per sink: a second sender (or a stray client) gets a reset.
            assert connection.transport is not None
            connection.transport.abort()
            return
        self._connection = connection
        self._stop_listening()

    def _on_finished(self, connection: _SinkProtocol, exc: Exception | None) -> None:
        if connection is not self._connection or self._done is None or self._done.done():
            return
        if self._expiry is not None:
            self._expiry.cancel()
        if exc is not None:
            self._done.set_exception(
                BandwidthProbeError(f"probe stream to {self.address} broke: {exc}")
            )
            return
        if connection.first_ns is None or connection.last_ns == connection.first_ns:
            self._done.set_exception(
                BandwidthProbeError(
                    f"probe to {self.address} too short to time ({connection.received_bytes} bytes)"
                )
            )
            return
        result = SinkResult(
            received_bytes=connection.received_bytes,
            elapsed_ms=(connection.last_ns - connection.first_ns) / 1e6,
        )
        logger.info(
            "bandwidth.measured %s: %d bytes in %.1f ms = %.1f MB/s",
            self.address,
            result.received_bytes,
            result.elapsed_ms,
            result.bandwidth_bps / 1e6,
        )
        self._done.set_result(result)

    def _on_expired(self) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_exception(
                BandwidthProbeError(
                    f"no complete probe reached {self.address} within {self.timeout_s:g} s"
                )
            )
        self._stop_listening()
        if self._connection is not None and self._connection.transport is not None:
            self._connection.transport.abort()


async def send_probe(
    address: str,
    port: int,
    *,
    duration_ms: int = 1000,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> ProbeResult:
    """Stream incompressible bytes to a :class:`BandwidthSink` for ``duration_ms``.

    After the last write it half-closes and waits for the sink to hang up, so the sender's
    figure covers delivery, not just its own socket buffer. Plan with the sink's figure.

    Args:
        address: the sink's address.
        port: the sink's port.
        duration_ms: how long to send.
        chunk_bytes: size of each write (random bytes made once and reused).

    Returns:
        What was sent and how fast.

    Raises:
        BandwidthProbeError: no connection within 5 s, refused, reset, or a write or the
            sink's hang-up stalled for 5 s.
    """
    if duration_ms <= 0 or chunk_bytes <= 0:
        raise BandwidthProbeError(f"bad probe: duration_ms={duration_ms} chunk={chunk_bytes}")
    # Random so that no compression on the path (or a later zstd-aware one) flatters the link.
    payload = os.urandom(chunk_bytes)
    target = f"{address} port {port}"
    try:
        async with asyncio.timeout(_CONNECT_TIMEOUT_S):
            reader, writer = await asyncio.open_connection(address, port)
    except TimeoutError as err:
        raise BandwidthProbeError(
            f"no connection to {target} within {_CONNECT_TIMEOUT_S:g} s"
        ) from err
    except OSError as err:
        raise BandwidthProbeError(f"cannot connect to {target}: {err}") from err
    sent_bytes = 0
    started_ns = time.monotonic_ns()
    try:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        deadline_ns = time.monotonic_ns() + duration_ms * 1_000_000
        while time.monotonic_ns() < deadline_ns:
            writer.write(payload)
            sent_bytes += chunk_bytes
            async with asyncio.timeout(_STALL_TIMEOUT_S):
                await writer.drain()
        writer.write_eof()
        async with asyncio.timeout(_STALL_TIMEOUT_S):
            # The sink closes its side once it has read our EOF, i.e. everything.
            while await reader.read(1 << 16):
                pass
    except TimeoutError as err:
        raise BandwidthProbeError(
            f"probe to {target} stalled for {_STALL_TIMEOUT_S:g} s after {sent_bytes} bytes"
        ) from err
    except OSError as err:
        raise BandwidthProbeError(
            f"probe to {target} failed after {sent_bytes} bytes: {err}"
        ) from err
    finally:
        writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(_CLOSE_TIMEOUT_S):
                await writer.wait_closed()
    elapsed_ms = (time.monotonic_ns() - started_ns) / 1e6
    result = ProbeResult(
        sent_bytes=sent_bytes,
        elapsed_ms=elapsed_ms,
        bandwidth_bps=sent_bytes * 1000 / elapsed_ms,
    )
    logger.debug("bandwidth.sent %s: %d bytes in %.1f ms", target, sent_bytes, elapsed_ms)
    return result
