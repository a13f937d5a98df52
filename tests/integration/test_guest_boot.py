"""Boot the real lab guest under TCG and drive its workload over the ttyS1 channel."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vmferry.core.workload import parse_workload
from vmferry.guest.image import KERNEL_BASE_ARGS, GuestImage
from vmferry.guest.protocol import (
    Ack,
    Corrupted,
    GuestMessage,
    Heartbeat,
    LineReader,
    Ready,
    VerifyResult,
    corrupt_command,
    pause_command,
    resume_command,
    verify_command,
)

pytestmark = pytest.mark.qemu

WORKLOAD = "dirty:rate=50M,size=256M,pattern=random,mode=paced"
BOOT_TIMEOUT_S = 25.0
REPLY_TIMEOUT_S = 10.0


@dataclass
class Guest:
    process: subprocess.Popen[bytes]
    console_log: Path
    channel_path: Path
    started_at: float

    def console_tail(self) -> str:
        try:
            lines = self.console_log.read_text(errors="replace").splitlines()
        except OSError:
            return "(no console log)"
        return "\n".join(lines[-25:])


class Channel:
    """Blocking reader of guest messages with a deadline on every wait."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = LineReader()
        self.pending: list[GuestMessage] = []
        self.heartbeats: list[tuple[float, Heartbeat]] = []

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def wait_for(self, wanted: Callable[[GuestMessage], bool], timeout_s: float) -> GuestMessage:
        deadline = time.monotonic() + timeout_s
        while True:
            while self.pending:
                message = self.pending.pop(0)
                if wanted(message):
                    return message
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no matching guest message within {timeout_s:g} s")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            if not data:
                raise ConnectionError("guest channel closed")
            now = time.monotonic()
            for message in self.reader.feed(data):
                if isinstance(message, Heartbeat):
                    self.heartbeats.append((now, message))
                self.pending.append(message)

    def collect(self, duration_s: float) -> list[tuple[float, Heartbeat]]:
        start = len(self.heartbeats)
        end = time.monotonic() + duration_s
        while (left := end - time.monotonic()) > 0:
            try:
                self.wait_for(lambda _m: False, left)
            except TimeoutError:
                break
        return self.heartbeats[start:]


@pytest.fixture
def guest(guest_image: GuestImage) -> Iterator[Guest]:
    qemu = shutil.which("qemu-system-x86_64")
    assert qemu is not None, "qemu-system-x86_64 is not installed"
    # A short private directory: UNIX socket paths are limited to 108 bytes.
    workdir = Path(tempfile.mkdtemp(prefix="vmf-boot-"))
    channel_path = workdir / "ch1.sock"
    console_log = workdir / "console.log"
    spec = parse_workload(WORKLOAD)
    argv = [
        qemu,
        "-accel", "tcg",
        "-machine", "pc-q35-10.0",
        "-cpu", "qemu64",
        "-m", "512M",
        "-nographic",
        "-no-reboot",
        "-nodefaults",
        "-kernel", str(guest_image.kernel_path),
        "-initrd", str(guest_image.initrd_path),
        "-append", " ".join([*KERNEL_BASE_ARGS, *spec.kernel_args()]),
        "-chardev", f"socket,id=ch1,path={channel_path},server=on,wait=off",
        "-serial", f"file:{console_log}",
        "-serial", "chardev:ch1",
    ]  # fmt: skip
    with (workdir / "qemu.log").open("wb") as qemu_log:
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=qemu_log, stderr=subprocess.STDOUT
        )
    started_at = time.monotonic()
    try:
        yield Guest(process, console_log, channel_path, started_at)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


def _connect(guest: Guest, timeout_s: float) -> socket.socket:
    deadline = time.monotonic() + timeout_s
    while True:
        assert guest.process.poll() is None, f"QEMU exited early:\n{guest.console_tail()}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(guest.channel_path))
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
            continue
        return sock


def test_guest_boots_beats_and_verifies(guest: Guest) -> None:
    with _connect(guest, timeout_s=5.0) as sock:
        channel = Channel(sock)
        try:
            ready = channel.wait_for(lambda m: isinstance(m, Ready), BOOT_TIMEOUT_S)
        except TimeoutError:
            pytest.fail(f"no READY within {BOOT_TIMEOUT_S} s; console:\n{guest.console_tail()}")
        boot_s = time.monotonic() - guest.started_at
        assert ready == Ready(pages=65536, pattern="random", mode="paced", rate_bps=50 << 20)

        beats = channel.collect(2.0)
        assert len(beats) >= 2
        span_s = beats[-1][0] - beats[0][0]
        beat_hz = (len(beats) - 1) / span_s
        seq_span = beats[-1][1].seq - beats[0][1].seq
        dirty_bps = (beats[-1][1].dirtied_pages - beats[0][1].dirtied_pages) * 4096 / span_s
        assert len(beats) >= 200, f"only {len(beats)} heartbeats in 2 s"
        assert all(b.seq > a.seq for (_, a), (_, b) in itertools.pairwise(beats))

        def reply(data: bytes, kind: type[GuestMessage]) -> GuestMessage:
            channel.send(data)
            return channel.wait_for(lambda m: isinstance(m, kind), REPLY_TIMEOUT_S)

        # Pause first: a paced writer could otherwise rewrite the corrupted page (and heal it).
        assert reply(pause_command(), Ack) == Ack("pause")
        started = time.monotonic()
        assert reply(verify_command(), VerifyResult) == VerifyResult(65536, 0, None)
        verify_s = time.monotonic() - started
        assert reply(corrupt_command(12345), Corrupted) == Corrupted(12345)
        assert reply(verify_command(), VerifyResult) == VerifyResult(65536, 1, 12345)
        assert reply(resume_command(), Ack) == Ack("resume")
        channel.wait_for(lambda m: isinstance(m, Heartbeat), 2.0)

    print(
        f"\nboot to READY {boot_s:.1f} s; heartbeats {beat_hz:.0f}/s "
        f"({len(beats)} received of {seq_span + 1} sent); paced dirty rate "
        f"{dirty_bps / 1e6:.1f} MB/s; verify of 256 MiB {verify_s:.2f} s"
    )
