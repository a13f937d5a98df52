"""A scripted qemu-guest-agent on a real UNIX socket, for the guest agent client's tests.

It speaks the wire protocol as qemu-ga does (requests may start with 0xFF; one JSON reply per
line; ``guest-sync-delimited`` answers with a 0xFF sentinel first) and lets a test decide what
each command gets: a result, an error object, silence, raw bytes then a dropped connection, or
an answer that arrives only on the next connection (a reply that missed its deadline). Unlike
the real agent it never runs anything, so ``guest-set-time`` can be tested without touching
the host's clock.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Drop", "Error", "FakeQga", "Late", "Return", "Silence"]


@dataclass(frozen=True)
class Return:
    """Answer ``{"return": value}``."""

    value: object


@dataclass(frozen=True)
class Error:
    """Answer with an error object."""

    error_class: str
    desc: str


@dataclass(frozen=True)
class Silence:
    """Never answer (and ignore whatever follows on this connection)."""


@dataclass(frozen=True)
class Drop:
    """Write ``partial`` (e.g. half a reply) and close the connection."""

    partial: bytes


@dataclass(frozen=True)
class Late:
    """Say nothing now; write the answer at the start of the next connection, as a reply that
    was still in the guest's queue when the client gave up."""

    value: object


Action = Return | Error | Silence | Drop | Late


@dataclass
class FakeQga:
    """The agent; ``script`` maps command names to actions (a list: one per call, in order).

    Attributes:
        sync_silent: never answer ``guest-sync-delimited`` (no agent in the guest).
        before_sentinel: bytes written before each sync reply's sentinel (stale junk).
        requests: every command received but the syncs, as (name, arguments).
        max_clients: the most connections open at once.
    """

    path: Path
    script: dict[str, Action | list[Action]] = field(default_factory=dict)
    sync_silent: bool = False
    before_sentinel: bytes = b""
    requests: list[tuple[str, Mapping[str, object]]] = field(default_factory=list)
    connections: int = 0
    max_clients: int = 0
    _clients: int = 0
    _pending: bytes = b""
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, str(self.path))

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _next_action(self, command: str) -> Action:
        planned = self.script.get(command, Return({}))
        if isinstance(planned, list):
            return planned.pop(0) if len(planned) > 1 else planned[0]
        return planned

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        self._clients += 1
        self.max_clients = max(self.max_clients, self._clients)
        try:
            if self._pending:
                writer.write(self._pending)
                self._pending = b""
            await self._converse(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._clients -= 1
            writer.close()
            self._tasks.discard(task)

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent = False
        while line := await reader.readline():
            text = line.lstrip(b"\xff").strip()
            if not text or silent:
                continue
            request = json.loads(text)
            command, arguments = request["execute"], request.get("arguments", {})
            if command == "guest-sync-delimited":
                if self.sync_silent:
                    silent = True
                    continue
                reply = json.dumps({"return": arguments["id"]}).encode()
                writer.write(self.before_sentinel + b"\xff" + reply + b"\n")
                await writer.drain()
                continue
            self.requests.append((command, arguments))
            action = self._next_action(command)
            if isinstance(action, Silence):
                silent = True
            elif isinstance(action, Late):
                self._pending += json.dumps({"return": action.value}).encode() + b"\n"
                silent = True
            elif isinstance(action, Drop):
                writer.write(action.partial)
                await writer.drain()
                return
            else:
                body: object = (
                    {"return": action.value}
                    if isinstance(action, Return)
                    else {"error": {"class": action.error_class, "desc": action.desc}}
                )
                writer.write(json.dumps(body).encode() + b"\n")
                await writer.drain()
