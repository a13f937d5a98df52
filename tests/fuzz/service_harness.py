"""A ``vmferry serve`` for fuzzing, on a real TCP port in a thread of its own: its lab has two
real host agents (in-process, QEMU found on the host, boot files that do not exist: no guest can
ever start) and no VM, so every request that looks valid names an unknown VM or moves nothing,
and nothing outlives the temporary directory the harness removes.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import TestServer

from vmferry.agent.host import AgentConfig, HostAgent
from vmferry.agent.server import build_app as build_agent_app
from vmferry.controller.history import History
from vmferry.controller.inventory import HostEntry, Inventory
from vmferry.controller.jobs import JobStore
from vmferry.core.model import MigrationReport
from vmferry.qemu.argv import BootFiles
from vmferry.qemu.binary import find_qemu
from vmferry.service.api import JobState
from vmferry.service.app import ServiceState, build_app
from vmferry.service.auth import Principal, Role, TokenBook
from vmferry.service.events import EventBus
from vmferry.service.metrics import ServiceMetrics
from vmferry.service.store import SqliteStore
from vmferry.service.supervisor import Supervisor

__all__ = ["HOSTS", "OPERATOR", "VIEWER", "FuzzService", "fuzz_service"]

VIEWER, OPERATOR = "viewer-" + "v" * 32, "operator-" + "o" * 32
HOSTS = ("host-1", "host-2")
_AGENT_TOKEN = "agent-" + "a" * 32
_START_S = 30.0


@dataclass
class FuzzService:
    """The running service: its URL, its lab and state (read them from the test's thread only
    between requests)."""

    url: str
    lab_dir: Path
    state: ServiceState
    loop: asyncio.AbstractEventLoop
    agents: tuple[HostAgent, ...]

    def vm_names(self) -> list[str]:
        """Every VM the agents have (there is none, and none may appear)."""
        return sorted(vm.name for agent in self.agents for vm in agent.list_vms())

    def snapshot(self) -> object:
        """What a request could change: jobs, the controller's jobs and marks, the history,
        the VMs, the agents' files (taken once the jobs earlier requests started have ended)."""
        deadline = time.monotonic() + _START_S
        while any(j.state is JobState.RUNNING for j in self.state.store.jobs(limit=10_000)):
            assert time.monotonic() < deadline, "a fuzzed job did not end"
            time.sleep(0.05)
        jobs = self.state.store.job_store()
        return (
            [j.to_json() for j in self.state.store.jobs(limit=10_000)],
            [j.to_json(detail=True) for j in jobs.jobs()],
            {h: m.to_json() for h, m in jobs.marks().items()},
            [e.to_json() for e in self.state.store.history().entries(None, 100_000)],
            self.vm_names(),
            sorted(
                str(Path(root, f).relative_to(self.lab_dir))
                for root, dirs, files in os.walk(self.lab_dir / "agents")
                for f in dirs + files
            ),
        )


async def _agents(
    tmp: Path, stack: AsyncExitStack
) -> tuple[tuple[HostEntry, ...], tuple[HostAgent, ...]]:
    qemu = await find_qemu()
    boot = BootFiles(tmp / "no-kernel", tmp / "no-initrd")  # a start would fail, not boot
    entries, agents = [], []
    for name in HOSTS:
        state_dir = tmp / "lab" / "agents" / name
        (state_dir / "vms").mkdir(parents=True)
        agent = HostAgent(AgentConfig(name, state_dir, 1 << 30, "127.0.0.1"), qemu, boot, "tcg")
        stack.push_async_callback(agent.close)
        agents.append(agent)
        server = TestServer(build_agent_app(agent, _AGENT_TOKEN), host="127.0.0.1")
        await server.start_server()
        stack.push_async_callback(server.close)
        url = str(server.make_url("")).rstrip("/")
        entries.append(HostEntry(name, url, None, str(state_dir), "127.0.0.1"))
    return tuple(entries), tuple(agents)


def _seed(lab_dir: Path) -> None:
    """A move and a controller job of the past (a VM long gone moved off host-1), so that the
    routes that show the history and jobs have one to show."""
    report = MigrationReport(
        vm="gone-1", source="host-1", destination="host-2", running_on="host-2",
        strategy="precopy", status="completed", error=None, total_ms=1200, downtime_ms=40,
        guest_downtime_ms=55, transferred_bytes=1 << 27, iterations=3, predicted=None,
        integrity=None, guest_alive=True,
    )  # fmt: skip
    History(lab_dir / "history.db", "local:fuzz").record(report)
    store = JobStore(lab_dir / "history.db")
    job = store.begin("evacuate", "host-1", [("gone-1", "host-1", "host-2")], {})
    store.move_state(job, "gone-1", "completed", {"note": "seeded"})
    store.end(job, "completed", {"schema": 1, "job": job, "moves": []})


async def _serve(
    tmp: Path, ready: threading.Event, box: list[FuzzService], stop: asyncio.Event
) -> None:
    async with AsyncExitStack() as stack:
        lab_dir = tmp / "lab"
        entries, agents = await _agents(tmp, stack)
        Inventory(lab_dir, _AGENT_TOKEN, entries).save()
        _seed(lab_dir)
        tokens = TokenBook(
            {VIEWER: Principal("viewer", Role.VIEWER),
             OPERATOR: Principal("operator", Role.OPERATOR)}
        )  # fmt: skip
        store, bus, metrics = SqliteStore(lab_dir / "history.db"), EventBus(), ServiceMetrics()
        async with asyncio.TaskGroup() as group:
            supervisor = Supervisor(store, bus, metrics, group)
            state = ServiceState(tokens, store, bus, metrics, supervisor, lab_dir, keepalive_s=0.2)
            runner = web.AppRunner(build_app(state), shutdown_timeout=1.0)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = runner.addresses[0][1]
            state.url = f"http://127.0.0.1:{port}"
            box.append(FuzzService(state.url, lab_dir, state, asyncio.get_running_loop(), agents))
            ready.set()
            await stop.wait()
            state.closing.set()
            bus.wake_all()
            await runner.cleanup()
            await supervisor.shutdown(1.0)


@contextmanager
def fuzz_service() -> Iterator[FuzzService]:
    """A service as the module docstring says, stopped and removed on exit."""
    with tempfile.TemporaryDirectory(prefix="vmf-apifuzz-") as tmp:
        loop = asyncio.new_event_loop()
        stop = asyncio.Event()
        ready = threading.Event()
        box: list[FuzzService] = []
        failed: list[BaseException] = []

        def run() -> None:
            try:
                loop.run_until_complete(_serve(Path(tmp), ready, box, stop))
            except BaseException as err:
                failed.append(err)
                ready.set()
            finally:
                loop.close()

        thread = threading.Thread(target=run, name="apifuzz-serve", daemon=True)
        thread.start()
        ready.wait(_START_S)
        if failed or not box:
            raise RuntimeError(f"the fuzzed service did not start: {failed}")
        try:
            yield box[0]
        finally:
            loop.call_soon_threadsafe(stop.set)
            thread.join(_START_S)
