"""A migrating QEMU's sockets, seen from its agent: keep its unsent bytes small
(``TCP_NOTSENT_LOWAT``), and tell a link that carries its stream from a stuck one (``TCP_INFO``).

QEMU writes its migration stream into ordinary TCP sockets, and Linux lets a socket hold up to
its send buffer (autotuned to ~1-4 MB) of bytes not yet sent. QEMU counts a byte as migrated
once the socket took it, so on a link slower than QEMU:

* QEMU's bandwidth estimate runs ahead of the link, so it switches over believing the pause will
  be short, and its ``downtime`` stops counting while up to a send buffer of the last pass is
  still to cross the link. The guest feels that drain: measured on a 50 Mbit/s link, ~1.1-1.4 MB
  unsent at the switch, ~185 ms felt beyond QEMU's figure (pre-copy), ~300 ms (multifd);
* a post-copy switch's device state waits behind the same bytes.

``TCP_NOTSENT_LOWAT`` bounds what a socket holds unsent (the kernel makes the writer wait
instead), without touching what is in flight; the link stays as busy (same total times). Set
on the source QEMU's connections to the destination, the switch waits behind ~128 KiB, not a
megabyte: on the 50 Mbit/s link the felt stall beyond QEMU's figure fell to ~45-80 ms and a
hybrid switch's stall from ~530-880 ms to ~370-410 ms (README, "How `plan` predicts";
``bench/unsent_limit.sh``). ``VMFERRY_UNSENT_LIMIT_BYTES`` in the agent's environment sets another
limit (0: none, as QEMU makes it).

QEMU offers no option for it, and host-wide ``net.ipv4.tcp_notsent_lowat`` would touch every
program; instead the agent (root, QEMU's parent) borrows each socket with ``pidfd_getfd``
(Linux >= 5.6) and sets the option on the shared socket. Everything here is best effort: a
kernel without it or a socket that went away leaves the migration as QEMU made it.

The same borrowed sockets tell whether a quiet post-copy's link still works
(:func:`link_alive`): before the agent pauses a post-copy that sent nothing for a while, it
looks twice at the connections' ``TCP_INFO``. Nothing unacknowledged (the source sent every
page and waits for its destination to finish) or acknowledgements coming (it sends its last
pages holding the lock its status is asked under) is a working link, and a pause then would
fail the migration inside QEMU (found by the matrix: hybrid moves of a 2 GiB Debian guest
paused ~2.5 s after their switch, then reported split). A cut link leaves what was sent
unacknowledged, and nothing arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import socket
import struct
from dataclasses import dataclass, field

from vmferry.core.errors import ConfigError
from vmferry.core.felt import NOTSENT_LOWAT_BYTES

__all__ = [
    "TcpLook",
    "UnsentLimiter",
    "link_alive",
    "link_carries_on",
    "look_at_link",
    "unsent_limit_bytes",
    "uri_host",
]

logger = logging.getLogger(__name__)


_SYS_PIDFD_GETFD = 438  # x86_64 and the generic syscall table
_libc = ctypes.CDLL(None, use_errno=True)


def unsent_limit_bytes() -> int | None:
    """The limit the agent sets: ``VMFERRY_UNSENT_LIMIT_BYTES`` if given (0: none), else
    :data:`~vmferry.core.felt.NOTSENT_LOWAT_BYTES`."""
    value = os.environ.get("VMFERRY_UNSENT_LIMIT_BYTES", "").strip()
    if not value:
        return NOTSENT_LOWAT_BYTES
    try:
        limit = int(value)
    except ValueError:
        raise ConfigError(f"VMFERRY_UNSENT_LIMIT_BYTES={value!r}: a number of bytes") from None
    return limit if limit > 0 else None


def uri_host(uri: str) -> str:
    """The address of a ``tcp:HOST:PORT`` migration URI (``[v6]`` brackets removed).

    >>> uri_host("tcp:10.211.77.2:4444"), uri_host("tcp:[::1]:4444")
    ('10.211.77.2', '::1')
    """
    host = uri.removeprefix("tcp:").rsplit(":", 1)[0]
    return host.removeprefix("[").removesuffix("]")


def _borrow(pidfd: int, fd: int) -> int:
    """A duplicate, in this process, of ``fd`` of the process behind ``pidfd``."""
    borrowed = int(_libc.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0))
    if borrowed < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return borrowed


def _socket_inodes(pid: int) -> dict[int, int]:
    """``pid``'s file descriptors that are sockets, by the socket's inode."""
    found: dict[int, int] = {}
    directory = f"/proc/{pid}/fd"
    for name in os.listdir(directory):
        try:
            target = os.readlink(f"{directory}/{name}")
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            found[int(target[8:-1])] = int(name)
    return found


def _tcp_peer(sock: socket.socket) -> str | None:
    """The address a TCP socket is connected to: "" for a socket that is not TCP, None for
    one not connected yet."""
    if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return ""
    try:
        return str(sock.getpeername()[0])
    except OSError:
        return None


@dataclass(slots=True)
class UnsentLimiter:
    """Sets ``TCP_NOTSENT_LOWAT`` on QEMU ``pid``'s TCP connections to ``peer_address``.

    Call :meth:`apply` as the migration goes on (multifd and post-copy open their channels
    after the start); each socket is looked at once. Never raises.
    """

    pid: int
    peer_address: str
    lowat_bytes: int = NOTSENT_LOWAT_BYTES
    tuned: int = 0
    _seen: set[int] = field(default_factory=set)
    _disabled: bool = False

    def apply(self) -> int:
        """Tune the connections opened since the last call; returns how many are tuned."""
        if self._disabled:
            return self.tuned
        try:
            pidfd = os.pidfd_open(self.pid)
        except OSError as err:
            self._disable(err)
            return self.tuned
        try:
            for inode, fd in _socket_inodes(self.pid).items():
                if inode not in self._seen:
                    self._look_at(pidfd, inode, fd)
        except OSError as err:
            self._disable(err)
        finally:
            os.close(pidfd)
        return self.tuned

    def _look_at(self, pidfd: int, inode: int, fd: int) -> None:
        try:
            borrowed = _borrow(pidfd, fd)
        except OSError:  # closed meanwhile, or not ours to take: look again next time
            return
        with socket.socket(fileno=borrowed) as sock:  # closes the duplicate only
            peer = _tcp_peer(sock)
            if peer is None:  # not connected yet: look again next time
                return
            self._seen.add(inode)
            if peer != self.peer_address:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, self.lowat_bytes)
            self.tuned += 1
            logger.info(
                "migration.unsent_limited pid=%s fd=%s to %s: %s bytes",
                self.pid,
                fd,
                peer,
                self.lowat_bytes,
            )

    def _disable(self, err: OSError) -> None:
        self._disabled = True
        logger.warning("migration.unsent_limit unavailable for pid %s: %s", self.pid, err)


# struct tcp_info (linux/tcp.h): tcpi_unacked (u32) at 24, tcpi_bytes_acked and
# tcpi_bytes_received (u64) at 120 and 128, tcpi_notsent_bytes (u32) at 144 (Linux >= 4.6).
_TCP_INFO_BYTES = 148
_UNACKED_AT, _ACKED_AT, _RECEIVED_AT, _NOTSENT_AT = 24, 120, 128, 144


@dataclass(frozen=True, slots=True)
class TcpLook:
    """One look at a QEMU's TCP connections to its peer, summed over them."""

    connections: int
    unacked_segments: int  # sent, not acknowledged yet
    notsent_bytes: int  # written by QEMU, not sent yet
    acked_bytes: int  # acknowledged by the peer since the connection opened
    received_bytes: int

    @property
    def idle(self) -> bool:
        """Nothing waits to cross the link: every byte QEMU wrote is acknowledged."""
        return self.unacked_segments == 0 and self.notsent_bytes == 0


def link_carries_on(before: TcpLook, after: TcpLook) -> str | None:
    """Why the link between two looks still works (None: it looks stuck, or is gone).

    A link cut leaves what was sent unacknowledged and nothing arrives; a QEMU that merely has
    nothing to send (a post-copy source waiting for its destination to finish) leaves nothing
    unacknowledged, and one that sends acks come back.

    >>> quiet = TcpLook(2, 0, 0, 5_000, 900)
    >>> link_carries_on(quiet, quiet)
    'nothing waits to cross it'
    >>> cut = TcpLook(2, 40, 131_072, 5_000, 900)
    >>> link_carries_on(cut, cut) is None
    True
    >>> link_carries_on(cut, TcpLook(2, 40, 131_072, 9_096, 900))
    '4096 bytes acknowledged'
    """
    if after.connections == 0 or after.connections != before.connections:
        return None
    if after.idle:
        return "nothing waits to cross it"
    if after.acked_bytes > before.acked_bytes:
        return f"{after.acked_bytes - before.acked_bytes} bytes acknowledged"
    if after.received_bytes > before.received_bytes:
        return f"{after.received_bytes - before.received_bytes} bytes received"
    return None


def look_at_link(pid: int, peer_address: str) -> TcpLook:
    """QEMU ``pid``'s TCP connections to ``peer_address`` as the kernel sees them now.

    Raises:
        OSError: the process or its file descriptors cannot be looked at.
    """
    infos: list[bytes] = []
    pidfd = os.pidfd_open(pid)
    try:
        for fd in _socket_inodes(pid).values():
            with contextlib.suppress(OSError):  # closed meanwhile
                info = _tcp_info(pidfd, fd, peer_address)
                if info is not None:
                    infos.append(info)
    finally:
        os.close(pidfd)
    return TcpLook(
        connections=len(infos),
        unacked_segments=sum(struct.unpack_from("=I", i, _UNACKED_AT)[0] for i in infos),
        notsent_bytes=sum(struct.unpack_from("=I", i, _NOTSENT_AT)[0] for i in infos),
        acked_bytes=sum(struct.unpack_from("=Q", i, _ACKED_AT)[0] for i in infos),
        received_bytes=sum(struct.unpack_from("=Q", i, _RECEIVED_AT)[0] for i in infos),
    )


def _tcp_info(pidfd: int, fd: int, peer_address: str) -> bytes | None:
    """``TCP_INFO`` of QEMU's ``fd`` if it is a TCP connection to ``peer_address``."""
    with socket.socket(fileno=_borrow(pidfd, fd)) as sock:  # closes the duplicate only
        if _tcp_peer(sock) != peer_address:
            return None
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_BYTES)
    return info if len(info) >= _TCP_INFO_BYTES else None


async def link_alive(pid: int, peer_address: str, window_s: float = 0.5) -> str | None:
    """Why QEMU ``pid``'s link to ``peer_address`` still works, looked at over ``window_s``
    (None: stuck, gone, or not to be looked at)."""
    try:
        before = look_at_link(pid, peer_address)
        await asyncio.sleep(window_s)
        after = look_at_link(pid, peer_address)
    except OSError as err:
        logger.debug("link of pid %s to %s not looked at: %s", pid, peer_address, err)
        return None
    return link_carries_on(before, after)
