"""The host's side of the guest workload's serial protocol (``/dev/ttyS1`` in the guest).

Pure: text lines in, frozen messages out; commands out as bytes. One message per ``\\n``-ended
ASCII line. The guest sends::

    READY pages=<n> pattern=<p> mode=<m> rate=<bytes/s> disk_blocks=<n> disk_rate=<bytes/s>
                                   after filling its working set (and its disk region)
    HB <seq> <dirtied_pages_total> every 1/hz s, best effort
    VERIFY <pages_checked> <bad_pages> <first_bad_page|-1>
           <blocks_checked> <bad_blocks> <first_bad_block|-1>
                                   reply to ``verify`` (one line; blocks ``0 0 -1`` without a disk)
    CORRUPTED <page>               reply to ``corrupt <page>``
    CORRUPTED block <n>            reply to ``corrupt-block <n>``
    ACK pause | ACK resume         reply to ``pause`` / ``resume`` (pause stops disk writes too)
    ACK hz <n>                     reply to ``hz <n>``: heartbeats at <n> per second from the next
    ERR <text>                     reply to anything else

Heartbeat sequence numbers count attempts, so a gap in ``seq`` is a dropped heartbeat, and
``dirtied_pages_total`` counts page writes since READY (the initial fill is not counted).
Replies are never dropped by the guest; heartbeats stop while a verify runs. Verify reads the
disk region back from the device (``O_DIRECT``), not from the guest's page cache. The older
READY and VERIFY forms without the disk fields (guests built before disks) still parse, as a
guest without a disk.

Example:
    >>> parse_line("HB 12 3400")
    Heartbeat(seq=12, dirtied_pages=3400)
    >>> parse_line("garbage") is None
    True
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from vmferry.core.errors import ConfigError
from vmferry.core.workload import Mode, Pattern, check_heartbeat_hz

__all__ = [
    "Ack",
    "Corrupted",
    "CorruptedBlock",
    "ErrorReply",
    "GuestMessage",
    "Heartbeat",
    "LineReader",
    "Ready",
    "VerifyResult",
    "corrupt_block_command",
    "corrupt_command",
    "heartbeat_rate_command",
    "parse_line",
    "pause_command",
    "ready_command",
    "resume_command",
    "verify_command",
]

MAX_LINE_BYTES = 512


@dataclass(frozen=True, slots=True)
class Ready:
    """The workload filled its working set and its disk region (generation 1) and is running.

    ``disk_blocks`` is the number of 4 KiB blocks in the disk region (0 without a disk) and
    ``disk_rate_bps`` the rate at which they are rewritten (0 without a disk).
    """

    pages: int
    pattern: Pattern
    mode: Mode
    rate_bps: int
    disk_blocks: int = 0
    disk_rate_bps: int = 0


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """A liveness tick; ``dirtied_pages`` is the running total of page writes since READY."""

    seq: int
    dirtied_pages: int


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """Outcome of a full check of the working set and the disk region.

    ``first_bad`` (a page) and ``first_bad_block`` are None when all are good. A block is bad
    when its header (magic, index), its generation or its checksum is wrong, or it cannot be
    read; without a disk, no blocks are checked.
    """

    pages_checked: int
    bad_pages: int
    first_bad: int | None
    blocks_checked: int = 0
    bad_blocks: int = 0
    first_bad_block: int | None = None

    @property
    def is_intact(self) -> bool:
        """True when no page and no disk block failed its check."""
        return self.bad_pages == 0 and self.bad_blocks == 0


@dataclass(frozen=True, slots=True)
class Corrupted:
    """The guest flipped bytes of ``page`` behind its own checksum table (test hook)."""

    page: int


@dataclass(frozen=True, slots=True)
class CorruptedBlock:
    """The guest flipped bytes of disk ``block`` on the device, behind its table (test hook)."""

    block: int


@dataclass(frozen=True, slots=True)
class Ack:
    """Dirtying stopped (``pause``) or restarted (``resume``), or the heartbeat rate changed
    (``hz``; ``hz`` is its new rate, 0 otherwise)."""

    command: Literal["pause", "resume", "hz"]
    hz: int = 0


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """The guest refused a command (unknown, or a bad argument)."""

    text: str


GuestMessage = Ready | Heartbeat | VerifyResult | Corrupted | CorruptedBlock | Ack | ErrorReply

_UINT = r"(0|[1-9][0-9]{0,19})"
_HB = re.compile(rf"HB {_UINT} {_UINT}")
_VERIFY = re.compile(rf"VERIFY {_UINT} {_UINT} (-1|{_UINT})(?: {_UINT} {_UINT} (-1|{_UINT}))?")
_CORRUPTED = re.compile(rf"CORRUPTED {_UINT}")
_ACK_HZ = re.compile(rf"ACK hz {_UINT}")
_CORRUPTED_BLOCK = re.compile(rf"CORRUPTED block {_UINT}")
_READY = re.compile(
    rf"READY pages={_UINT} pattern=(zero|compressible|random) mode=(idle|paced|cpu) rate={_UINT}"
    rf"(?: disk_blocks={_UINT} disk_rate={_UINT})?"
)
_PATTERNS: dict[str, Pattern] = {"zero": "zero", "compressible": "compressible", "random": "random"}
_MODES: dict[str, Mode] = {"idle": "idle", "paced": "paced", "cpu": "cpu"}


def parse_line(line: str) -> GuestMessage | None:
    """Parse one line from the guest channel.

    Never raises: junk (boot noise, a line torn by a reconnect, unknown words) gives None.

    Args:
        line: one line, with or without its trailing ``\\n``/``\\r\\n``.

    Returns:
        The message, or None if the line is not one.
    """
    text = line.strip()
    if len(text) > MAX_LINE_BYTES:
        return None
    if match := _HB.fullmatch(text):
        return Heartbeat(seq=int(match[1]), dirtied_pages=int(match[2]))
    if match := _VERIFY.fullmatch(text):
        first = int(match[3])
        first_block = int(match[7] or -1)
        return VerifyResult(
            pages_checked=int(match[1]),
            bad_pages=int(match[2]),
            first_bad=None if first < 0 else first,
            blocks_checked=int(match[5] or 0),
            bad_blocks=int(match[6] or 0),
            first_bad_block=None if first_block < 0 else first_block,
        )
    if match := _CORRUPTED.fullmatch(text):
        return Corrupted(page=int(match[1]))
    if match := _CORRUPTED_BLOCK.fullmatch(text):
        return CorruptedBlock(block=int(match[1]))
    if match := _READY.fullmatch(text):
        return Ready(
            pages=int(match[1]),
            pattern=_PATTERNS[match[2]],
            mode=_MODES[match[3]],
            rate_bps=int(match[4]),
            disk_blocks=int(match[5] or 0),
            disk_rate_bps=int(match[6] or 0),
        )
    if text == "ACK pause":
        return Ack("pause")
    if text == "ACK resume":
        return Ack("resume")
    if match := _ACK_HZ.fullmatch(text):
        return Ack("hz", int(match[1]))
    if text.startswith("ERR "):
        return ErrorReply(text[4:])
    return None


class LineReader:
    """Reassemble messages from arbitrary chunks of channel bytes.

    Bytes are decoded as ASCII with replacement, so binary junk becomes an unparseable line
    instead of an exception; a line longer than ``MAX_LINE_BYTES`` is discarded whole.

    Example:
        >>> reader = LineReader()
        >>> reader.feed(b"HB 1 0\\nHB 2")
        [Heartbeat(seq=1, dirtied_pages=0)]
        >>> reader.feed(b" 5\\n")
        [Heartbeat(seq=2, dirtied_pages=5)]
    """

    __slots__ = ("_discarding", "_pending")

    def __init__(self) -> None:
        self._pending = bytearray()
        self._discarding = False

    def feed(self, data: bytes) -> list[GuestMessage]:
        """Add received bytes; return the messages completed by them, in order."""
        messages: list[GuestMessage] = []
        self._pending += data
        while (end := self._pending.find(b"\n")) >= 0:
            raw = bytes(self._pending[:end])
            del self._pending[: end + 1]
            if self._discarding:
                self._discarding = False
                continue
            message = parse_line(raw.decode("ascii", errors="replace"))
            if message is not None:
                messages.append(message)
        if len(self._pending) > MAX_LINE_BYTES:
            self._pending.clear()
            self._discarding = True
        return messages


def verify_command() -> bytes:
    """Ask for a full check of the working set and the disk region (answered by `VerifyResult`)."""
    return b"verify\n"


def corrupt_command(page: int) -> bytes:
    """Ask the guest to damage ``page`` behind its checksum table (answered by `Corrupted`).

    Raises:
        ConfigError: ``page`` is negative.
    """
    if page < 0:
        raise ConfigError(f"page index must be >= 0, got {page}")
    return b"corrupt %d\n" % page


def corrupt_block_command(block: int) -> bytes:
    """Ask the guest to damage disk ``block`` behind its table (answered by `CorruptedBlock`).

    Raises:
        ConfigError: ``block`` is negative.
    """
    if block < 0:
        raise ConfigError(f"block index must be >= 0, got {block}")
    return b"corrupt-block %d\n" % block


def pause_command() -> bytes:
    """Stop dirtying pages and writing disk blocks; heartbeats continue (``Ack("pause")``)."""
    return b"pause\n"


def heartbeat_rate_command(hz: int) -> bytes:
    """Send heartbeats at ``hz`` per second from the next one (answered by ``Ack("hz", hz)``;
    a guest built before the command answers ``ERR``).

    Raises:
        ConfigError: ``hz`` outside 1..10000.
    """
    return f"hz {check_heartbeat_hz(hz)}\n".encode()


def resume_command() -> bytes:
    """Restart dirtying and disk writes (answered by ``Ack("resume")``)."""
    return b"resume\n"


def ready_command() -> bytes:
    """Ask the guest to repeat its READY line (for a host that connected after boot)."""
    return b"ready\n"
