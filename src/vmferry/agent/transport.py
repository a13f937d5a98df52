"""HTTP/1.1 to an agent over asyncio streams: JSON requests on kept-alive connections.

The agent's API is small JSON requests and replies, so the client needs little of HTTP: one
request at a time per connection, bodies with ``Content-Length`` (or chunked, which aiohttp's
server may send), keep-alive, TLS pinned to the cluster CA. Doing that here instead of with
aiohttp's client keeps ``vmferry`` commands from importing aiohttp (~0.4 s of every command's
start on this machine kind, more than a plan takes from fresh profiles).

Errors: :class:`TransportError` for a connection that failed or broke (the caller turns it into
``AgentUnreachable``), ``ValueError`` for a reply that is not HTTP/JSON.

Example:
    >>> pool = ConnectionPool("https://10.0.0.1:7001", ssl_context)           # doctest: +SKIP
    >>> status, body = await pool.request("GET", "/v1/host", headers={...})    # doctest: +SKIP
    >>> await pool.close()                                                     # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlencode, urlsplit

from vmferry.core.errors import ConfigError, FerryError

__all__ = ["ConnectionPool", "TransportError"]

_MAX_HEADER_BYTES = 64 << 10
_MAX_BODY_BYTES = 256 << 20


class TransportError(FerryError):
    """No connection to the agent, or it broke before the whole reply came."""


@dataclass(slots=True)
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    @property
    def is_usable(self) -> bool:
        return not self.writer.is_closing() and not self.reader.at_eof()

    def close(self) -> None:
        self.writer.close()


class ConnectionPool:
    """Kept-alive connections to one ``http://`` or ``https://`` base URL.

    Args:
        url: scheme, host and port of the agent.
        ssl_context: for ``https://`` the context that verifies the agent; False for http.

    Raises:
        ConfigError: a URL that is not http(s)://host:port.
    """

    def __init__(self, url: str, ssl_context: ssl.SSLContext | bool) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or parts.hostname is None:
            raise ConfigError(f"not an agent URL: {url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self._authority = parts.netloc
        self._ssl = ssl_context if parts.scheme == "https" else None
        self._idle: list[_Connection] = []

    async def request(
        self,
        method: str,
        path: str,
        body: object = None,
        *,
        headers: Mapping[str, str],
        params: Mapping[str, str] | None = None,
    ) -> tuple[int, object]:
        """Send one request; its status and JSON body (None when it has none).

        A GET that fails on a kept-alive connection (the agent closed it meanwhile) is sent
        once more on a new one; other methods are never repeated.

        Raises:
            TransportError: no connection, or it broke.
            ValueError: the reply is not HTTP with a JSON body.
        """
        target = path if not params else f"{path}?{urlencode(params)}"
        payload = b"" if body is None else json.dumps(body).encode()
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self._authority}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        if body is not None:
            lines.append("Content-Type: application/json")
        lines.append(f"Content-Length: {len(payload)}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        reused = bool(self._idle)
        try:
            return await self._exchange(head + payload)
        except TransportError:
            if not (reused and method == "GET"):
                raise
            return await self._exchange(head + payload)

    async def _exchange(self, data: bytes) -> tuple[int, object]:
        connection = await self._connection()
        try:
            connection.writer.write(data)
            await connection.writer.drain()
            status, keep_alive, raw = await _read_response(connection.reader)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as err:
            connection.close()
            raise TransportError(str(err) or type(err).__name__) from err
        except BaseException:
            connection.close()  # cancelled or malformed: its state is unknown
            raise
        if keep_alive:
            self._idle.append(connection)
        else:
            connection.close()
        return status, (json.loads(raw) if raw.strip() else None)

    async def _connection(self) -> _Connection:
        while self._idle:
            connection = self._idle.pop()
            if connection.is_usable:
                return connection
            connection.close()
        try:
            reader, writer = await asyncio.open_connection(
                self.host,
                self.port,
                ssl=self._ssl,
                server_hostname=self.host if self._ssl is not None else None,
                limit=_MAX_HEADER_BYTES,
            )
        except OSError as err:
            raise TransportError(str(err) or type(err).__name__) from err
        return _Connection(reader, writer)

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()
        for connection in idle:
            with contextlib.suppress(OSError, ssl.SSLError):
                await connection.writer.wait_closed()


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool, bytes]:
    """Status, whether the connection stays open, and the body.

    Raises:
        ValueError: not an HTTP/1.x response.
        asyncio.IncompleteReadError, OSError: the connection broke.
    """
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    version, _, rest = status_line.partition(" ")
    if not version.startswith("HTTP/1.") or not rest[:3].isdigit():
        raise ValueError(f"not an HTTP response: {status_line[:80]!r}")
    status = int(rest[:3])
    fields: dict[str, str] = {}
    for line in header_lines:
        name, sep, value = line.partition(":")
        if sep:
            fields[name.strip().lower()] = value.strip()
    keep_alive = fields.get("connection", "").lower() != "close" and version == "HTTP/1.1"
    if status == 204 or status == 304 or 100 <= status < 200:
        return status, keep_alive, b""
    if fields.get("transfer-encoding", "").lower() == "chunked":
        return status, keep_alive, await _read_chunked(reader)
    length = fields.get("content-length")
    if length is None:
        return status, False, await reader.read(_MAX_BODY_BYTES)  # until the agent closes
    if not length.isdigit() or int(length) > _MAX_BODY_BYTES:
        raise ValueError(f"bad Content-Length {length!r}")
    return status, keep_alive, await reader.readexactly(int(length))


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size_line = (await reader.readuntil(b"\r\n")).split(b";", 1)[0].strip()
        size = int(size_line, 16)  # ValueError: not a chunk
        if size == 0:
            await _skip_trailers(reader)
            return bytes(body)
        if len(body) + size > _MAX_BODY_BYTES:
            raise ValueError("reply too large")
        body += await reader.readexactly(size)
        await reader.readexactly(2)


async def _skip_trailers(reader: asyncio.StreamReader) -> None:
    while (await reader.readuntil(b"\r\n")) != b"\r\n":
        pass
