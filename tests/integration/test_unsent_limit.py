"""The source agent's unsent-bytes limit reaches another process's sockets (``pidfd_getfd``):
a child process holds a TCP connection to a listener here and one to elsewhere; only the
first gets ``TCP_NOTSENT_LOWAT``."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from vmferry.qemu.sockets import UnsentLimiter, _borrow

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="borrowing a socket needs ptrace rights")

_CHILD = """
import socket, sys, time
a = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
b = socket.create_connection(("127.0.0.2", int(sys.argv[2])))
print(a.fileno(), b.fileno(), flush=True)
time.sleep(30)
"""


def _lowat(pid: int, fd: int) -> int:
    pidfd = os.pidfd_open(pid)
    try:
        with socket.socket(fileno=_borrow(pidfd, fd)) as sock:
            return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT)
    finally:
        os.close(pidfd)


def test_only_the_connections_to_the_peer_are_limited() -> None:
    with (
        socket.create_server(("127.0.0.1", 0)) as peer,
        socket.create_server(("127.0.0.2", 0)) as other,
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(peer.getsockname()[1]), str(other.getsockname()[1])],
            stdout=subprocess.PIPE,
            text=True,
        ) as child,
    ):
        try:
            assert child.stdout is not None
            to_peer, to_other = (int(fd) for fd in child.stdout.readline().split())
            before = _lowat(child.pid, to_peer)
            limiter = UnsentLimiter(child.pid, "127.0.0.1", lowat_bytes=64 << 10)
            assert limiter.apply() == 1
            assert limiter.apply() == 1  # each socket once
            assert _lowat(child.pid, to_peer) == 64 << 10
            assert _lowat(child.pid, to_other) == before
        finally:
            child.kill()
    # A process that is gone: nothing raised, nothing tuned.
    gone = UnsentLimiter(child.pid, "127.0.0.1")
    assert gone.apply() == 0
