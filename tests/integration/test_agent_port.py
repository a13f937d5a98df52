"""One vocabulary, two transports: the same HostAgent asked over HTTP (``AgentClient`` against
the agent's aiohttp app) and in-process (``InProcessAgent``) answers alike and fails with the
same error classes. No guest is booted (the QEMU binary is only probed)."""

from __future__ import annotations

import asyncio
import dataclasses
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestServer

from vmferry.agent.client import AgentClient, AgentUnreachable
from vmferry.agent.host import AgentConfig, HostAgent
from vmferry.agent.inproc import InProcessAgent
from vmferry.agent.port import AgentPort
from vmferry.agent.server import build_app
from vmferry.agent.slots import Slot, VmState
from vmferry.core.errors import FerryError
from vmferry.core.model import MigrationOptions, VmSpec
from vmferry.core.workload import parse_workload
from vmferry.qemu.argv import BootFiles
from vmferry.qemu.binary import find_qemu

pytestmark = pytest.mark.asyncio

TOKEN = "port-token-0123456789abcdef"


@dataclass
class Both:
    http: AgentClient
    inproc: InProcessAgent


@pytest_asyncio.fixture
async def both() -> AsyncIterator[Both]:
    with tempfile.TemporaryDirectory(prefix="vmf-port-") as tmp:
        qemu = await find_qemu()
        # Boot files that do not exist: nothing here may get as far as starting a guest.
        boot = BootFiles(Path(tmp) / "no-kernel", Path(tmp) / "no-initrd")
        config = AgentConfig("host-1", Path(tmp) / "state", 4 << 30, "127.0.0.1")
        agent = HostAgent(config, qemu, boot, "tcg")  # never started: no background work
        server = TestServer(build_app(agent, TOKEN))
        await server.start_server()
        try:
            url = str(server.make_url("")).rstrip("/")
            async with AgentClient("host-1", url, TOKEN) as client:
                yield Both(client, InProcessAgent("host-1", agent))
        finally:
            await server.close()
            await agent.close()


async def test_queries_answer_alike(both: Both) -> None:
    assert await both.inproc.host_info() == await both.http.host_info()
    assert await both.inproc.list_vms() == await both.http.list_vms() == []


SPEC = VmSpec.build("ghost", memory="256M", workload=parse_workload("idle"))
# A machine type this QEMU cannot build: an incoming VM is refused before anything starts.
ODD_SPEC = dataclasses.replace(SPEC, machine_type="no-such-machine")
FAILING: dict[str, Callable[[AgentPort], Awaitable[object]]] = {
    "get_vm": lambda a: a.get_vm("ghost"),
    "qemu_state": lambda a: a.qemu_state("ghost"),
    "delete_vm": lambda a: a.delete_vm("ghost"),
    "verify": lambda a: a.verify("ghost"),
    "measure": lambda a: a.measure("ghost"),
    "profile": lambda a: a.profile("ghost", "127.0.0.1"),
    "finish_incoming": lambda a: a.finish_incoming("ghost"),
    "abort_incoming": lambda a: a.abort_incoming("ghost"),
    "release_disk": lambda a: a.release_disk("ghost"),
    "start_migration": lambda a: a.start_migration("ghost", "tcp:127.0.0.1:1", MigrationOptions()),
    "migration_progress": lambda a: a.migration_progress("ghost", 0, 0.0),
    "start_postcopy": lambda a: a.start_postcopy("ghost"),
    "set_migration_cap": lambda a: a.set_migration_cap("ghost", 1_000_000),
    "cancel_migration": lambda a: a.cancel_migration("ghost"),
    "continue_switchover": lambda a: a.continue_switchover("ghost"),
    "handoff": lambda a: a.handoff("ghost"),
    "forget": lambda a: a.forget("ghost"),
    "resume_source": lambda a: a.resume_source("ghost"),
    "pause_postcopy": lambda a: a.pause_postcopy("ghost", 1),
    "recover_postcopy": lambda a: a.recover_postcopy("ghost", 1),
    "resume_postcopy": lambda a: a.resume_postcopy("ghost", "tcp:127.0.0.1:1", 1),
    "sink_result": lambda a: a.sink_result(1, 0.0),
    "prepare_incoming": lambda a: a.prepare_incoming(ODD_SPEC, MigrationOptions()),
    "create_vm": lambda a: a.create_vm(ODD_SPEC),
}


async def test_profiles_answer_alike(both: Both) -> None:
    """A probe's figure recorded through either transport is what both then report, with its
    age; a VM that was never measured has no guest profile."""
    await both.http.record_bandwidth("10.0.0.2", 25e6)
    await both.inproc.record_bandwidth("10.0.0.3", 50e6)
    agent = both.inproc.host_agent
    agent.slots.add(Slot(SPEC, VmState.STOPPED, None))
    for port in (both.http, both.inproc):
        two, three = (
            await port.profile("ghost", "10.0.0.2"),
            await port.profile("ghost", "10.0.0.3"),
        )
        assert two.guest is None
        assert two.guest_age_s is None
        assert two.path is not None
        assert two.path.bandwidth_bps == 25e6
        assert three.path is not None
        assert three.path.bandwidth_bps == 50e6
        assert three.path.source == "probe"
        assert 0 <= three.path.age_s < 5
        assert (await port.profile("ghost", "10.0.0.9")).path is None
        assert (await port.profile("ghost")).path is None
    with pytest.raises(FerryError, match="bandwidth_bps"):
        await both.http._call("POST", "/paths/bandwidth", {"address": "x", "bandwidth_bps": -1})


@pytest.mark.parametrize("call", sorted(FAILING))
async def test_failures_raise_the_same_error_class(both: Both, call: str) -> None:
    errors: list[BaseException] = []
    for agent in (both.http, both.inproc):
        with pytest.raises(FerryError) as caught:
            await FAILING[call](agent)
        errors.append(caught.value)
    http, inproc = errors
    assert type(inproc) is type(http), (http, inproc)
    assert str(inproc) == str(http) or type(http).__name__ == "AgentError"


async def test_a_late_answer_is_an_unreachable_agent(both: Both) -> None:
    with pytest.raises(AgentUnreachable, match="no answer within"):
        await both.inproc._call("sleep", asyncio.sleep(1.0), 0.01)
