"""Rolling profiles' bookkeeping: paths' bandwidth per address, what a migration says of its
path, and the HTTP/1.1 reply parsing of the agent transport (no agent, no QEMU)."""

from __future__ import annotations

import asyncio

import pytest

from vmferry.agent.profile import PathBook, migration_throughput_bps, uri_address
from vmferry.agent.transport import _read_response
from vmferry.core.model import MigrationStats
from vmferry.core.status import MigrationStatus


class ManualClock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


def _stats(transferred: int, throughput: int) -> MigrationStats:
    return MigrationStats(
        status=MigrationStatus.ACTIVE,
        total_ms=1000,
        transferred_bytes=transferred,
        remaining_bytes=0,
        total_bytes=1 << 30,
        dirty_pages_rate=0,
        page_size=4096,
        iterations=1,
        throughput_bps=throughput,
        expected_downtime_ms=None,
        downtime_ms=None,
    )


@pytest.mark.parametrize(
    ("uri", "address"),
    [
        ("tcp:10.0.0.2:4444", "10.0.0.2"),
        ("tcp:[fd00::2]:4444", "fd00::2"),
        ("unix:/run/x.sock", None),
        ("tcp:nohost", None),
    ],
)
def test_uri_address(uri: str, address: str | None) -> None:
    assert uri_address(uri) == address


def test_a_migration_speaks_for_its_path_only_when_it_moved_enough() -> None:
    assert migration_throughput_bps([]) is None
    small = [_stats(1 << 20, 900_000_000)]
    assert migration_throughput_bps(small) is None  # a mostly-zero guest: QEMU's scan, not the link
    big = [_stats(10 << 20, 20_000_000), _stats(200 << 20, 30_000_000), _stats(400 << 20, 0)]
    assert migration_throughput_bps(big) == 30_000_000


def test_path_book_prefers_a_probe_and_ages_it() -> None:
    clock = ManualClock()
    book = PathBook(clock)
    assert book.sample("10.0.0.2") is None
    book.record_migration("10.0.0.2", 20e6)
    clock.now_s += 5
    sample = book.sample("10.0.0.2")
    assert sample is not None
    assert (sample.source, sample.bandwidth_bps, sample.age_s) == (
        "migration",
        20e6,
        5.0,
    )
    book.record_probe("10.0.0.2", 25e6)
    clock.now_s += 2
    sample = book.sample("10.0.0.2")
    assert sample is not None
    assert (sample.source, sample.age_s) == ("probe", 2.0)
    assert book.sample("10.0.0.3") is None


def test_a_much_slower_migration_drops_the_probe() -> None:
    """The path changed (or is shared now): the probe's figure no longer holds."""
    book = PathBook(ManualClock())
    book.record_probe("10.0.0.2", 100e6)
    book.record_migration("10.0.0.2", 80e6)  # close to the probe: the probe stands
    assert (s := book.sample("10.0.0.2")) is not None
    assert s.source == "probe"
    book.record_migration("10.0.0.2", 10e6)
    assert (s := book.sample("10.0.0.2")) is not None
    assert (s.source, s.bandwidth_bps) == (
        "migration",
        10e6,
    )


def _parse(raw: bytes) -> tuple[int, bool, bytes]:
    async def go() -> tuple[int, bool, bytes]:
        reader = asyncio.StreamReader()
        reader.feed_data(raw)
        reader.feed_eof()
        return await _read_response(reader)

    return asyncio.run(go())


def test_http_replies_are_framed() -> None:
    body = b'{"a": 1}'
    assert _parse(
        b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nContent-Type: application/json\r\n\r\n" + body
    ) == (200, True, body)
    assert _parse(b"HTTP/1.1 204 No Content\r\n\r\n") == (204, True, b"")
    chunked = (
        b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{"a\r\n5\r\n": 1}\r\n0\r\n\r\n'
    )
    assert _parse(chunked) == (200, True, body)
    assert _parse(b"HTTP/1.1 500 X\r\nConnection: close\r\n\r\nboom") == (500, False, b"boom")
    with pytest.raises(ValueError, match="not an HTTP response"):
        _parse(b"SSH-2.0-OpenSSH\r\n\r\n")
    with pytest.raises(asyncio.IncompleteReadError):
        _parse(b"HTTP/1.1 200 OK\r\nContent-Length: 80\r\n\r\n" + body)
