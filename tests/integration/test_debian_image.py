"""The Debian guest image, built (or found in the cache) from Debian's packages: it boots with
direct kernel boot from a throwaway overlay, and its qemu-guest-agent answers over virtio-serial.
"""

from __future__ import annotations

import itertools
import json
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmferry.guest.debian import DebianImage, debian_image

pytestmark = pytest.mark.qemu

# Measured under TCG, 1 GiB, 2 vCPUs on this 2-core machine: ~9 s to the agent's first answer
# (13-15 s when the machine is busy).
AGENT_TIMEOUT_S = 120.0
SYNC_INTERVAL_S = 1.0


@pytest.fixture(scope="module")
def debian() -> DebianImage:
    """The image (a cold build takes ~1 min here, more on a slow mirror)."""
    return debian_image()


@pytest.fixture
def run_dir() -> Iterator[Path]:
    # Short: a UNIX socket path must fit in 108 bytes.
    path = Path(tempfile.mkdtemp(prefix="vmf-deb-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Agent:
    """The host side of qemu-guest-agent's JSON protocol, one line per message."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def send(self, command: str, **arguments: object) -> None:
        message: dict[str, object] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        self.sock.sendall(json.dumps(message).encode() + b"\n")

    def receive(self, deadline: float) -> dict[str, object] | None:
        """The next message, or None at the deadline."""
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                return None
            if not chunk:
                raise ConnectionError("QEMU closed the agent's socket")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        try:
            message = json.loads(line)
        except ValueError:
            return {}  # a partial line left by an earlier agent run
        assert isinstance(message, dict)
        return message

    def sync(self, qemu: subprocess.Popen[bytes], deadline: float) -> int:
        """Send guest-sync with a new id each interval until the agent echoes one of them.

        Until the agent runs, QEMU holds what we send; the agent then answers every queued
        guest-sync, so only the echo of the id we wait for counts.
        """
        for sync_id in itertools.count(1):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no agent answer in {AGENT_TIMEOUT_S:g} s")
            if qemu.poll() is not None:
                raise RuntimeError(f"QEMU exited with status {qemu.returncode}")
            self.send("guest-sync", id=sync_id)
            wait_until = min(deadline, time.monotonic() + SYNC_INTERVAL_S)
            while (message := self.receive(wait_until)) is not None:
                if message.get("return") == sync_id:
                    return sync_id
        raise AssertionError("unreachable")

    def execute(self, command: str, deadline: float) -> object:
        self.send(command)
        while (message := self.receive(deadline)) is not None:
            if "return" in message or "error" in message:
                assert "error" not in message, message
                return message["return"]
        raise TimeoutError(f"no answer to {command}")


def _connect(path: Path, deadline: float) -> socket.socket:
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            return sock
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _console_tail(path: Path) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-30:])
    except OSError:
        return "(no console output)"


@pytest.mark.timeout(900)  # a cold build on a fresh machine downloads ~100 MB first
def test_direct_kernel_boot_answers_guest_ping(debian: DebianImage, run_dir: Path) -> None:
    disk_stat = debian.disk.stat()
    overlay = run_dir / "overlay.qcow2"
    subprocess.run(
        [
            *("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2"),
            *("-b", str(debian.disk), str(overlay)),
        ],
        check=True,
    )
    agent_path = run_dir / "qga.sock"
    console = run_dir / "console.log"
    argv = [
        *("qemu-system-x86_64", "-accel", "tcg", "-m", "1024", "-smp", "2"),
        *("-nodefaults", "-display", "none", "-no-reboot", "-serial", f"file:{console}"),
        *("-kernel", str(debian.kernel), "-initrd", str(debian.initrd)),
        *("-append", debian.root_append),
        *("-drive", f"file={overlay},if=virtio,format=qcow2"),
        *("-chardev", f"socket,path={agent_path},server=on,wait=off,id=qga0"),
        *("-device", "virtio-serial"),
        *("-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0"),
    ]
    started = time.monotonic()
    deadline = started + AGENT_TIMEOUT_S
    qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    try:
        agent = Agent(_connect(agent_path, deadline))
        try:
            agent.sync(qemu, deadline)
            answered_s = time.monotonic() - started
            assert agent.execute("guest-ping", deadline) == {}
            assert agent.execute("guest-get-host-name", deadline) == {"host-name": "vmferry-debian"}
        finally:
            agent.sock.close()
    except (TimeoutError, RuntimeError, ConnectionError, OSError) as err:
        pytest.fail(f"{err}\n--- guest console ---\n{_console_tail(console)}")
    finally:
        qemu.kill()
        qemu.wait()
    print(f"guest agent answered {answered_s:.1f} s after QEMU started")
    assert debian.disk.stat().st_mtime_ns == disk_stat.st_mtime_ns, "the cached image was written"
