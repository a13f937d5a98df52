"""The QMP session of one VM: the only place in vmferry that imports ``qemu.qmp``.

Every command has a deadline; QEMU's errors become :class:`QMPCommandError`, dead or silent
sockets become :class:`QMPConnectError` / :class:`QMPTimeout`. Raw QMP dictionaries stay inside
``vmferry.qemu``. Traffic is logged at DEBUG by ``qemu.qmp`` itself (``-->`` / ``<--``).

Example:
    >>> session = QmpSession("vm1")                       # doctest: +SKIP
    >>> await session.connect(Path("/run/vm1/qmp.sock"))  # doctest: +SKIP
    >>> await session.execute("query-status")             # doctest: +SKIP
    {'status': 'running', 'running': True}
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, EventListener, ExecuteError, Message, QMPClient, QMPError

from vmferry.core.errors import QMPCommandError, QMPConnectError, QMPTimeout

__all__ = ["DEFAULT_TIMEOUT_S", "QmpSession"]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 10.0
_CONNECT_RETRY_S = 0.02


class _MigrationWatch(EventListener):
    """Remembers the status of the last ``MIGRATION`` event instead of queueing events."""

    def __init__(self) -> None:
        super().__init__("MIGRATION")
        self.status: str | None = None

    async def put(self, event: Message) -> None:
        if self.accept(event):
            data = event.get("data")
            if isinstance(data, Mapping) and "status" in data:
                self.status = str(data["status"])


class QmpSession:
    """An owned QMP connection to one QEMU."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._client = QMPClient(name)
        self.logger = logger.getChild(name)
        self._migration = _MigrationWatch()
        self._client.register_listener(self._migration)

    @property
    def last_migration_event(self) -> str | None:
        """The status in the last ``MIGRATION`` event QEMU sent on this connection (None:
        none yet). Known without a command, so also while QEMU's main loop is held (e.g. by a
        post-copy destination waiting for a page) and commands other than OOB ones wait."""
        return self._migration.status

    async def connect(self, socket_path: Path, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        """Connect and negotiate capabilities (QMP OOB is enabled when QEMU offers it).

        Raises:
            QMPConnectError: if the socket refuses or the handshake fails.
            QMPTimeout: if QEMU does not greet in time.
        """
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    try:
                        await self._client.connect(str(socket_path))
                        break
                    except ConnectError as err:
                        # QEMU binds its socket (the file appears) a moment before it listens.
                        if not isinstance(err.exc, ConnectionRefusedError | FileNotFoundError):
                            raise
                        await asyncio.sleep(_CONNECT_RETRY_S)
        except TimeoutError as err:
            raise QMPTimeout(f"QMP greeting on {socket_path}", timeout_s) from err
        except QMPError as err:
            raise QMPConnectError(f"cannot connect QMP at {socket_path}", err) from err
        self.logger.debug("qmp.connected %s", socket_path)

    async def execute(
        self,
        command: str,
        arguments: Mapping[str, object] | None = None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        oob: bool = False,
    ) -> Any:
        """Run one command and return its ``return`` value.

        Raises:
            QMPCommandError: QEMU answered with an error.
            QMPTimeout: no answer within ``timeout_s``.
            QMPConnectError: the connection is gone.
        """
        try:
            async with asyncio.timeout(timeout_s):
                return await self._client.execute(command, arguments, oob=oob)
        except ExecuteError as err:
            raise QMPCommandError(command, err.error_class, err.error.error.desc) from err
        except TimeoutError as err:
            raise QMPTimeout(f"QMP {command}", timeout_s) from err
        except QMPError as err:
            raise QMPConnectError(f"QMP {command} lost its connection", err) from err

    async def pass_fd(self, fd_name: str, fd: int, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        """Hand QEMU a copy of file descriptor ``fd`` under ``fd_name`` (``getfd``), e.g. a
        listening socket bound by the caller, so no port has to be guessed free.

        Raises:
            QMPCommandError, QMPTimeout, QMPConnectError: as for :meth:`execute`.
        """
        try:
            self._client.send_fd_scm(fd)
        except (QMPError, OSError) as err:
            raise QMPConnectError(f"cannot pass fd {fd_name} over QMP", err) from err
        await self.execute("getfd", {"fdname": fd_name}, timeout_s=timeout_s)

    @contextlib.contextmanager
    def listener(self, *names: str) -> Iterator[EventListener]:
        """A private event queue for ``names`` (none = all events) for the caller alone."""
        with self._client.listener(list(names) or None) as listener:
            yield listener

    async def next_event(self, listener: EventListener, timeout_s: float) -> Mapping[str, Any]:
        """The next event from ``listener``.

        Raises:
            QMPTimeout: when none arrives in time.
        """
        try:
            async with asyncio.timeout(timeout_s):
                return await listener.get()
        except TimeoutError as err:
            raise QMPTimeout(f"QMP event {listener.names}", timeout_s) from err

    async def close(self) -> None:
        """Disconnect; never raises for a connection that already died.

        ``disconnect()`` re-raises whatever ended the reader (EOFError when QEMU exited first, as
        a destination does after a cancelled incoming migration): that is not news here.
        """
        with contextlib.suppress(QMPError, OSError, EOFError, TimeoutError):
            await asyncio.wait_for(self._client.disconnect(), DEFAULT_TIMEOUT_S)
