"""Automatic post-copy recovery: a host's link is cut in the middle of a post-copy migration
and restored; the controller pauses, re-listens and resumes, and the guest arrives intact."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from labcli import Lab

from vmferry.agent.client import AgentClient
from vmferry.controller.inventory import Inventory
from vmferry.core.errors import FerryError
from vmferry.lab.cluster import lab_down
from vmferry.lab.netns import NETNS_PREFIX, existing_namespaces, set_link

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.xdist_group("netns"),  # namespaces are machine-wide: one netns lab at a time
]

# About 100 MiB of random pages to pull over a 200 Mbit/s link: post-copy lasts ~5 s, the faults
# land after its first 16 MiB.
WORKLOAD = "dirty:rate=8M,size=96M,pattern=random,mode=paced"
LINK_MBPS = "200"

T = TypeVar("T")


async def _wait_postcopy(
    inventory: Inventory, source: str, vm: str, sent_bytes: int, cli: asyncio.Future[Any]
) -> None:
    """Until ``vm``'s outgoing migration on ``source`` is in post-copy and sent ``sent_bytes``
    (fails at once if the ``cli`` command ended first)."""
    host = inventory.host(source)
    token = inventory.token_file.read_text().strip()
    async with AgentClient(source, host.url, token, inventory.ca_file) as agent:
        since = 0
        async with asyncio.timeout(90):
            while True:
                assert not cli.done(), "vmferry migrate ended before post-copy"
                try:
                    samples, since, result = await agent.migration_progress(vm, since, 0.5)
                except FerryError:  # not started yet
                    await asyncio.sleep(0.2)
                    continue
                assert result is None, f"migration ended before the cut: {result}"
                if any(
                    s.status == "postcopy-active" and s.transferred_bytes >= sent_bytes
                    for s in samples
                ):
                    return


async def _migrate_with_cut(
    lab: Lab,
    vm: str,
    source: str,
    destination: str,
    cut_s: float | None,
    limit_s: float = 60,
    cut_host: str | None = None,
) -> tuple[int, dict[str, Any], str, float]:
    """Run ``vmferry migrate`` (post-copy); cut ``cut_host``'s link (default: the
    destination's) for ``cut_s`` (None: until the command ended) once post-copy is under way.
    Returns the exit status, the report, the CLI's log and the time from the link's
    restoration to the end of the migration."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "vmferry.cli.main", "-v", "migrate", vm, "--to", destination,
        "--strategy", "postcopy", "--recovery-limit", str(limit_s), "--json", "--no-plan",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "VMFERRY_LAB_DIR": str(lab.directory)},
    )  # fmt: skip
    communicate = asyncio.ensure_future(process.communicate())
    try:
        try:
            await _wait_postcopy(Inventory.load(lab.directory), source, vm, 16 << 20, communicate)
            await set_link(cut_host or destination, False)
            if cut_s is None:
                async with asyncio.timeout(limit_s + 60):
                    await asyncio.shield(communicate)
            else:
                await asyncio.sleep(cut_s)
        finally:
            await set_link(cut_host or destination, True)
        restored = time.monotonic()
        async with asyncio.timeout(120):
            stdout, stderr = await communicate
        after_s = time.monotonic() - restored
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        communicate.cancel()
    log = stderr.decode(errors="replace")
    if directory := os.environ.get("VMFERRY_TEST_LOGS"):
        Path(directory, f"{vm}-{source}-{destination}.log").write_text(log)
    assert stdout, log[-3000:]
    return process.returncode or 0, json.loads(stdout), log, after_s


def _assert_recovered(
    lab: Lab, code: int, report: dict[str, Any], log: str, destination: str
) -> None:
    """The move completed after at least one recovery, the guest intact and alive, and exactly
    one VM runs, where it was sent."""
    assert code == 0, log[-3000:]
    assert report["status"] == "completed", report["error"]
    assert report["recoveries"] >= 1, log[-3000:]
    assert report["integrity"]["ok"] is True
    assert report["integrity"]["bad_pages"] == 0
    assert report["guest_alive"] is True
    assert [(v["name"], v["host"], v["state"]) for v in lab.vms()] == [
        ("vm1", destination, "running")
    ]


def test_postcopy_survives_link_cuts(lab_dir: Path) -> None:
    # Namespaces are machine-wide: clear any orphaned by an earlier crashed lab.
    asyncio.run(lab_down(Path(tempfile.mkdtemp(prefix="vmf-"))))
    lab = Lab(lab_dir)
    lab.ok("lab", "up", "--hosts", "2", "--netns", "--link-mbps", LINK_MBPS)
    lab.ok("vm", "create", "vm1", "--host", "host-1", "--workload", WORKLOAD)

    # A cut longer than the 2 s a post-copy may be quiet (a shorter one TCP rides out alone).
    source, destination, cut_s = "host-1", "host-2", 6.0
    code, report, log, after_s = asyncio.run(
        _migrate_with_cut(lab, "vm1", source, destination, cut_s)
    )
    recovered = re.findall(r"migration\.recovered vm1 in ([0-9.]+) s", log)
    print(
        f"cut {cut_s:g} s: recoveries={report['recoveries']} recovered_in={recovered} "
        f"done {after_s:.1f} s after restore, total {report['total_ms']} ms, "
        f"guest downtime {report['guest_downtime_ms']} ms"
    )
    _assert_recovered(lab, code, report, log, destination)
    assert report["strategy"] == "postcopy"

    # A cut that outlasts the limit: a clear failure, and the source copy is never started.
    code, report, log, _ = asyncio.run(
        _migrate_with_cut(lab, "vm1", "host-2", "host-1", None, limit_s=4)
    )
    assert code == 1, log[-3000:]
    assert report["status"] == "failed"
    assert report["running_on"] == "host-1"
    assert report["guest_alive"] is False
    assert "not recovered within 4 s" in report["error"]
    assert "never started" in report["error"]
    states = {(v["host"], v["state"]) for v in lab.vms()}
    assert states == {("host-2", "migrating"), ("host-1", "incoming")}, states
    assert len(existing_namespaces()) == 2


async def _abort_connections(lab: Lab, inside: str, peer: str) -> str:
    """Destroy every TCP connection in lab host ``inside``'s namespace whose peer is lab host
    ``peer``'s migration address with ``ss -K`` (the kernel aborts them: both QEMUs see the
    connections reset while the link stays up); returns what ``ss`` listed."""
    inventory = Inventory.load(lab.directory)
    netns = NETNS_PREFIX + inside.removeprefix("host-")
    address = inventory.host(peer).address
    process = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", netns, "ss", "-tnK", "dst", address,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()
    return stdout.decode()


async def _postcopy_move(
    lab: Lab,
    vm: str,
    source: str,
    destination: str,
    during: Callable[[], Awaitable[T]],
    *args: str,
) -> tuple[int, dict[str, Any], str, T]:
    """Run ``vmferry -v migrate`` (post-copy, ``args`` added) and, once post-copy is under way,
    ``during()``; returns the exit status, the report, the CLI's log and what ``during``
    returned."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "vmferry.cli.main", "-v", "migrate", vm, "--to", destination,
        "--strategy", "postcopy", "--json", "--no-plan", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "VMFERRY_LAB_DIR": str(lab.directory)},
    )  # fmt: skip
    communicate = asyncio.ensure_future(process.communicate())
    try:
        await _wait_postcopy(Inventory.load(lab.directory), source, vm, 16 << 20, communicate)
        done = await during()
        async with asyncio.timeout(180):
            stdout, stderr = await communicate
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        communicate.cancel()
    log = stderr.decode(errors="replace")
    assert stdout, log[-3000:]
    return process.returncode or 0, json.loads(stdout), log, done


async def _migrate_with_abort(
    lab: Lab, vm: str, source: str, destination: str, inside: str
) -> tuple[int, dict[str, Any], str, str]:
    """Run ``vmferry migrate`` (post-copy) and abort its connections from ``inside``'s
    namespace once post-copy is under way; returns the exit status, report, log and what
    ``ss`` killed."""
    peer = destination if inside == source else source
    return await _postcopy_move(
        lab, vm, source, destination, lambda: _abort_connections(lab, inside, peer),
        "--recovery-limit", "60",
    )  # fmt: skip


async def _migrate_with_source_stopped(
    lab: Lab, vm: str, source: str, destination: str, stop_s: float
) -> tuple[int, dict[str, Any], str]:
    """Run ``vmferry migrate`` (post-copy) and stop the source QEMU (SIGSTOP, by the pid its
    agent wrote) for ``stop_s`` once post-copy is under way: quiet on a link that works, as a
    QEMU holding its lock while it sends its last pages is. Returns the exit status, the report
    and the CLI's log."""
    pid_file = lab.directory / "hosts" / source / "vms" / vm / "qemu.pid"

    async def stop() -> None:
        pid = int(pid_file.read_text())
        os.kill(pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(stop_s)
        finally:
            os.kill(pid, signal.SIGCONT)

    code, report, log, _ = await _postcopy_move(lab, vm, source, destination, stop)
    return code, report, log


def test_postcopy_survives_aborted_connections(lab_dir: Path) -> None:
    """Connections reset by ``ss -K`` (not a cut link): the destination QEMU may then hold its
    main loop on a missing page, so recovery must reach it with OOB commands only."""
    asyncio.run(lab_down(Path(tempfile.mkdtemp(prefix="vmf-"))))
    lab = Lab(lab_dir)
    lab.ok("lab", "up", "--hosts", "2", "--netns", "--link-mbps", LINK_MBPS)
    lab.ok("vm", "create", "vm1", "--host", "host-1", "--workload", WORKLOAD)

    # From the source's side, then from the destination's, there and back.
    for source, destination, inside in (
        ("host-1", "host-2", "host-1"),
        ("host-2", "host-1", "host-1"),
    ):
        code, report, log, killed = asyncio.run(
            _migrate_with_abort(lab, "vm1", source, destination, inside)
        )
        print(
            f"{source}->{destination}, aborted in {inside}: {killed.count('ESTAB')} "
            f"connections, recoveries={report['recoveries']}, total {report['total_ms']} ms"
        )
        assert "ESTAB" in killed, killed
        _assert_recovered(lab, code, report, log, destination)

    # A source QEMU quiet for 4 s on a link that works (as one is while it holds its lock to
    # send its last pages, or waits for the destination to finish): the controller's recovery
    # finds the link working and pauses nothing (a pause there makes QEMU fail the migration,
    # and the guest is split between the hosts); the move completes.
    code, report, log = asyncio.run(
        _migrate_with_source_stopped(lab, "vm1", "host-1", "host-2", 4.0)
    )
    assert code == 0, log[-3000:]
    assert report["status"] == "completed", report["error"]
    assert report["recoveries"] == 0, log[-3000:]
    assert "migration.postcopy_not_broken" in log, log[-3000:]
    assert report["integrity"]["ok"] is True
    agent_log = (lab.directory / "hosts" / "host-1" / "agent.log").read_text()
    assert "migration.pause_skipped" in agent_log, agent_log[-2000:]
