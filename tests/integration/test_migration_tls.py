"""Migration-stream TLS (``vmferry migrate --tls``) and QEMU without root, on a loopback lab.

One guest with a disk on local storage moves host-1 -> host-2 with TLS (pre-copy), back
(post-copy) and over again (multifd). Between the first two: a plain-TCP NBD client is refused
by a TLS destination, and a destination whose credentials come from another CA fails the move
cleanly (the guest stays where it was, intact; nothing is left on the destination). When the
tests run as root, every QEMU runs as the unprivileged ``vmferry-qemu`` (scripts/setup-host.sh
creates it).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from labcli import Lab

from vmferry.agent.api import VmInfo
from vmferry.agent.client import AgentClient, options_to_json
from vmferry.agent.host import AgentConfig, HostAgent
from vmferry.agent.server import build_app
from vmferry.controller.cluster import spec_of
from vmferry.controller.inventory import Inventory
from vmferry.core.model import MigrationOptions, VmName, spec_to_json
from vmferry.lab import pki
from vmferry.qemu.argv import BootFiles
from vmferry.qemu.binary import find_qemu
from vmferry.qemu.process import process_uid

pytestmark = pytest.mark.qemu

WORKLOAD = "dirty:rate=8M,size=64M,pattern=random,mode=paced,disk-rate=1M"
AS_ROOT = os.geteuid() == 0


def _uid_of(vm: dict[str, object]) -> int | None:
    pid = vm["pid"]
    assert isinstance(pid, int)
    return process_uid(pid)


def _plain_nbd_client(host: str, port: int) -> subprocess.CompletedProcess[str]:
    """``qemu-img info`` on an NBD export, without TLS."""
    opts = f"driver=nbd,server.type=inet,server.host={host},server.port={port},export=disk0"
    return subprocess.run(
        ["qemu-img", "info", "--image-opts", opts],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


async def _probe_plain_peer(inventory: Inventory, vm: VmInfo) -> str:
    """Prepare a TLS destination on host-1 for a copy of ``vm``, try it with a plain NBD
    client, drop it again; return the client's error."""
    host = next(h for h in inventory.hosts if h.name == "host-1")
    spec = replace(spec_of(vm), name=VmName("probe"))
    async with AgentClient(host.name, host.url, inventory.token, inventory.ca_file) as agent:
        _, nbd = await agent.prepare_incoming(spec, MigrationOptions(tls=True))
        try:
            assert nbd is not None
            result = await asyncio.to_thread(_plain_nbd_client, nbd.host, nbd.port)
        finally:
            await agent.abort_incoming("probe")
    assert result.returncode != 0, result.stdout
    return result.stderr


def test_tls_migrations_with_a_local_disk_and_clean_failure(lab_dir: Path) -> None:
    lab = Lab(lab_dir)
    lab.ok("lab", "up", "--hosts", "2", "--memory-per-host", "2G")
    hosts = {h["name"]: h["info"] for h in lab.ok("lab", "status")}
    assert all(info["qemu_tls"] for info in hosts.values())
    lab.ok(
        "vm", "create", "sv", "--host", "host-1", "--memory", "256M", "--disk", "256M",
        "--workload", WORKLOAD,
    )  # fmt: skip
    shown = lab.ok("vm", "show", "sv")
    if AS_ROOT:
        # QEMU dropped root after start-up, and the guest and its migrations work so.
        assert all(info["qemu_user"] == "vmferry-qemu" for info in hosts.values())
        assert shown["qemu_uid"] not in (None, 0)
        assert _uid_of(shown) == shown["qemu_uid"]

    there = lab.ok("migrate", "sv", "--to", "host-2", "--strategy", "precopy", "--tls", "--no-plan")
    assert there["status"] == "completed", there["error"]
    assert there["tls"] is True  # as QEMU's query-migrate-parameters reported at the end
    assert there["integrity"]["ok"]
    assert there["integrity"]["blocks_checked"] > 0
    if AS_ROOT:
        assert _uid_of(lab.ok("vm", "show", "sv")) not in (None, 0)

    # A TLS destination does not talk to a plain-TCP client.
    inventory = Inventory.load(lab_dir)
    vm = VmInfo.from_json(lab.ok("vm", "show", "sv"))
    error = asyncio.run(_probe_plain_peer(inventory, vm))
    assert "TLS" in error, error

    # host-1's QEMU credentials from another CA: the source refuses its certificate; the
    # guest keeps running on host-2 and host-1 is left with nothing.
    tls_dir = lab_dir / "hosts" / "host-1" / "qemu-tls"
    good = Path(tempfile.mkdtemp(prefix="vmf-tls-"))
    try:
        shutil.copytree(tls_dir, good / "tls")
        other = pki.make_ca(good / "other-ca")
        pki.issue_qemu_creds(other, "host-1", "127.0.0.1", tls_dir)
        failed = lab.run(
            "migrate", "sv", "--to", "host-1", "--strategy", "postcopy", "--tls", "--no-plan"
        )
        assert failed.returncode == 1, failed.stderr
        assert [(v["name"], v["host"], v["state"]) for v in lab.vms()] == [
            ("sv", "host-2", "running")
        ]
        assert not list((lab_dir / "hosts" / "host-1" / "disks").glob("*.qcow2"))
        assert lab.ok("verify", "sv")["ok"]
        shutil.rmtree(tls_dir)
        shutil.copytree(good / "tls", tls_dir)
    finally:
        shutil.rmtree(good)

    back = lab.ok("migrate", "sv", "--to", "host-1", "--strategy", "postcopy", "--tls", "--no-plan")
    assert back["status"] == "completed", back["error"]
    assert back["tls"] is True
    assert back["running_on"] == "host-1"
    assert back["integrity"]["ok"]
    assert back["integrity"]["blocks_checked"] > 0
    # multifd channels over TLS too, with the disk mirror paused at the switchover (this
    # once ran the switchover hook twice and stranded the guest; see run_migration).
    again = lab.ok("migrate", "sv", "--to", "host-2", "--strategy", "multifd", "--tls", "--no-plan")
    assert again["status"] == "completed", again["error"]
    assert again["tls"] is True
    assert again["integrity"]["ok"]
    history = lab.ok("history")
    assert [e["tls"] for e in history[-4:]] == [True, True, True, True]


@pytest.fixture
def agent_without_qemu_tls() -> Iterator[
    tuple[asyncio.Runner, TestClient[aiohttp.web.Request, aiohttp.web.Application], Path]
]:
    with tempfile.TemporaryDirectory(prefix="vmf-notls-") as tmp, asyncio.Runner() as runner:
        state_dir = Path(tmp) / "state"
        qemu = runner.run(find_qemu())
        boot = BootFiles(Path(tmp) / "no-kernel", Path(tmp) / "no-initrd")
        agent = HostAgent(AgentConfig("plain", state_dir, 4 << 30, "127.0.0.1"), qemu, boot, "tcg")

        async def start() -> TestClient[aiohttp.web.Request, aiohttp.web.Application]:
            client = TestClient(TestServer(build_app(agent, "t" * 32)))
            await client.start_server()
            return client

        client = runner.run(start())
        try:
            yield runner, client, state_dir
        finally:
            runner.run(client.close())
            runner.run(agent.close())


def test_an_agent_without_qemu_credentials_refuses_tls_before_starting_anything(
    agent_without_qemu_tls: tuple[
        asyncio.Runner, TestClient[aiohttp.web.Request, aiohttp.web.Application], Path
    ],
) -> None:
    runner, client, state_dir = agent_without_qemu_tls
    spec = spec_to_json(
        spec_of(
            VmInfo("x", "plain", "running", 256 << 20, 1, "idle", None, "pc-q35-10.0", "qemu64")
        )
    )

    async def post() -> tuple[int, dict[str, object]]:
        response = await client.post(
            "/v1/incoming",
            json={"spec": spec, "options": options_to_json(MigrationOptions(tls=True))},
            headers={"Authorization": "Bearer " + "t" * 32},
        )
        return response.status, await response.json()

    status, body = runner.run(post())
    assert status == 400, body
    error = body["error"]
    assert isinstance(error, dict)
    assert "--qemu-tls-dir" in str(error["message"])
    assert not (state_dir / "vms").exists() or not list((state_dir / "vms").iterdir())
