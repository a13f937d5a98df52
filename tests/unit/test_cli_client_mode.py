"""The CLI in client mode against a real service (its own thread and event loop) on a lab with
no hosts: listings, the history, a migration refused by the service (exit 2 with the reason),
a viewer refused, a wrong token, an unreachable service (exit 1)."""

from __future__ import annotations

import asyncio
import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from vmferry.cli.main import main
from vmferry.controller.inventory import Inventory
from vmferry.service.app import ServiceState, build_app
from vmferry.service.auth import Principal, Role, TokenBook
from vmferry.service.events import EventBus
from vmferry.service.metrics import ServiceMetrics
from vmferry.service.store import SqliteStore
from vmferry.service.supervisor import Supervisor

VIEWER, OPERATOR = "v" * 32, "o" * 32


class _Service(threading.Thread):
    def __init__(self, lab: Path) -> None:
        super().__init__(daemon=True)
        self.lab, self.url = lab, ""
        self.ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)

    def run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        tokens = TokenBook({VIEWER: Principal("viewer", Role.VIEWER),
                            OPERATOR: Principal("operator", Role.OPERATOR)})  # fmt: skip
        store, bus, metrics = SqliteStore(self.lab / "history.db"), EventBus(), ServiceMetrics()
        async with asyncio.TaskGroup() as group:
            supervisor = Supervisor(store, bus, metrics, group)
            state = ServiceState(tokens, store, bus, metrics, supervisor, self.lab, keepalive_s=0.2)
            runner = web.AppRunner(build_app(state), access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self.url = f"http://127.0.0.1:{port}"
            self._loop, self._stopping = asyncio.get_running_loop(), asyncio.Event()
            self.ready.set()
            await self._stopping.wait()
            state.closing.set()
            bus.wake_all()
            await runner.cleanup()


@pytest.fixture
def service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    Inventory(tmp_path, "t" * 32, ()).save()
    monkeypatch.setenv("VMFERRY_LAB_DIR", str(tmp_path))
    thread = _Service(tmp_path)
    thread.start()
    assert thread.ready.wait(10)
    monkeypatch.setenv("VMFERRY_URL", thread.url)
    try:
        yield thread.url
    finally:
        thread.stop()
        thread.join(10)


def _run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), " ".join(err.getvalue().split())


def test_listings_and_history_through_the_service(
    service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VMFERRY_TOKEN", VIEWER)
    code, out, _ = _run("vm", "list", "--json")
    assert (code, json.loads(out)) == (0, {"vms": [], "unreachable": []})
    code, out, _ = _run("history", "--json")
    assert (code, json.loads(out)) == (0, [])
    monkeypatch.setenv("COLUMNS", "200")  # xdist's workers have COLUMNS=80: a wide terminal
    code, out, _ = _run("history")
    assert code == 0
    assert "asked by" in out
    code, _, err = _run("history", "--limit", "0")
    assert (code, err) == (2, "error: --limit must be 1..100000")


def test_refusals_keep_their_exit_status(service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMFERRY_TOKEN", VIEWER)
    code, _, err = _run("migrate", "a", "--to", "host-2")
    assert code == 2
    assert "may not do this (needs operator) (HTTP 403 forbidden)" in err
    monkeypatch.setenv("VMFERRY_TOKEN", OPERATOR)
    code, out, err = _run("migrate", "a", "--to", "host-2", "--strategy", "precopy", "--json")
    assert (code, out) == (2, "")
    assert "job 1 (migrate) started by the service" in err
    assert "error: unknown host 'host-2' (hosts: none)" in err
    code, _, err = _run("migrate", "a", "--to", "host-2", "--no-plan")
    assert code == 2
    assert "--no-plan needs an explicit --strategy" in err
    code, _, err = _run("host", "evacuate", "host-1", "--max-outbound", "0")
    assert code == 2
    assert "$.max_outbound: must be >= 1" in err
    code, out, _ = _run("reconcile", "--json")
    assert (code, json.loads(out)) == (0, [])
    monkeypatch.setenv("VMFERRY_TOKEN", "w" * 32)
    code, _, err = _run("vm", "list")
    assert code == 2
    assert "unknown bearer token" in err
    monkeypatch.delenv("VMFERRY_TOKEN")
    assert "set VMFERRY_TOKEN" in _run("vm", "list")[2]


def test_an_unreachable_service_is_a_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMFERRY_TOKEN", VIEWER)
    code, _, err = _run("--server", "http://127.0.0.1:9", "vm", "list")
    assert code == 1
    assert "error: http://127.0.0.1:9" in err
