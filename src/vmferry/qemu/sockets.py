"""Keep a migrating QEMU's unsent bytes small: ``TCP_NOTSENT_LOWAT`` on its migration sockets.

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
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
from dataclasses import dataclass, field

from vmferry.core.errors import ConfigError
from vmferry.core.felt import NOTSENT_LOWAT_BYTES

__all__ = ["UnsentLimiter", "unsent_limit_bytes", "uri_host"]

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
            if sock.type != socket.SOCK_STREAM or sock.family not in (
                socket.AF_INET,
                socket.AF_INET6,
            ):
                self._seen.add(inode)
                return
            try:
                peer = sock.getpeername()[0]
            except OSError:  # not connected yet
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
