"""The multi-host lab: real agents up, asked, and torn down — also after a crash.

Every test runs in its own short lab directory (``$VMFERRY_LAB_DIR``), and its fixture always
calls ``lab_down`` and then checks that no agent or QEMU of that lab lives on and no lab
namespace is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from vmferry.agent.client import AgentClient
from vmferry.controller.inventory import Inventory
from vmferry.core.errors import ConfigError
from vmferry.core.model import VmSpec
from vmferry.core.workload import parse_workload
from vmferry.lab import netns
from vmferry.lab.cluster import lab_down, lab_status, lab_up

# Namespaces are machine-wide (vmf-host-N) and the fixture checks that none appear that it did
# not make: one xdist worker runs every test that makes them, one after the other.
pytestmark = pytest.mark.xdist_group("netns")

GIB = 1024**3
is_root = os.geteuid() == 0
needs_root = pytest.mark.skipif(not is_root, reason="network namespaces need root")


def _require_free_netns() -> None:
    """Namespace names are machine-wide: a second netns lab cannot run beside a live one."""
    if netns.existing_namespaces():
        pytest.skip(f"another netns lab is running here ({netns.existing_namespaces()})")


def _alive(pid: int) -> bool:
    """True if the process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def _wait_gone(pid: int, timeout_s: float = 5.0) -> None:
    """Wait for the process to exit (its pidfd turns readable)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    exited = asyncio.Event()
    loop.add_reader(pidfd, exited.set)
    try:
        async with asyncio.timeout(timeout_s):
            await exited.wait()
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)


def _lab_pids(lab_dir: Path) -> set[int]:
    """Every agent and QEMU PID the lab's files mention."""
    pids: set[int] = set()
    for host in (lab_dir / "hosts").glob("*"):
        for name in ("agent.pid", *(str(p.relative_to(host)) for p in host.glob("vms/*/qemu.pid"))):
            with contextlib.suppress(OSError, ValueError):
                pids.add(int((host / name).read_text()))
        with contextlib.suppress(OSError, ValueError):
            pids.add(int(json.loads((host / "ready.json").read_text())["pid"]))
    return pids


@pytest_asyncio.fixture
async def lab_dir(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Path]:
    """A short, private lab directory; the lab in it is always taken down afterwards."""
    directory = Path(tempfile.mkdtemp(prefix="vmf-"))
    monkeypatch.setenv("VMFERRY_LAB_DIR", str(directory))
    foreign = set(netns.existing_namespaces())  # another lab's, e.g. a developer's
    try:
        yield directory
    finally:
        pids = _lab_pids(directory)
        try:
            await lab_down(directory)
            survivors = {pid for pid in pids if _alive(pid)}
            assert not survivors, f"lab processes survived lab down: {survivors}"
            assert not set(netns.existing_namespaces()) - foreign
            assert not (directory / "lab.json").exists()
        finally:
            shutil.rmtree(directory, ignore_errors=True)


async def _run(*argv: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    async with asyncio.timeout(20):
        out, _ = await proc.communicate()
    assert proc.returncode == 0, f"{argv}: {out.decode()}"
    return out.decode()


# ------------------------------------------------------------------------ without agents


@pytest.mark.asyncio
async def test_link_mbps_needs_netns(lab_dir: Path) -> None:
    with pytest.raises(ConfigError, match="add --netns"):
        await lab_up(2, link_mbps=100)
    assert not (lab_dir / "hosts").exists()


@pytest.mark.asyncio
async def test_down_without_a_lab_has_nothing_to_do(lab_dir: Path) -> None:
    first = await lab_down(lab_dir / "never-was")
    assert first.nothing_to_do
    with pytest.raises(ConfigError, match="lab up"):
        await lab_status(lab_dir / "never-was")


# --------------------------------------------------------------------------- real agents


@pytest.mark.qemu
@pytest.mark.usefixtures("guest_image")
@pytest.mark.asyncio
async def test_loopback_lab_up_status_down(lab_dir: Path) -> None:
    inventory = await lab_up(2, memory_per_host_bytes=GIB)
    assert [h.name for h in inventory.hosts] == ["host-1", "host-2"]
    assert all(h.url.startswith("https://127.0.0.1:") and h.netns is None for h in inventory.hosts)
    assert Inventory.load() == inventory
    assert (lab_dir / "token").stat().st_mode & 0o077 == 0
    assert inventory.ca_file == lab_dir / "tls" / "ca.pem"
    for key in ("ca.key", "host-1.key", "host-2.key"):
        assert (lab_dir / "tls" / key).stat().st_mode & 0o777 == 0o600

    with pytest.raises(ConfigError, match="lab down"):
        await lab_up(1)

    statuses = await lab_status()
    assert [s.name for s in statuses] == ["host-1", "host-2"]
    for status in statuses:
        assert status.reachable, status.error
        assert status.pid_alive
        assert status.info is not None
        assert status.info["host"] == status.name

    pids = {h.pid for h in inventory.hosts}
    report = await lab_down()
    assert report.agents_stopped == 2
    assert report.namespaces_removed == 0
    assert not any(_alive(pid) for pid in pids if pid)
    assert not lab_dir.exists()
    assert (await lab_down()).nothing_to_do


@pytest.mark.qemu
@pytest.mark.usefixtures("guest_image")
@needs_root
@pytest.mark.asyncio
async def test_netns_lab_with_shaped_links(lab_dir: Path) -> None:
    _require_free_netns()
    inventory = await lab_up(2, netns=True, link_mbps=200, memory_per_host_bytes=GIB)
    assert [h.netns for h in inventory.hosts] == ["vmf-host-1", "vmf-host-2"]
    assert inventory.link_mbps == 200
    host1, host2 = inventory.hosts
    assert host1.address != host2.address
    assert host1.url.startswith(f"https://{host1.address}:")

    for i in (1, 2):
        into = await _run("tc", "qdisc", "show", "dev", f"vmf-h{i}")
        out_of = await _run("tc", "-n", f"vmf-host-{i}", "qdisc", "show", "dev", "eth0")
        for shown in (into, out_of):
            assert "qdisc tbf" in shown, shown
            assert "rate 200Mbit" in shown, shown

    statuses = await lab_status()
    assert all(s.reachable and s.pid_alive for s in statuses), statuses
    assert [s.info and s.info["host"] for s in statuses] == ["host-1", "host-2"]

    # Host to host across the bridge: host-1's namespace reaches host-2's agent.
    port = int(host2.url.rsplit(":", 1)[1])
    probe = f"import socket; socket.create_connection(({host2.address!r}, {port}), 5)"
    await _run("ip", "netns", "exec", "vmf-host-1", sys.executable, "-c", probe)

    report = await lab_down()
    assert report.agents_stopped == 2
    assert report.namespaces_removed == 2
    links = await _run("ip", "-br", "link", "show")
    assert "vmf-" not in links
    assert not netns.existing_namespaces()


@pytest.mark.qemu
@pytest.mark.usefixtures("guest_image")
@pytest.mark.parametrize("use_netns", [False, pytest.param(True, marks=needs_root)])
@pytest.mark.asyncio
async def test_down_after_a_crash(lab_dir: Path, use_netns: bool) -> None:
    if use_netns:
        _require_free_netns()
    inventory = await lab_up(2, netns=use_netns, memory_per_host_bytes=GIB)
    host1, host2 = inventory.hosts
    # A real VM, which keeps running when its agent dies.
    async with AgentClient(host1.name, host1.url, inventory.token, inventory.ca_file) as agent:
        vm = await agent.create_vm(
            VmSpec.build("vm1", memory="128M", workload=parse_workload("idle:size=8M"))
        )
    qemu_pid = int((Path(host1.state_dir) / "vms" / "vm1" / "qemu.pid").read_text())
    assert vm.pid == qemu_pid
    # A stale qemu.pid pointing at something that is not QEMU: it must be left alone.
    bystander = await asyncio.create_subprocess_exec("sleep", "60")
    try:
        vm_dir = Path(host2.state_dir) / "vms" / "stale"
        vm_dir.mkdir(parents=True)
        (vm_dir / "qemu.pid").write_text(f"{bystander.pid}\n")
        for host in inventory.hosts:
            assert host.pid is not None
            os.kill(host.pid, signal.SIGKILL)
        for host in inventory.hosts:
            assert host.pid is not None
            await _wait_gone(host.pid)
        assert _alive(qemu_pid), "the VM should outlive its agent"
        # The worst case: the inventory is gone too; only the per-host files remain.
        (lab_dir / "lab.json").unlink()

        report = await lab_down()
        assert report.agents_stopped == 0  # already dead
        assert report.qemus_stopped == 1
        assert report.namespaces_removed == (2 if use_netns else 0)
        assert not _alive(qemu_pid)
        if use_netns:
            assert not netns.existing_namespaces()
        assert _alive(bystander.pid), "lab down killed a process that is not QEMU"
        assert not lab_dir.exists()
        assert (await lab_down()).nothing_to_do
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(qemu_pid, signal.SIGKILL)  # only reached if lab down failed to
        bystander.kill()
        await bystander.wait()
