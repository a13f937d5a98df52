"""The lab channel against a socket that behaves as QEMU's one-client chardev does when an
agent restarted right after its predecessor died: the first connection is accepted and then
dropped; the channel connects again before its next request and gets its answer."""

from __future__ import annotations

import asyncio
from pathlib import Path

from vmferry.core.heartbeat import HeartbeatGaps
from vmferry.guest.channel import GuestChannel


async def _guest(path: Path) -> tuple[asyncio.Server, list[str]]:
    """A guest behind a chardev: drops the first client, answers ``verify`` to the next."""
    seen: list[str] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append("connected")
        if len(seen) == 1:
            writer.close()
            return
        line = await reader.readline()
        seen.append(line.decode().strip())
        writer.write(b"VERIFY 16 0 -1 0 0 -1\n")
        await writer.drain()
        await reader.read()  # until the channel closes
        writer.close()

    return await asyncio.start_unix_server(serve, path=str(path)), seen


def test_a_dropped_connection_is_made_again_before_the_next_request(tmp_path: Path) -> None:
    async def scenario() -> list[str]:
        path = tmp_path / "channel.sock"
        server, seen = await _guest(path)
        channel = GuestChannel("vm1.host-1", HeartbeatGaps())
        try:
            await channel.connect(path, timeout_s=2.0)
            await asyncio.sleep(0.1)  # the server has dropped it
            result = await channel.verify(timeout_s=2.0)
            assert (result.pages_checked, result.bad_pages) == (16, 0)
        finally:
            await channel.close()
            server.close()
            await server.wait_closed()
        return seen

    seen = asyncio.run(asyncio.wait_for(scenario(), 10))
    assert seen[:2] == ["connected", "connected"]
    assert seen[2].startswith("verify")
