"""``vmferry serve`` against a real lab of 2 hosts, the CLI as its client: a viewer lists hosts
and VMs (the same JSON as in-process) and is refused a migration; an operator migrates a small
VM, watched on the event stream to the end; the history says who asked; /metrics counts it.
Then the other client commands on the same lab: ``vm show``, ``vm create`` (the lab guest),
``verify``, ``plan``, ``host maintenance enter|exit`` (a real move), ``job list|show|resume``,
``vm delete``, with
the output and exit statuses of the in-process commands.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from pathlib import Path
from typing import Any

import pytest
from labcli import Lab
from servekit import serving

from vmferry.controller.inventory import Inventory
from vmferry.service.client import ServiceClient
from vmferry.service.events import Event

pytestmark = pytest.mark.qemu

SMALL = "dirty:rate=2M,size=32M,pattern=random,mode=paced"


class _Watcher(threading.Thread):
    """Reads the whole event stream (its own event loop) until a migrate job ends."""

    def __init__(self, url: str, token: str, ca: Path | None) -> None:
        super().__init__(daemon=True)
        self.url, self.token, self.ca = url, token, ca
        self.events: list[Event] = []
        self.subscribed = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            asyncio.run(asyncio.wait_for(self._watch(), 120))
        except BaseException as err:
            self.error = err
            self.subscribed.set()

    async def _watch(self) -> None:
        async with (
            ServiceClient(self.url, self.token, self.ca) as client,
            contextlib.aclosing(client.events()) as events,
        ):
            async for event in events:
                self.events.append(event)
                if event.kind == "hello":
                    self.subscribed.set()
                if event.kind == "job" and event.data["state"] not in ("running",):
                    return


def test_serve_with_the_cli_as_its_client(
    lab_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lab = Lab(lab_dir)
    lab.ok("lab", "up", "--hosts", "2", "--memory-per-host", "512M")
    lab.ok("vm", "create", "small", "--host", "host-1", "--memory", "128M", "--workload", SMALL)
    in_process = {cmd: _steady(lab.ok(*cmd.split())) for cmd in ("host list", "vm list")}
    with serving(lab_dir, tmp_path) as ready:
        _use(serve_url=ready["url"], tokens=ready["tokens"], lab=lab, lab_dir=lab_dir,
             in_process=in_process, monkeypatch=monkeypatch)  # fmt: skip


def _steady(listing: Any) -> Any:
    """A listing without what changes by itself (the free disk space of this machine)."""
    rows = listing if isinstance(listing, list) else listing["vms"]
    for row in rows:
        row.pop("disk_free_bytes", None)
    return listing


def _use(  # the service's part of the test
    serve_url: str,
    tokens: dict[str, str],
    lab: Lab,
    lab_dir: Path,
    in_process: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = serve_url
    assert url.startswith("https://")
    operator, viewer = (Path(tokens[r]).read_text().strip() for r in ("operator", "viewer"))
    ca = Inventory.load(lab_dir).ca_file
    monkeypatch.setenv("VMFERRY_URL", url)

    # A viewer: the same listings as in-process; a migration refused (exit 2), nothing moved.
    monkeypatch.setenv("VMFERRY_TOKEN", viewer)
    for cmd, expected in in_process.items():
        assert _steady(lab.ok(*cmd.split())) == expected, cmd
    refused = lab.run("migrate", "small", "--to", "host-2", "--no-plan", "--strategy", "precopy")
    assert refused.returncode == 2, refused.stderr
    assert "may not do this" in refused.stderr
    assert "403" in refused.stderr

    # An operator migrates through the service while a viewer watches the event stream.
    watcher = _Watcher(url, viewer, ca)
    watcher.start()
    assert watcher.subscribed.wait(30)
    assert watcher.error is None, watcher.error
    monkeypatch.setenv("VMFERRY_TOKEN", operator)
    moved = lab.run("migrate", "small", "--to", "host-2", "--no-plan", "--strategy",
                    "precopy", "--json")  # fmt: skip
    assert moved.returncode == 0, moved.stderr
    report = json.loads(moved.stdout)
    assert (report["status"], report["running_on"]) == ("completed", "host-2")
    assert report["integrity"]["ok"] is True
    watcher.join(60)
    assert watcher.error is None, watcher.error
    progress = [e.data for e in watcher.events if e.kind == "progress"]
    assert progress
    assert all(p["vm"] == "small" for p in progress)
    phases = [p["phase"] for p in progress]
    assert "active" in phases, phases
    assert phases[-1] == "done", phases
    sampled = [p["stats"] for p in progress if p["stats"] is not None]
    assert sampled
    assert sampled[-1]["transferred_bytes"] > 0
    ended = [e.data for e in watcher.events if e.kind == "job"][-1]
    assert (ended["state"], ended["kind"]) == ("completed", "migrate")
    assert ended["has_result"] is True
    assert ended["asked_by"] == {"name": "operator", "role": "operator"}

    # The history says who asked, in client mode (as a viewer) and in-process alike.
    monkeypatch.setenv("VMFERRY_TOKEN", viewer)
    [entry] = lab.ok("history")
    assert (entry["vm"], entry["asked_by"]) == ("small", "api:operator")
    monkeypatch.setenv("COLUMNS", "200")  # xdist's workers have COLUMNS=80: a wide terminal
    table = lab.run("history")
    assert "api:operator" in table.stdout, table.stdout
    monkeypatch.delenv("VMFERRY_URL")
    assert [e["asked_by"] for e in lab.ok("history")] == ["api:operator"]

    text = asyncio.run(_scrape(url, viewer, ca))
    assert 'vmferry_migrations_total{result="completed",strategy="precopy"} 1.0' in text
    assert 'vmferry_migration_duration_seconds_count{strategy="precopy"} 1.0' in text
    assert 'vmferry_host_memory_capacity_bytes{host="host-2"} 5.36870912e+08' in text
    assert 'vmferry_jobs{kind="migrate",state="completed"} 1.0' in text

    monkeypatch.setenv("VMFERRY_URL", url)
    lab.refused("verify", "small", message="may not do this (needs operator)")
    monkeypatch.setenv("VMFERRY_TOKEN", operator)
    _more_commands(lab, monkeypatch, url)


def _both(lab: Lab, monkeypatch: pytest.MonkeyPatch, url: str, *cmd: str) -> tuple[Any, Any]:
    """``cmd --json`` through the service, then in-process: both outputs."""
    monkeypatch.setenv("VMFERRY_URL", url)
    remote = lab.ok(*cmd)
    monkeypatch.delenv("VMFERRY_URL")
    return remote, lab.ok(*cmd)


def _more_commands(lab: Lab, monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """vm show, verify, plan, maintenance enter/exit, job list/show/resume through the
    service: the output and exit status of the in-process commands (the VM is on host-2)."""
    remote, local = _both(lab, monkeypatch, url, "vm", "show", "small")
    assert remote == local
    assert remote["host"] == "host-2"
    remote, local = _both(lab, monkeypatch, url, "vm", "create", "tiny", "--memory", "192M",
                          "--dry-run")  # fmt: skip
    assert remote == local
    assert (remote["dry_run"], remote["vm"]) == (True, "tiny")
    monkeypatch.setenv("VMFERRY_URL", url)
    created = lab.ok("vm", "create", "tiny", "--host", "host-1", "--memory", "192M")
    assert (created["name"], created["host"], created["state"]) == ("tiny", "host-1", "running")
    lab.refused("vm", "create", "tiny", "--host", "host-1", message="already exists on host-1")
    lab.refused("vm", "create", "own", "--image", "/nonexistent.qcow2", message="in-process")
    monkeypatch.setenv("VMFERRY_URL", url)
    checked = lab.ok("verify", "small")
    assert (checked["vm"], checked["host"], checked["ok"]) == ("small", "host-2", True)
    made = lab.ok("plan", "small", "--to", "host-1")
    assert (made["vm"], made["source"], made["destination"]) == ("small", "host-2", "host-1")
    assert made["recommended"] in [p["strategy"] for p in made["predictions"]]
    table = lab.run("plan", "small", "--to", "host-1")
    assert table.returncode == 0, table.stderr
    assert "recommended:" in table.stderr
    lab.refused("plan", "small", "--to", "host-2", message="already runs on host-2")

    # Maintenance through the service: host-2 emptied (a real move), then back in use.
    entered = lab.ok("host", "maintenance", "enter", "host-2")
    assert (entered["host_state"], entered["left_on_host"]) == ("maintenance", [])
    [move] = entered["moves"]
    assert (move["vm"], move["destination"], move["ok"]) == ("small", "host-1", True)
    hosts = {h["host"]: h["state"] for h in lab.ok("host", "list")}
    assert hosts == {"host-1": "active", "host-2": "maintenance"}
    remote, local = _both(lab, monkeypatch, url, "job", "list")
    assert remote == local
    assert [(j["job"], j["kind"], j["state"]) for j in remote] == [
        (entered["job"], "maintenance-enter", "completed")
    ]
    remote, local = _both(lab, monkeypatch, url, "job", "show", str(entered["job"]))
    assert remote == local
    for where in (url, None):  # a job that ended is not resumed: exit 2 both ways
        if where is not None:
            monkeypatch.setenv("VMFERRY_URL", where)
        lab.refused(
            "job", "resume", str(entered["job"]), message="only an interrupted job is resumed"
        )
        monkeypatch.delenv("VMFERRY_URL", raising=False)
    monkeypatch.setenv("VMFERRY_URL", url)
    exited = lab.ok("host", "maintenance", "exit", "host-2")
    assert (exited["host_state"], exited["moved_off"]) == ("active", ["small"])
    lab.refused("host", "maintenance", "exit", "host-2", message="not in maintenance")
    assert lab.ok("vm", "delete", "small") == {"deleted": "small", "host": "host-1"}
    assert lab.ok("vm", "delete", "tiny") == {"deleted": "tiny", "host": "host-1"}
    lab.refused("vm", "show", "small", message="404")
    monkeypatch.delenv("VMFERRY_URL")
    assert {h["host"]: h["state"] for h in lab.ok("host", "list")}["host-2"] == "active"
    assert lab.ok("vm", "list")["vms"] == []


async def _scrape(url: str, token: str, ca: Path | None) -> str:
    async with ServiceClient(url, token, ca) as client:
        return await client.get_text("/metrics")
