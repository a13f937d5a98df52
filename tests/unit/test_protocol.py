"""The guest channel protocol: every message form, junk tolerance, and stream reassembly."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmferry.core.errors import ConfigError
from vmferry.guest.protocol import (
    MAX_LINE_BYTES,
    Ack,
    Corrupted,
    CorruptedBlock,
    ErrorReply,
    GuestMessage,
    Heartbeat,
    LineReader,
    Ready,
    VerifyResult,
    corrupt_block_command,
    corrupt_command,
    heartbeat_rate_command,
    parse_line,
    pause_command,
    ready_command,
    resume_command,
    verify_command,
)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            "READY pages=65536 pattern=random mode=paced rate=52428800",
            Ready(65536, "random", "paced", 52428800),
        ),
        ("READY pages=1 pattern=zero mode=idle rate=0", Ready(1, "zero", "idle", 0)),
        ("READY pages=9 pattern=compressible mode=cpu rate=0", Ready(9, "compressible", "cpu", 0)),
        (
            "READY pages=16384 pattern=random mode=idle rate=0 disk_blocks=16384 disk_rate=2097152",
            Ready(16384, "random", "idle", 0, disk_blocks=16384, disk_rate_bps=2097152),
        ),
        (
            "READY pages=1 pattern=zero mode=idle rate=0 disk_blocks=0 disk_rate=0",
            Ready(1, "zero", "idle", 0),
        ),
        ("HB 1 0", Heartbeat(1, 0)),
        ("HB 18446744073709551615 7\n", Heartbeat(18446744073709551615, 7)),
        ("HB 2 5\r\n", Heartbeat(2, 5)),
        ("VERIFY 65536 0 -1", VerifyResult(65536, 0, None)),
        ("VERIFY 65536 1 12345", VerifyResult(65536, 1, 12345)),
        ("VERIFY 10 3 0", VerifyResult(10, 3, 0)),
        ("VERIFY 65536 0 -1 0 0 -1", VerifyResult(65536, 0, None)),
        ("VERIFY 16384 0 -1 16384 0 -1", VerifyResult(16384, 0, None, 16384, 0, None)),
        ("VERIFY 16384 1 7 16384 2 4321", VerifyResult(16384, 1, 7, 16384, 2, 4321)),
        ("VERIFY 5 0 -1 9 1 0", VerifyResult(5, 0, None, 9, 1, 0)),
        ("CORRUPTED 12345", Corrupted(12345)),
        ("CORRUPTED block 4321", CorruptedBlock(4321)),
        ("CORRUPTED block 0\r\n", CorruptedBlock(0)),
        ("ACK pause", Ack("pause")),
        ("ACK resume", Ack("resume")),
        ("ACK hz 20", Ack("hz", 20)),
        ("ERR unknown command 'x'", ErrorReply("unknown command 'x'")),
    ],
)
def test_parse_line(line: str, message: GuestMessage) -> None:
    assert parse_line(line) == message


@pytest.mark.parametrize(
    "line",
    [
        "",
        "\n",
        "HB",
        "HB 1",
        "HB 1 2 3",
        "HB -1 2",
        "HB 01 2",
        "HB 1 x",
        "HB  1 2",
        "hb 1 2",
        "HB 1 2HB 3 4",  # two heartbeats glued by a lost newline
        "B 1 2",
        "VERIFY 1 2",
        "VERIFY 1 2 -2",
        "VERIFY 1 2 -1 3",
        "VERIFY 1 2 -1 3 4",
        "VERIFY 1 2 -1 3 4 -2",
        "VERIFY 1 2 -1 3 4 5 6",
        "VERIFY 1 2 -1  3 4 5",
        "CORRUPTED",
        "CORRUPTED -3",
        "CORRUPTED block",
        "CORRUPTED block -1",
        "CORRUPTED blocks 3",
        "CORRUPTED block 3 4",
        "CORRUPTED 3 block",
        "ACK",
        "ACK stop",
        "ERR",
        "READY pages=1 pattern=ones mode=idle rate=0",
        "READY pages=1 pattern=zero mode=idle",
        "READY pages=1 pattern=zero mode=idle rate=0 disk_blocks=1",
        "READY pages=1 pattern=zero mode=idle rate=0 disk_rate=0 disk_blocks=1",
        "READY pages=1 pattern=zero mode=idle rate=0 disk_blocks=-1 disk_rate=0",
        "[    7.2] Run /init as init process",
        "HB 1 " + "9" * 30,
        "HB \u0661 2",  # a non-ASCII digit
    ],
)
def test_junk_is_none(line: str) -> None:
    assert parse_line(line) is None


@given(st.text())
def test_parse_line_never_raises(line: str) -> None:
    parse_line(line)


def render(message: GuestMessage) -> str:
    """The guest's side of the protocol, as workload.c prints it."""
    match message:
        case Ready(pages, pattern, mode, rate_bps, disk_blocks, disk_rate_bps):
            return (
                f"READY pages={pages} pattern={pattern} mode={mode} rate={rate_bps} "
                f"disk_blocks={disk_blocks} disk_rate={disk_rate_bps}\n"
            )
        case Heartbeat(seq, dirtied):
            return f"HB {seq} {dirtied}\n"
        case VerifyResult(checked, bad, first, blocks, bad_blocks, first_block):
            return (
                f"VERIFY {checked} {bad} {-1 if first is None else first} "
                f"{blocks} {bad_blocks} {-1 if first_block is None else first_block}\n"
            )
        case Corrupted(page):
            return f"CORRUPTED {page}\n"
        case CorruptedBlock(block):
            return f"CORRUPTED block {block}\n"
        case Ack("hz", hz):
            return f"ACK hz {hz}\n"
        case Ack(command):
            return f"ACK {command}\n"
        case ErrorReply(text):
            return f"ERR {text}\n"


u64 = st.integers(0, (1 << 64) - 1)
messages: st.SearchStrategy[GuestMessage] = st.one_of(
    st.builds(
        Ready,
        u64,
        st.sampled_from(["zero", "compressible", "random"]),
        st.sampled_from(["idle", "paced", "cpu"]),
        u64,
        u64,
        u64,
    ),
    st.builds(Heartbeat, u64, u64),
    st.builds(VerifyResult, u64, u64, st.none() | u64, u64, u64, st.none() | u64),
    st.builds(Corrupted, u64),
    st.builds(CorruptedBlock, u64),
    st.builds(Ack, st.sampled_from(["pause", "resume"])),
    st.builds(Ack, st.just("hz"), st.integers(1, 10_000)),
    st.builds(ErrorReply, st.text(alphabet="abc xyz'0123", min_size=1).map(str.strip).filter(bool)),
)


@given(messages)
def test_rendered_messages_parse_back(message: GuestMessage) -> None:
    assert parse_line(render(message)) == message


@given(st.lists(messages, max_size=20), st.lists(st.integers(1, 40), max_size=30))
def test_line_reader_is_independent_of_chunking(sent: list[GuestMessage], cuts: list[int]) -> None:
    stream = "".join(render(m) for m in sent).encode()
    reader = LineReader()
    received: list[GuestMessage] = []
    offset = 0
    for cut in cuts:
        received += reader.feed(stream[offset : offset + cut])
        offset += cut
    received += reader.feed(stream[offset:])
    assert received == sent


def test_line_reader_skips_junk_and_overlong_lines() -> None:
    reader = LineReader()
    assert reader.feed(b"\xff\xfe boot noise\nHB 1 0\n") == [Heartbeat(1, 0)]
    assert reader.feed(b"x" * (MAX_LINE_BYTES + 1)) == []
    assert reader.feed(b"HB 9 9\nHB 2 0\n") == [Heartbeat(2, 0)]  # tail of the long line


@pytest.mark.parametrize(
    ("command", "wire"),
    [
        (verify_command(), b"verify\n"),
        (corrupt_command(0), b"corrupt 0\n"),
        (corrupt_command(65535), b"corrupt 65535\n"),
        (corrupt_block_command(0), b"corrupt-block 0\n"),
        (corrupt_block_command(16383), b"corrupt-block 16383\n"),
        (pause_command(), b"pause\n"),
        (resume_command(), b"resume\n"),
        (ready_command(), b"ready\n"),
        (heartbeat_rate_command(20), b"hz 20\n"),
        (heartbeat_rate_command(10_000), b"hz 10000\n"),
    ],
)
def test_commands(command: bytes, wire: bytes) -> None:
    assert command == wire


@pytest.mark.parametrize("hz", [0, -1, 10_001])
def test_heartbeat_rate_out_of_range_is_refused(hz: int) -> None:
    with pytest.raises(ConfigError, match="heartbeat rate"):
        heartbeat_rate_command(hz)


def test_corrupt_rejects_negative_index() -> None:
    with pytest.raises(ConfigError):
        corrupt_command(-1)
    with pytest.raises(ConfigError):
        corrupt_block_command(-1)


def test_verify_result_is_intact() -> None:
    assert VerifyResult(10, 0, None).is_intact
    assert VerifyResult(10, 0, None, 16384, 0, None).is_intact
    assert not VerifyResult(10, 1, 3).is_intact
    assert not VerifyResult(10, 0, None, 16384, 1, 4321).is_intact
