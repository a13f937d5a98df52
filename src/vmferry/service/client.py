"""HTTP client of the controller service (the CLI in client mode): typed errors, deadlines,
and the event stream as an async iterator.

Errors come back as vmferry errors a CLI maps to its exit statuses: a refusal the caller can
fix (400, 403, 404, 409, 413, 415, and 401 for a wrong token) is a ``ConfigError`` (exit 2,
nothing changed); anything else a ``FerryError`` (exit 1); no answer in time, or no
connection, :class:`ServiceUnreachable`.

Example:
    >>> async with ServiceClient("https://127.0.0.1:8443", token, ca) as client:  # doctest: +SKIP
    ...     job = await client.post("/api/v1/migrations", {"vm": "web-1", "to": "host-2"})
    ...     async for event in client.events(job["id"]):
    ...         print(event.kind, event.data)
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp

from vmferry.agent.tls import client_context
from vmferry.core.errors import ConfigError, FerryError
from vmferry.service.events import Event

__all__ = ["ServiceClient", "ServiceError", "ServiceRefused", "ServiceUnreachable", "SseParser"]

DEFAULT_TIMEOUT_S = 30.0
_TLS_CLOSE_S = 0.1
# An event stream with nothing, not even a keepalive, for this long is taken for dead.
STREAM_IDLE_S = 60.0


class ServiceUnreachable(FerryError):
    """The service did not answer (not running, wrong URL, network down)."""


class ServiceError(FerryError):
    """The service answered with an error the caller cannot fix by changing its request."""


class ServiceRefused(ConfigError):
    """The service refused the request (bad input, not allowed, no such thing): nothing changed.

    Attributes:
        status: the HTTP status.
        code: the API's error code.
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


_REFUSALS = frozenset({400, 401, 403, 404, 405, 409, 413, 415})


def _ssl(url: str, ca_file: Path | None) -> ssl.SSLContext | bool:
    if not url.startswith("https://"):
        return False
    if ca_file is None:
        return True  # the system's CAs (a service with a certificate from a public CA)
    return client_context(ca_file)


class ServiceClient:
    """A connection to the service at ``url`` with bearer ``token``; an async context manager.

    An ``https://`` service is verified against ``ca_file`` alone when given (the lab CA).
    """

    def __init__(self, url: str, token: str, ca_file: Path | None = None) -> None:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"the service URL must start with http:// or https://, not {url!r}")
        self.url = url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"}
        self._ssl = _ssl(url, ca_file)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ServiceClient:
        self._session = aiohttp.ClientSession(headers=self._headers)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()
            if self._ssl is not False:
                # aiohttp ends TLS connections after close() returns (the TLS shutdown runs on
                # the loop): a loop closed at once would find their sockets still open.
                await asyncio.sleep(_TLS_CLOSE_S)

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "use ServiceClient as an async context manager"
        return self._session

    async def _request(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        params: Mapping[str, str] | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> Any:
        try:
            async with self.session.request(
                method,
                self.url + path,
                json=body,
                params=params,
                ssl=self._ssl,
                timeout=aiohttp.ClientTimeout(total=timeout_s),
            ) as response:
                text = await response.text()
                status = response.status
        except TimeoutError as err:
            raise ServiceUnreachable(f"{self.url}: no answer within {timeout_s:.0f} s") from err
        except aiohttp.ClientError as err:
            raise ServiceUnreachable(f"{self.url}: {err}") from err
        try:
            data = json.loads(text) if text else None
        except ValueError as err:
            raise ServiceError(f"{method} {path}: HTTP {status}, not JSON") from err
        if status >= 400:
            raise _error(status, data, f"{method} {path}")
        return data

    async def get(
        self,
        path: str,
        params: Mapping[str, str] | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> Any:
        """Raises: ServiceRefused, ServiceError, ServiceUnreachable."""
        return await self._request("GET", path, params=params, timeout_s=timeout_s)

    async def get_text(self, path: str) -> str:
        """A text body (``/metrics``).

        Raises: ServiceRefused, ServiceError, ServiceUnreachable.
        """
        timeout = aiohttp.ClientTimeout(total=DEFAULT_TIMEOUT_S)
        try:
            async with self.session.get(self.url + path, ssl=self._ssl, timeout=timeout) as r:
                text = await r.text()
                status = r.status
        except (TimeoutError, aiohttp.ClientError) as err:
            raise ServiceUnreachable(f"{self.url}: {str(err) or 'no answer'}") from err
        if status >= 400:
            raise _error(status, _loads(text), f"GET {path}")
        return text

    async def post(
        self, path: str, body: Mapping[str, Any], timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> Any:
        """Raises: ServiceRefused, ServiceError, ServiceUnreachable."""
        return await self._request("POST", path, body, timeout_s=timeout_s)

    async def delete(self, path: str) -> Any:
        """Raises: ServiceRefused, ServiceError, ServiceUnreachable."""
        return await self._request("DELETE", path)

    async def events(self, job: int | None = None) -> AsyncGenerator[Event, None]:
        """The event stream (of ``job`` only, if given), until the caller stops iterating (close
        it with ``contextlib.aclosing`` to end the connection at once).

        Raises:
            ServiceUnreachable: no connection, or nothing arrived for ``STREAM_IDLE_S``.
            ServiceRefused: the stream was refused (e.g. an unknown job).
        """
        params = {} if job is None else {"job": str(job)}
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=DEFAULT_TIMEOUT_S,
                                        sock_read=STREAM_IDLE_S)  # fmt: skip
        try:
            async with self.session.get(
                f"{self.url}/api/v1/events", params=params, ssl=self._ssl, timeout=timeout
            ) as response:
                if response.status >= 400:
                    text = await response.text()
                    raise _error(response.status, _loads(text), "GET /api/v1/events")
                async for event in _parse(response.content):
                    yield event
        except TimeoutError as err:
            raise ServiceUnreachable(f"{self.url}: the event stream went quiet") from err
        except aiohttp.ClientError as err:
            raise ServiceUnreachable(f"{self.url}: {err}") from err


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _error(status: int, data: Any, what: str) -> FerryError:
    error = data.get("error") if isinstance(data, dict) else None
    code = str(error.get("code")) if isinstance(error, dict) else "unknown"
    message = str(error.get("message")) if isinstance(error, dict) else f"HTTP {status}"
    if status in _REFUSALS:
        return ServiceRefused(status, code, f"{message} (HTTP {status} {code})")
    if status == 503:
        return ServiceUnreachable(f"{what}: {message}")
    return ServiceError(f"{what}: {message} (HTTP {status})")


class SseParser:
    """Server-Sent Events, line by line, into events (comments skipped)."""

    def __init__(self) -> None:
        self._fields: dict[str, str] = {}

    def feed(self, line: str) -> Event | None:
        """One line (its line break stripped or not); the event a blank line completes."""
        line = line.rstrip("\r\n")
        if line:
            if not line.startswith(":"):
                name, _, value = line.partition(":")
                self._fields[name] = value.removeprefix(" ")
            return None
        fields, self._fields = self._fields, {}
        if "data" not in fields:
            return None
        seq = fields.get("id", "0")
        return Event(
            int(seq) if seq.isdigit() else 0,
            fields.get("event", "message"),
            json.loads(fields["data"]),
        )


# The longest event line read (a job event is a few hundred bytes; progress under 1 KiB).
_MAX_LINE_BYTES = 1 << 20


async def _parse(content: aiohttp.StreamReader) -> AsyncIterator[Event]:
    """Events from the stream, read in chunks (aiohttp's line reader stops at 64 KiB).

    Raises:
        ServiceError: a line longer than ``_MAX_LINE_BYTES``.
    """
    parser, pending = SseParser(), b""
    async for chunk in content.iter_any():
        pending += chunk
        *lines, pending = pending.split(b"\n")
        if len(pending) > _MAX_LINE_BYTES:
            raise ServiceError(f"an event line longer than {_MAX_LINE_BYTES} bytes")
        for line in lines:
            event = parser.feed(line.decode("utf-8"))
            if event is not None:
                yield event
