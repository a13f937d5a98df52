"""The source agent reaches another process's sockets (``pidfd_getfd``): a child process holds a
TCP connection to a listener here and one to elsewhere; only the first gets
``TCP_NOTSENT_LOWAT``. And the agent tells a link that works from one that is stuck by what the
kernel says of the child's connection (``TCP_INFO``), as it does before pausing a post-copy."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from vmferry.qemu.sockets import UnsentLimiter, _borrow, link_alive

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


_SENDER = """
import socket, sys, time
a = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
print("connected", flush=True)
total = int(sys.argv[2])
while total != 0:  # a negative total: send for ever
    a.sendall(b"x" * 65536)
    total -= 1
time.sleep(30)
"""


def _sender(port: int, chunks: int) -> subprocess.Popen[str]:
    child = subprocess.Popen(
        [sys.executable, "-c", _SENDER, str(port), str(chunks)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "connected"
    return child


def _drain(conn: socket.socket, stop: threading.Event) -> None:
    conn.settimeout(0.1)
    while not stop.is_set():
        try:
            if not conn.recv(1 << 16):
                return
        except TimeoutError:
            continue


def test_a_link_that_carries_on_is_told_from_a_stuck_one() -> None:
    with socket.create_server(("127.0.0.1", 0)) as peer:
        port = peer.getsockname()[1]
        # Sending for ever to a peer that reads nothing: bytes wait, none are acknowledged.
        child = _sender(port, -1)
        conn, _ = peer.accept()
        stop = threading.Event()
        reader = threading.Thread(target=_drain, args=(conn, stop))
        try:
            time.sleep(0.5)  # both buffers fill
            assert asyncio.run(link_alive(child.pid, "127.0.0.1", window_s=0.3)) is None
            reader.start()
            # Read: acknowledged (or, on loopback, all of it at the moment of the look).
            assert asyncio.run(link_alive(child.pid, "127.0.0.1", window_s=0.3)) is not None
            assert asyncio.run(link_alive(child.pid, "127.0.0.2", window_s=0.1)) is None
        finally:
            stop.set()
            child.kill()
            child.communicate()
            if reader.is_alive():
                reader.join()
            conn.close()
        # Everything sent and read: nothing waits to cross the link.
        child = _sender(port, 4)
        conn, _ = peer.accept()
        stop = threading.Event()
        reader = threading.Thread(target=_drain, args=(conn, stop))
        reader.start()
        try:
            time.sleep(0.3)
            why = asyncio.run(link_alive(child.pid, "127.0.0.1", window_s=0.1))
            assert why == "nothing waits to cross it"
        finally:
            stop.set()
            child.kill()
            child.communicate()
            reader.join()
            conn.close()
