"""The guest agent client against the real qemu-ga and against a scripted fake.

The real agent runs on the host (``qemu-ga -m unix-listen``; no guest needed). Run as root it
executes commands on the host, so the tests run only harmless ones (echo, ``sh -c 'exit 3'``,
cat, sleep) and start it with every command blocked but those they use: ``guest-set-time``
above all, which would set the host's clock. Setting the time is tested against the fake, as
are the faults the real agent will not produce on demand: no agent at all, junk before the
sync sentinel, an error object, a dropped connection, a reply that misses its deadline.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from fakeqga import Drop, Error, FakeQga, Late, Return, Silence

from vmferry.core.errors import GuestAgentCommandError, GuestAgentError, GuestAgentTimeout
from vmferry.qemu.guest_agent import GuestAgent

pytestmark = pytest.mark.asyncio

# The commands these tests send; the host's qemu-ga gets all others blocked.
_ALLOWED = {
    "guest-sync-delimited",
    "guest-sync",
    "guest-ping",
    "guest-info",
    "guest-get-time",
    "guest-get-osinfo",
    "guest-exec",
    "guest-exec-status",
}
_START_TIMEOUT_S = 10.0
_TIMEOUT_S = 5.0


def _short_dir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))  # UNIX socket paths: at most 108 bytes


@dataclass(frozen=True)
class HostQga:
    socket_path: Path
    version_text: str  # ``qemu-ga -V``


@pytest.fixture
def host_qga() -> Iterator[HostQga]:
    """The host's qemu-ga listening on a private socket; ended by PID, also on failure."""
    binary = shutil.which("qemu-ga") or "/usr/sbin/qemu-ga"
    assert os.access(binary, os.X_OK), "qemu-ga missing: install qemu-guest-agent (make setup)"
    version = subprocess.run([binary, "-V"], capture_output=True, text=True, check=True).stdout
    every = subprocess.run([binary, "-b", "help"], capture_output=True, text=True, check=False)
    blocked = sorted(set(every.stdout.split()) - _ALLOWED)
    assert "guest-set-time" in blocked, f"cannot block guest-set-time: {every.stdout!r}"
    workdir = _short_dir("vmf-qga-")
    sock = workdir / "qga.sock"
    argv = [
        binary,
        "-m", "unix-listen",
        "-p", str(sock),
        "-f", str(workdir / "qga.pid"),  # not the system's /run/qemu-ga.pid
        "-t", str(workdir),
        "-l", str(workdir / "qga.log"),
        "-b", ",".join(blocked),
    ]  # fmt: skip
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not sock.exists():
            assert process.poll() is None, (workdir / "qga.log").read_text(errors="replace")
            assert time.monotonic() < deadline, "qemu-ga did not create its socket"
            time.sleep(0.02)
        yield HostQga(sock, version)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(timeout=5)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[FakeQga]:
    workdir = _short_dir("vmf-fqga-")
    agent = FakeQga(workdir / "qga.sock")
    await agent.start()
    try:
        yield agent
    finally:
        await agent.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _pretty_name() -> str | None:
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip('"')
    return None


# The real qemu-ga on the host.


@pytest.mark.qemu
async def test_real_agent_answers_ping_info_and_time(host_qga: HostQga) -> None:
    agent = GuestAgent(host_qga.socket_path, "host")
    assert await agent.ping(timeout_s=_TIMEOUT_S)
    info = await agent.info(timeout_s=_TIMEOUT_S)
    assert info.agent_version in host_qga.version_text
    assert info.can("guest-exec")
    assert not info.can("guest-set-time")  # blocked above: it would set the host's clock
    assert info.os_pretty_name == _pretty_name()
    assert info.kernel_release == os.uname().release
    before = time.time_ns()
    guest_ns = await agent.guest_time_ns(timeout_s=_TIMEOUT_S)
    assert before - 10**9 < guest_ns < time.time_ns() + 10**9


@pytest.mark.qemu
async def test_real_exec_returns_output_exit_status_and_binary_data(host_qga: HostQga) -> None:
    agent = GuestAgent(host_qga.socket_path, "host")
    echo = await agent.exec(["/bin/echo", "hello", "guest"], timeout_s=_TIMEOUT_S)
    assert (echo.exit_code, echo.signal, echo.stdout, echo.stderr) == (
        0,
        None,
        b"hello guest\n",
        b"",
    )
    assert not echo.truncated

    failing = await agent.exec(["/bin/sh", "-c", "echo oops >&2; exit 3"], timeout_s=_TIMEOUT_S)
    assert (failing.exit_code, failing.stdout, failing.stderr) == (3, b"", b"oops\n")

    binary = bytes(range(256)) * 512  # 128 KiB: every byte value, over several reads
    cat = await agent.exec(["/bin/cat"], timeout_s=_TIMEOUT_S, input_bytes=binary)
    assert cat.exit_code == 0
    assert cat.stdout == binary


@pytest.mark.qemu
async def test_real_exec_errors_and_timeout(host_qga: HostQga) -> None:
    agent = GuestAgent(host_qga.socket_path, "host")
    with pytest.raises(GuestAgentCommandError) as missing:
        await agent.exec(["/nonexistent/program"], timeout_s=_TIMEOUT_S)
    assert missing.value.command == "guest-exec"
    assert "No such file" in missing.value.desc

    with pytest.raises(GuestAgentCommandError) as blocked:
        await agent.sync_time(timeout_s=_TIMEOUT_S)  # blocked by the fixture
    assert blocked.value.error_class == "CommandNotFound"

    started = time.monotonic()
    with pytest.raises(GuestAgentTimeout) as late:
        await agent.exec(["/bin/sleep", "3"], timeout_s=0.5)
    assert time.monotonic() - started < 2.0
    assert "guest pid" in str(late.value)
    # The next call resynchronises on a fresh connection and is answered.
    assert await agent.ping(timeout_s=_TIMEOUT_S)


@pytest.mark.qemu
async def test_real_calls_take_turns_and_log_without_bodies(
    host_qga: HostQga, caplog: pytest.LogCaptureFixture
) -> None:
    agent = GuestAgent(host_qga.socket_path, "host")
    secret = b"x" * 1000
    with caplog.at_level(logging.DEBUG, logger="vmferry.qemu.guest_agent"):
        results = await asyncio.gather(
            agent.ping(timeout_s=_TIMEOUT_S),
            agent.exec(["/bin/cat"], timeout_s=_TIMEOUT_S, input_bytes=secret),
            agent.guest_time_ns(timeout_s=_TIMEOUT_S),
        )
    assert results[0] is True
    assert results[1].stdout == secret
    text = caplog.text
    assert "--> " in text
    assert "<-- " in text
    assert base64.b64encode(secret).decode() not in text
    assert "<1336 chars>" in text  # input-data and out-data, shortened to their length


# The scripted fake.


async def test_no_agent_means_ping_false_within_the_deadline(fake: FakeQga) -> None:
    fake.sync_silent = True
    agent = GuestAgent(fake.path, "vm1")
    started = time.monotonic()
    assert await agent.ping(timeout_s=0.3) is False
    assert time.monotonic() - started < 1.0
    with pytest.raises(GuestAgentTimeout) as err:
        await agent.guest_time_ns(timeout_s=0.3)
    assert err.value.what == "guest-sync-delimited"
    assert str(err.value) == "guest agent of vm1: no answer to guest-sync-delimited within 0.3 s"


async def test_junk_and_stale_replies_before_the_sentinel_are_skipped(fake: FakeQga) -> None:
    fake.before_sentinel = (
        b'{"error": {"class": "GenericError", "desc": "JSON parse error"}}\n'
        b'\xff{"return": 7}\n'  # an earlier client's sync answer
        b"\x00\x01 half a rep"
    )
    fake.script["guest-get-time"] = Return(1_700_000_000_123_456_789)
    agent = GuestAgent(fake.path, "vm1")
    assert await agent.guest_time_ns(timeout_s=_TIMEOUT_S) == 1_700_000_000_123_456_789


async def test_error_object_becomes_a_typed_error(fake: FakeQga) -> None:
    fake.script["guest-exec"] = Error("GenericError", "Guest agent command failed")
    agent = GuestAgent(fake.path, "vm1")
    with pytest.raises(GuestAgentCommandError) as err:
        await agent.exec(["true"], timeout_s=_TIMEOUT_S)
    assert (err.value.command, err.value.error_class) == ("guest-exec", "GenericError")
    assert str(err.value) == (
        "guest agent of vm1: guest-exec failed: GenericError: Guest agent command failed"
    )


async def test_connection_dropped_mid_reply_fails_at_once(fake: FakeQga) -> None:
    fake.script["guest-info"] = Drop(b'{"return": {"version": "9.')
    agent = GuestAgent(fake.path, "vm1")
    started = time.monotonic()
    with pytest.raises(GuestAgentError) as err:
        await agent.info(timeout_s=_TIMEOUT_S)
    assert not isinstance(err.value, GuestAgentTimeout)
    assert "connection closed" in str(err.value)
    assert time.monotonic() - started < 1.0


async def test_a_late_reply_is_not_taken_for_the_next_calls(fake: FakeQga) -> None:
    fake.script["guest-get-time"] = [Late(111), Return(222)]
    agent = GuestAgent(fake.path, "vm1")
    with pytest.raises(GuestAgentTimeout) as err:
        await agent.guest_time_ns(timeout_s=0.3)
    assert err.value.what == "guest-get-time"
    # The next connection starts with the stale answer; the sync skips it.
    assert await agent.guest_time_ns(timeout_s=_TIMEOUT_S) == 222


async def test_sync_time_sends_the_host_time_in_ns(fake: FakeQga) -> None:
    agent = GuestAgent(fake.path, "vm1")
    before = time.time_ns()
    await agent.sync_time(timeout_s=_TIMEOUT_S)
    after = time.time_ns()
    [(command, arguments)] = fake.requests
    assert command == "guest-set-time"
    sent = arguments["time"]
    assert isinstance(sent, int)
    assert before <= sent <= after


async def test_exec_polls_until_exited_and_decodes(fake: FakeQga) -> None:
    fake.script["guest-exec"] = Return({"pid": 41})
    fake.script["guest-exec-status"] = [
        Return({"exited": False}),
        Return({"exited": False}),
        Return({"exited": True, "signal": 9, "out-data": "AP8=", "out-truncated": True}),
    ]
    agent = GuestAgent(fake.path, "vm1")
    result = await agent.exec(["/bin/x", "-y"], timeout_s=_TIMEOUT_S, input_bytes=b"\x01\x02")
    assert (result.exit_code, result.signal, result.stdout, result.stderr) == (
        None,
        9,
        b"\x00\xff",
        b"",
    )
    assert result.truncated
    assert fake.requests[0] == (
        "guest-exec",
        {"path": "/bin/x", "arg": ["-y"], "capture-output": True, "input-data": "AQI="},
    )
    assert [name for name, _ in fake.requests[1:]] == ["guest-exec-status"] * 3
    assert fake.connections == 1


async def test_malformed_replies_are_errors(fake: FakeQga) -> None:
    fake.script["guest-get-time"] = Return("soon")
    fake.script["guest-exec"] = Return({"pid": 1})
    fake.script["guest-exec-status"] = Return({"exited": True, "exitcode": 0, "out-data": "@@"})
    agent = GuestAgent(fake.path, "vm1")
    with pytest.raises(GuestAgentError, match="expected an integer"):
        await agent.guest_time_ns(timeout_s=_TIMEOUT_S)
    with pytest.raises(GuestAgentError, match="not base64"):
        await agent.exec(["x"], timeout_s=_TIMEOUT_S)


async def test_info_without_osinfo(fake: FakeQga) -> None:
    commands = [
        {"name": "guest-ping", "enabled": True, "success-response": True},
        {"name": "guest-exec", "enabled": False, "success-response": True},
    ]
    fake.script["guest-info"] = Return({"version": "2.5.0", "supported_commands": commands})
    info = await GuestAgent(fake.path, "vm1").info(timeout_s=_TIMEOUT_S)
    assert (info.agent_version, info.os_pretty_name, info.kernel_release) == ("2.5.0", None, None)
    assert info.enabled_commands == frozenset({"guest-ping"})
    assert [name for name, _ in fake.requests] == ["guest-info"]


async def test_one_connection_at_a_time_per_agent(fake: FakeQga) -> None:
    agent = GuestAgent(fake.path, "vm1")
    answers = await asyncio.gather(*(agent.ping(timeout_s=_TIMEOUT_S) for _ in range(4)))
    assert answers == [True] * 4
    assert (fake.connections, fake.max_clients) == (4, 1)


async def test_a_silent_command_times_out_and_names_it(fake: FakeQga) -> None:
    fake.script["guest-ping"] = [Silence(), Return({})]
    agent = GuestAgent(fake.path, "vm1")
    assert await agent.ping(timeout_s=0.3) is False
    assert await agent.ping(timeout_s=_TIMEOUT_S) is True


async def test_missing_or_dead_socket_is_an_error_not_a_silent_guest() -> None:
    workdir = _short_dir("vmf-fqga-")
    try:
        with pytest.raises(GuestAgentError, match="no guest agent socket"):
            await GuestAgent(workdir / "absent.sock", "vm1").ping(timeout_s=_TIMEOUT_S)
        dead = workdir / "dead.sock"
        with socket.socket(socket.AF_UNIX) as bound:  # bound, never listening: as a dead QEMU's
            bound.bind(str(dead))
            with pytest.raises(GuestAgentError, match="refused") as err:
                await GuestAgent(dead, "vm1").ping(timeout_s=0.3)
        assert not isinstance(err.value, GuestAgentTimeout)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
