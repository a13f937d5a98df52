"""The fault matrix's machinery, shared by ``bench/faults.py`` and ``test_faults.py``.

One *cell* is a fault injected at a phase of a live migration on a fresh lab: the harness starts
``vmferry migrate`` (the real CLI, as a process), watches the source agent's progress long-poll
for the phase, injects the fault, lets things settle (restores the link, restarts a killed
agent; a killed CLI stays dead), runs ``vmferry reconcile`` if this build has it, and then
judges from what is *actually* running: every QEMU process of the VM on every host (found in
``/proc``, not taken from any agent's word), its state as its agent reports it (or as QEMU itself
answers over QMP when no agent owns it), whether its vCPU burns time, and ``vmferry verify``.

Faults: kill -9 of the destination/source QEMU, of the destination/source agent, of the
``vmferry migrate`` process; the destination's link cut for 1 s, 10 s or until the command has
ended (netns labs); the destination's link throttled to 8 kbit/s for a while (netns); the
destination's disk filesystem filled up (a small ext4 loop filesystem holds the destination's
``disks/`` directory, and a filler file takes all its free space).

Phases: ``setup`` (the destination QEMU has just been started, or, for a full disk, before the
command), ``precopy`` (RAM status ``active``, or stage ``disk-copy`` for the disk-full fault),
``switchover`` (``pre-switchover``, stage ``disk-synced``: the source paused with the disk handover
pending) and ``postcopy`` (``postcopy-active``, ``--strategy postcopy``).

Everything the harness starts is ended by it: the lab (``vmferry lab down``, which also ends
the QEMUs and namespaces), an agent it restarted (recorded in the lab's ``agent.pid``, so lab
down finds it), the CLI process (by PID), the loop filesystem.
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
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clirunner import vmferry

from vmferry.agent.client import AgentClient
from vmferry.controller.inventory import Inventory
from vmferry.core.errors import FerryError
from vmferry.core.status import Stage
from vmferry.lab._reaper import cmdline
from vmferry.lab.cluster import lab_down
from vmferry.lab.netns import set_link, set_link_rate

__all__ = [
    "FAULTS",
    "PHASES",
    "Cell",
    "CellConfig",
    "all_cells",
    "iter_cells",
    "judge",
    "markdown_table",
    "not_applicable",
    "parse_cell",
    "run_cell",
    "summary_row",
]

FAULTS = (
    "kill-dst-qemu",
    "kill-src-qemu",
    "kill-dst-agent",
    "kill-src-agent",
    "kill-cli",
    "cut-1s",
    "cut-10s",
    "cut-forever",
    "throttle",
    "disk-full",
)
PHASES = ("setup", "precopy", "switchover", "postcopy")
NETNS_FAULTS = frozenset({"cut-1s", "cut-10s", "cut-forever", "throttle"})

VM = "fvm"
SOURCE, DESTINATION = "host-1", "host-2"
# The destination's disks live on a filesystem this big (disk-full cells); the VM's image is
# 256 MiB virtual, of which the guest writes DISK_REGION before it is ready.
FILL_FS_BYTES = 448 << 20
THROTTLE_KBIT = 8


def not_applicable(fault: str, phase: str) -> str | None:
    """Why ``fault`` at ``phase`` is not a cell (None: it is one)."""
    if fault == "disk-full" and phase == "postcopy":
        return (
            "the disk copy is complete before post-copy starts (the mirror finishes at the "
            "pre-switchover pause); a full disk then is the guest's I/O error, not the move's"
        )
    return None


@dataclass(frozen=True, slots=True)
class Cell:
    fault: str
    phase: str

    @property
    def name(self) -> str:
        return f"{self.fault}@{self.phase}"

    @property
    def needs_netns(self) -> bool:
        return self.fault in NETNS_FAULTS

    @property
    def strategy(self) -> str:
        return "postcopy" if self.phase == "postcopy" else "precopy"

    @property
    def loss_is_physical(self) -> bool:
        """Whether no running copy is the only possible outcome: the source QEMU died while it
        held the only complete copy of the guest (before the switchover completed, or during
        post-copy when the source still holds pages the destination never got), or the
        destination QEMU died during post-copy (it alone held the guest's current CPU and
        device state and the pages the guest changed since the switchover)."""
        return self.fault == "kill-src-qemu" or (
            self.fault == "kill-dst-qemu" and self.phase == "postcopy"
        )


def parse_cell(text: str) -> Cell:
    fault, _, phase = text.partition("@")
    if fault not in FAULTS or phase not in PHASES:
        raise ValueError(f"no cell {text!r}: FAULT@PHASE with FAULT in {FAULTS}, PHASE in {PHASES}")
    return Cell(fault, phase)


def all_cells() -> list[Cell]:
    return [Cell(f, p) for f in FAULTS for p in PHASES if not_applicable(f, p) is None]


@dataclass(frozen=True, slots=True)
class CellConfig:
    """How a cell's lab, guest and migration are set up (short timings: phases of seconds)."""

    netns: bool = True
    link_mbps: int = 100  # netns link rate (the migration's pace)
    bandwidth_mbps: int | None = None  # cap on the migration stream (loopback labs)
    memory: str = "512M"
    disk: str = "256M"
    # 64 MiB of random pages (~5 s over 100 Mbit/s) and a 16 MiB disk region rewritten at 1 MiB/s.
    workload: str = "dirty:rate=4M,size=64M,pattern=random,mode=paced,disk-rate=1M,disk-size=16M"
    recovery_limit_s: float = 30.0
    cut_short_s: float = 1.0
    cut_long_s: float = 10.0
    throttle_s: float = 15.0
    restart_agent_after_s: float = 3.0
    cli_timeout_s: float = 150.0  # after the fault, before the harness calls the CLI hung
    settle_timeout_s: float = 45.0  # for agents' own timeouts (the 30 s handover wait)
    phase_timeout_s: float = 120.0
    # The harness's own commands (lab up, vm list, verify, reconcile…) in this process instead of
    # a ``vmferry`` process each (``clirunner``); the migration is a process either way.
    in_process_cli: bool = False
    # The migration's pre-flight measurement (``--no-plan`` when off: no prediction, ~2 s less).
    plan: bool = True


# -------------------------------------------------------------------------------- helpers


def _env(lab_dir: Path) -> dict[str, str]:
    return {**os.environ, "VMFERRY_LAB_DIR": str(lab_dir)}


def _cli(
    lab_dir: Path, *args: str, timeout_s: float = 300, in_process: bool = False
) -> tuple[int, Any, str]:
    """Run ``vmferry ARGS``; returns exit status, parsed JSON stdout (or None), stderr."""
    try:
        result = vmferry(args, lab_dir, timeout_s=timeout_s, in_process=in_process)
    except subprocess.TimeoutExpired as err:
        return -1, None, f"timed out after {timeout_s:g} s: {err.stderr!r}"
    data: Any = None
    with contextlib.suppress(ValueError):
        data = json.loads(result.stdout) if result.stdout.strip() else None
    return result.returncode, data, result.stderr


def _must(lab_dir: Path, *args: str, in_process: bool = False) -> Any:
    code, data, err = _cli(lab_dir, *args, "--json", in_process=in_process)
    if code != 0:
        raise RuntimeError(f"vmferry {' '.join(args)} failed ({code}): {err.strip()[-1500:]}")
    return data


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _cpu_ticks(pid: int) -> int | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[11]) + int(fields[12])  # utime + stime


def _vm_dir(lab_dir: Path, host: str) -> Path:
    return lab_dir / "hosts" / host / "vms" / VM


def qemu_processes(lab_dir: Path, host: str) -> list[int]:
    """Every live QEMU process of the VM on ``host``, found by its command line in /proc (the
    console log path names host and VM), whatever any agent or pid file says."""
    marker = str(_vm_dir(lab_dir, host) / "console.log")
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        argv = cmdline(int(entry.name))
        if (
            argv
            and "qemu-system" in Path(argv[0]).name
            and any(marker in a for a in argv)
            and _alive(int(entry.name))
        ):
            found.append(int(entry.name))
    return sorted(found)


def agent_pid(lab_dir: Path, host: str) -> int | None:
    try:
        ready = json.loads((lab_dir / "hosts" / host / "ready.json").read_text())
    except (OSError, ValueError):
        return None
    pid = ready.get("pid") if isinstance(ready, dict) else None
    return pid if isinstance(pid, int) else None


async def _qmp_status(socket_path: Path, timeout_s: float = 3.0) -> str:
    """QEMU's runstate straight from its QMP socket (only when no agent holds the socket: QEMU
    serves one monitor client at a time)."""
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_unix_connection(str(socket_path))
            try:
                await reader.readline()  # greeting
                writer.write(b'{"execute": "qmp_capabilities"}\n')
                await writer.drain()
                await reader.readline()
                writer.write(b'{"execute": "query-status"}\n')
                await writer.drain()
                while True:
                    reply = json.loads(await reader.readline())
                    if "return" in reply:
                        return str(reply["return"]["status"])
                    if "error" in reply:
                        return f"qmp-error: {reply['error'].get('desc')}"
            finally:
                writer.close()
    except TimeoutError:
        return "qmp-no-answer"
    except (OSError, ValueError) as err:
        return f"qmp-unreachable: {err}"


# ---------------------------------------------------------------------------- agents


@dataclass(slots=True)
class KilledAgent:
    host: str
    argv: list[str]
    netns: str | None


def kill_agent(lab_dir: Path, host: str) -> KilledAgent:
    """SIGKILL ``host``'s agent (its QEMUs keep running); remember how to start it again."""
    pid = agent_pid(lab_dir, host)
    if pid is None or not _alive(pid):
        raise RuntimeError(f"{host}'s agent is not running")
    argv = cmdline(pid)
    entry = Inventory.load(lab_dir).host(host)
    os.kill(pid, signal.SIGKILL)
    return KilledAgent(host, argv, entry.netns)


def restart_agent(
    lab_dir: Path, killed: KilledAgent, timeout_s: float = 60.0, in_process: bool = False
) -> str:
    """Start a killed agent again: ``vmferry lab restart`` if this build has it, else the same
    command line, in the same namespace, on the same port (so the inventory stays right);
    recorded in its ``agent.pid`` so ``lab down`` ends it. Returns how it was restarted."""
    code, _, err = _cli(lab_dir, "lab", "restart", "--help", timeout_s=30, in_process=in_process)
    if code == 0:
        code, _, err = _cli(
            lab_dir, "lab", "restart", killed.host, timeout_s=timeout_s + 30, in_process=in_process
        )
        if code != 0:
            raise RuntimeError(f"vmferry lab restart {killed.host} failed ({code}): {err[-800:]}")
        return "vmferry lab restart"
    state_dir = lab_dir / "hosts" / killed.host
    (state_dir / "ready.json").unlink(missing_ok=True)
    argv = list(killed.argv)
    url = Inventory.load(lab_dir).host(killed.host).url
    port = url.rsplit(":", 1)[1]
    listen = argv.index("--listen") + 1
    argv[listen] = f"{argv[listen].rsplit(':', 1)[0]}:{port}"
    if killed.netns:
        argv = ["ip", "netns", "exec", killed.netns, *argv]
    log = os.open(state_dir / "agent.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
    finally:
        os.close(log)
    (state_dir / "agent.pid").write_text(f"{process.pid}\n")
    deadline = time.monotonic() + timeout_s
    while agent_pid(lab_dir, killed.host) is None:
        if process.poll() is not None:
            raise RuntimeError(f"restarted agent of {killed.host} exited ({process.returncode})")
        if time.monotonic() > deadline:
            raise RuntimeError(f"restarted agent of {killed.host} not ready in {timeout_s:g} s")
        time.sleep(0.1)
    _reap_later(process)
    return "harness (same argv and port)"


_CHILDREN: list[subprocess.Popen[bytes]] = []


def _reap_later(process: subprocess.Popen[bytes]) -> None:
    _CHILDREN.append(process)


def reap_children() -> None:
    """Collect the exit status of agents we restarted (``lab down`` has ended them)."""
    for process in _CHILDREN:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=30)
    _CHILDREN.clear()


# ------------------------------------------------------------------------------ disk


@dataclass(slots=True)
class FillFs:
    """A small ext4 filesystem (loop device) holding the destination's ``disks/`` directory:
    a destination whose storage can run out while the mirror writes to it."""

    image: Path
    mount: Path
    mounted: bool = False

    @classmethod
    def create(cls, lab_dir: Path, host: str, size_bytes: int) -> FillFs:
        work = Path(tempfile.mkdtemp(prefix="vmf-fill-"))
        fs = cls(work / "fs.img", work / "mnt")
        fs.mount.mkdir()
        with open(fs.image, "wb") as handle:
            handle.truncate(size_bytes)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(fs.image)], check=True)
        subprocess.run(["mount", "-o", "loop", str(fs.image), str(fs.mount)], check=True)
        fs.mounted = True
        disks = lab_dir / "hosts" / host / "disks"
        if disks.is_dir():
            disks.rmdir()  # empty: nothing was ever created on this host
        disks.symlink_to(fs.mount)  # lab down unlinks the symlink, never follows it
        return fs

    def fill(self) -> int:
        """Take all the free space; returns how many bytes the filler got."""
        free = shutil.disk_usage(self.mount).free
        filler = self.mount / "filler"
        subprocess.run(["fallocate", "-l", str(free), str(filler)], check=False)
        # fallocate leaves metadata-sized crumbs; fill those too.
        with contextlib.suppress(OSError), open(self.mount / "crumbs", "wb") as handle:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        return free

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.mount).free

    def remove(self) -> None:
        if self.mounted:
            result = subprocess.run(["umount", "-l", str(self.mount)], check=False)
            self.mounted = result.returncode != 0
        shutil.rmtree(self.image.parent, ignore_errors=True)


# ---------------------------------------------------------------------------- the cell


@dataclass(slots=True)
class Trace:
    """What the harness saw of the migration, with times relative to the command's start."""

    started: float = field(default_factory=time.monotonic)
    events: list[tuple[float, str]] = field(default_factory=list)
    statuses: list[str] = field(default_factory=list)
    since: int = 0  # the source's progress samples seen so far

    def note(self, what: str) -> None:
        self.events.append((round(time.monotonic() - self.started, 2), what))

    def status(self, status: str) -> None:
        if not self.statuses or self.statuses[-1] != status:
            self.statuses.append(status)
            self.note(f"status {status}")


async def _watch_progress(
    lab_dir: Path, cell: Cell, trace: Trace, cli: asyncio.subprocess.Process, armed: asyncio.Event
) -> None:
    """Follow the source agent's progress long-poll; set ``armed`` once the cell's phase is
    reached. Returns when the migration ended, the source agent went away or the phase came."""
    inventory = Inventory.load(lab_dir)
    host = inventory.host(SOURCE)
    token = inventory.token_file.read_text().strip()
    dst_pid_file = _vm_dir(lab_dir, DESTINATION) / "qemu.pid"
    since = 0
    postcopy_from: int | None = None
    async with AgentClient(SOURCE, host.url, token, inventory.ca_file) as agent:
        while not armed.is_set():
            if cli.returncode is not None:
                return
            if cell.phase == "setup" and dst_pid_file.exists():
                trace.note("destination QEMU started")
                armed.set()
                return
            try:
                samples, since, result = await agent.migration_progress(VM, since, 0.3)
            except FerryError:  # no migration yet
                await asyncio.sleep(0.05)
                continue
            trace.since = since
            for stats in samples:
                in_ram = stats.stage is Stage.MIGRATION
                trace.status(stats.status if in_ram else stats.stage)
                if cell.phase == "precopy":
                    if cell.fault == "disk-full":
                        # At once: the image must still grow when the filesystem is full.
                        hit = stats.stage is Stage.DISK_COPY
                    else:
                        hit = stats.status == "active" and stats.transferred_bytes >= 16 << 20
                elif cell.phase == "switchover":
                    hit = stats.status == "pre-switchover" or stats.stage is Stage.DISK_SYNCED
                elif cell.phase == "postcopy":
                    if stats.status == "postcopy-active" and postcopy_from is None:
                        postcopy_from = stats.transferred_bytes
                    hit = (
                        stats.status == "postcopy-active"
                        and postcopy_from is not None
                        and stats.transferred_bytes >= postcopy_from + (8 << 20)
                    )
                else:
                    hit = False
                if hit:
                    trace.note(f"phase {cell.phase} reached ({stats.status})")
                    armed.set()
                    return
            if result is not None:
                trace.note(f"migration ended before the phase: {result.status}")
                return


async def _follow(lab_dir: Path, trace: Trace, stop: asyncio.Event) -> None:
    """Keep recording the source's statuses after the fault (until ``stop``), best effort."""
    inventory = Inventory.load(lab_dir)
    host = inventory.host(SOURCE)
    token = inventory.token_file.read_text().strip()
    since = trace.since
    async with AgentClient(SOURCE, host.url, token, inventory.ca_file) as agent:
        while not stop.is_set():
            try:
                samples, new_since, result = await agent.migration_progress(
                    VM, since, 0.5, timeout_s=3.0
                )
            except FerryError:
                await asyncio.sleep(0.5)
                continue
            if new_since < since:  # a restarted agent starts counting again
                since = 0
                continue
            since = new_since
            for stats in samples:
                trace.status(stats.status)
            if result is not None:
                trace.note(f"source reports {result.status}: {result.error}")
                return


async def _inject(
    lab_dir: Path,
    cell: Cell,
    config: CellConfig,
    cli: asyncio.subprocess.Process | None,
    fill: FillFs | None,
    trace: Trace,
    record: dict[str, Any],
) -> None:
    fault = cell.fault
    if fault in ("kill-dst-qemu", "kill-src-qemu"):
        host = DESTINATION if fault == "kill-dst-qemu" else SOURCE
        pid = _read_pid(_vm_dir(lab_dir, host) / "qemu.pid")
        if pid is None:
            raise RuntimeError(f"no qemu.pid on {host}")
        os.kill(pid, signal.SIGKILL)
        trace.note(f"killed {host} QEMU pid {pid}")
    elif fault in ("kill-dst-agent", "kill-src-agent"):
        host = DESTINATION if fault == "kill-dst-agent" else SOURCE
        killed = kill_agent(lab_dir, host)
        trace.note(f"killed {host} agent")
        await asyncio.sleep(config.restart_agent_after_s)
        how = await asyncio.to_thread(
            restart_agent, lab_dir, killed, in_process=config.in_process_cli
        )
        record["agent_restarted_by"] = how
        trace.note(f"restarted {host} agent ({how})")
    elif fault == "kill-cli":
        assert cli is not None
        cli.kill()
        trace.note(f"killed vmferry migrate pid {cli.pid}")
    elif fault.startswith("cut-"):
        await set_link(DESTINATION, False)
        trace.note(f"cut {DESTINATION}'s link")
        try:
            if fault == "cut-forever":
                assert cli is not None
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(config.cli_timeout_s):
                        await cli.wait()
                trace.note("migrate command ended" if cli.returncode is not None else "CLI hung")
            else:
                wait_s = config.cut_short_s if fault == "cut-1s" else config.cut_long_s
                await asyncio.sleep(wait_s)
        finally:
            await set_link(DESTINATION, True)
            trace.note(f"restored {DESTINATION}'s link")
    elif fault == "throttle":
        await set_link_rate(DESTINATION, THROTTLE_KBIT)
        trace.note(f"throttled {DESTINATION}'s link to {THROTTLE_KBIT} kbit/s")
        try:
            await asyncio.sleep(config.throttle_s)
        finally:
            await set_link_rate(DESTINATION, config.link_mbps * 1000 if config.netns else None)
            trace.note(f"unthrottled {DESTINATION}'s link")
    elif fault == "disk-full":
        assert fill is not None
        got = await asyncio.to_thread(fill.fill)
        trace.note(f"filled {DESTINATION}'s disk filesystem ({got >> 20} MiB; free now "
                   f"{fill.free_bytes()} B)")  # fmt: skip
    else:
        raise ValueError(fault)


async def _migrate_process(
    lab_dir: Path, cell: Cell, config: CellConfig
) -> asyncio.subprocess.Process:
    argv = [
        sys.executable, "-m", "vmferry.cli.main", "-v", "migrate", VM, "--to", DESTINATION,
        "--strategy", cell.strategy, "--recovery-limit", f"{config.recovery_limit_s:g}", "--json",
    ]  # fmt: skip
    if config.bandwidth_mbps is not None:
        argv += ["--bandwidth", str(config.bandwidth_mbps)]
    if not config.plan:
        argv.append("--no-plan")
    return await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=_env(lab_dir),
        start_new_session=True,
    )


async def _drive(lab_dir: Path, cell: Cell, config: CellConfig, record: dict[str, Any]) -> None:
    """Start the migration, inject the fault at the phase, wait for the command to end."""
    fill: FillFs | None = record.pop("_fill", None)
    trace = Trace()
    record["trace"] = trace.events
    record["statuses"] = trace.statuses
    if cell.fault == "disk-full" and cell.phase == "setup":
        await _inject(lab_dir, cell, config, None, fill, trace, record)
        record["injected"] = True
    cli = await _migrate_process(lab_dir, cell, config)
    trace.started = time.monotonic()
    communicate = asyncio.ensure_future(cli.communicate())
    stop_follow = asyncio.Event()
    follower: asyncio.Task[None] | None = None
    try:
        if not record.get("injected"):
            armed = asyncio.Event()
            try:
                async with asyncio.timeout(config.phase_timeout_s):
                    await _watch_progress(lab_dir, cell, trace, cli, armed)
            except TimeoutError:
                trace.note("phase not reached in time")
            if armed.is_set():
                follower = asyncio.ensure_future(_follow(lab_dir, trace, stop_follow))
                await _inject(lab_dir, cell, config, cli, fill, trace, record)
                record["injected"] = True
            else:
                record["injected"] = False
        try:
            async with asyncio.timeout(config.cli_timeout_s):
                stdout, stderr = await asyncio.shield(communicate)
        except TimeoutError:
            record["cli_hung"] = True
            trace.note(f"CLI still running {config.cli_timeout_s:g} s after the fault: SIGINT")
            with contextlib.suppress(ProcessLookupError):
                cli.send_signal(signal.SIGINT)
            try:
                async with asyncio.timeout(30):
                    stdout, stderr = await asyncio.shield(communicate)
            except TimeoutError:
                cli.kill()
                stdout, stderr = await communicate
        trace.note(f"migrate exited {cli.returncode}")
    finally:
        if cli.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                cli.kill()
            await cli.wait()
        stop_follow.set()
        if follower is not None:
            with contextlib.suppress(TimeoutError, FerryError):
                async with asyncio.timeout(5):
                    await follower
            follower.cancel()
    record["exit"] = cli.returncode
    text = stdout.decode(errors="replace")
    log = stderr.decode(errors="replace")
    record["cli_log_tail"] = log.strip().splitlines()[-6:]
    report: Any = None
    with contextlib.suppress(ValueError):
        report = json.loads(text) if text.strip() else None
    record["report"] = report


async def _settle(lab_dir: Path, config: CellConfig, record: dict[str, Any]) -> None:
    """Wait until no host shows the VM mid-migration (agents time out on their own, e.g. a source
    waiting for a handover that never comes), up to ``settle_timeout_s``."""
    started = time.monotonic()
    while time.monotonic() - started < config.settle_timeout_s:
        code, data, _ = await asyncio.to_thread(
            _cli, lab_dir, "vm", "list", "--json", in_process=config.in_process_cli
        )
        states = (
            [v["state"] for v in data.get("vms", []) if v.get("name") == VM]
            if isinstance(data, dict)
            else []
        )
        if code == 0 and "migrating" not in states:
            break
        await asyncio.sleep(1.0)
    record["settled_s"] = round(time.monotonic() - started, 1)


def _reconcile(lab_dir: Path, record: dict[str, Any], in_process: bool = False) -> None:
    code, _, _ = _cli(lab_dir, "reconcile", "--help", timeout_s=30, in_process=in_process)
    if code != 0:
        record["reconcile"] = "no reconcile yet"
        return
    code, data, err = _cli(lab_dir, "reconcile", "--json", timeout_s=180, in_process=in_process)
    record["reconcile"] = {"exit": code, "output": data, "stderr": err.strip()[-800:]}


async def observe(lab_dir: Path) -> dict[str, Any]:
    """What runs now, per host: QEMU processes of the VM, their state, vCPU time (over one 2 s
    window for every host)."""
    inventory = Inventory.load(lab_dir)
    token = inventory.token_file.read_text().strip()
    seen: dict[str, tuple[list[int], dict[int, str], str | None, str | None]] = {}
    for entry in inventory.hosts:
        pids = qemu_processes(lab_dir, entry.name)
        agent_state: dict[int, str] = {}
        qemu_says: str | None = None
        agent_error = None
        try:
            async with AgentClient(entry.name, entry.url, token, inventory.ca_file) as agent:
                for info in await agent.list_vms():
                    if info.name == VM:
                        agent_state[info.pid or 0] = info.state
                        if info.pid:
                            qemu_says, _ = await agent.qemu_state(VM)
        except FerryError as err:
            agent_error = str(err)
        seen[entry.name] = (pids, agent_state, qemu_says, agent_error)
    before = {pid: _cpu_ticks(pid) for pids, *_ in seen.values() for pid in pids}
    await asyncio.sleep(2.0)
    hosts: dict[str, Any] = {}
    for name, (pids, agent_state, qemu_says, agent_error) in seen.items():
        copies = []
        for pid in pids:
            after, start = _cpu_ticks(pid), before[pid]
            cpu = None if after is None or start is None else (after - start) // 2  # ticks/s
            state = agent_state.get(pid)
            if state is not None:  # its agent asked QEMU (QEMU serves one QMP client)
                qmp = qemu_says
            else:  # no agent owns it: ask QEMU ourselves
                qmp = await _qmp_status(_vm_dir(lab_dir, name) / "qmp.sock")
            copies.append({"pid": pid, "agent_state": state, "qmp_status": qmp, "cpu_pct": cpu})
        hosts[name] = {
            "qemus": copies,
            "agent_error": agent_error,
            # The agent lists a VM whose QEMU is gone as "stopped" (pid None).
            "agent_records": sorted(f"{pid or '-'}:{s}" for pid, s in agent_state.items()),
        }
    return hosts


# A guest that runs its workload keeps its QEMU busy (the paced dirtier, the heartbeat); a paused
# QEMU (inmigrate, postmigrate, paused) uses next to no CPU. In clock ticks (1/100 s) per second.
BUSY_TICKS_PER_S = 10


def _running(copy: dict[str, Any]) -> bool:
    """Whether this QEMU executes the guest: QEMU's own word (``query-status``, through its
    agent or directly), else its CPU use. An agent's state is what the agent believes, e.g.
    "incoming" for a destination whose migration completed without a controller."""
    if copy["qmp_status"] is not None and not str(copy["qmp_status"]).startswith("qmp-"):
        return bool(copy["qmp_status"] == "running")
    return copy["cpu_pct"] is not None and copy["cpu_pct"] >= BUSY_TICKS_PER_S


def judge(cell: Cell, record: dict[str, Any]) -> None:
    """Set ``outcome``, ``ended_on`` and ``notes`` from the observation (again, if it was
    judged before: the rules may have changed since)."""
    if "hosts" not in record:
        return  # the harness failed before it could look
    hosts = record["hosts"]
    running = [(h, c) for h, v in hosts.items() for c in v["qemus"] if _running(c)]
    others = [(h, c) for h, v in hosts.items() for c in v["qemus"] if not _running(c)]
    verify = record.get("verify") or {}
    verified = verify.get("exit") == 0 and (verify.get("output") or {}).get("ok") is True
    notes: list[str] = []
    for host, copy in others:
        state = copy["agent_state"] or copy["qmp_status"]
        notes.append(f"paused QEMU left on {host} (agent: {state}, cpu {copy['cpu_pct']}/s)")
    for host, copy in running:
        if copy["agent_state"] not in ("running", None):
            notes.append(f"{host}'s agent calls its running copy {copy['agent_state']!r}")
    for host, view in hosts.items():
        if view["agent_error"]:
            notes.append(f"{host}'s agent unreachable: {view['agent_error'][:120]}")
    if not record.get("injected"):
        notes.append("fault NOT injected (phase not reached)")
    if record.get("cli_hung"):
        notes.append(f"CLI did not end within {record['cli_timeout_s']:g} s of the fault")
    report = record.get("report") or {}
    if len(running) == 1:
        host = running[0][0]
        record["ended_on"] = host
        if not verified and cell.loss_is_physical and report.get("guest_alive") is False:
            # E.g. the source died during post-copy: the destination QEMU still "runs" a
            # guest frozen on pages that are gone, and the report says the guest is lost.
            outcome = "lost (unavoidable)"
            notes.append(f"{host} keeps a partial guest; CLI said: {report.get('error')}"[:300])
        elif not verified:
            outcome = "unverified"
        elif others:
            outcome = "ok+paused-copy"
        else:
            outcome = "ok"
    elif len(running) > 1:
        record["ended_on"] = ",".join(h for h, _ in running)
        outcome = "DUPLICATE"
    else:
        record["ended_on"] = None
        if cell.loss_is_physical:
            said = f"{report.get('error')}" if report else " ".join(record["cli_log_tail"][-1:])
            outcome = "lost (unavoidable)"
            notes.append(f"CLI said: {said[:300]}")
        else:
            outcome = "LOST"
    record["outcome"] = outcome
    record["verified"] = verified
    record["notes"] = notes


async def _run(lab_dir: Path, cell: Cell, config: CellConfig, record: dict[str, Any]) -> None:
    up = ["lab", "up", "--hosts", "2", "--memory-per-host", "2G"]
    if config.netns:
        up += ["--netns", "--link-mbps", str(config.link_mbps)]
    here = config.in_process_cli
    await asyncio.to_thread(_must, lab_dir, *up, in_process=here)
    if cell.fault == "disk-full":
        record["_fill"] = FillFs.create(lab_dir, DESTINATION, FILL_FS_BYTES)
        record["fill_fs"] = record["_fill"].mount.as_posix()
    create = ["vm", "create", VM, "--host", SOURCE, "--memory", config.memory]
    create += ["--disk", config.disk, "--workload", config.workload]
    await asyncio.to_thread(_must, lab_dir, *create, in_process=here)
    fill = record.get("_fill")
    try:
        await _drive(lab_dir, cell, config, record)
        await _settle(lab_dir, config, record)
        await asyncio.to_thread(_reconcile, lab_dir, record, here)
        record["hosts"] = await observe(lab_dir)
        code, data, err = await asyncio.to_thread(
            _cli, lab_dir, "verify", VM, "--json", in_process=here
        )
        record["verify"] = {"exit": code, "output": data, "stderr": err.strip()[-300:]}
        code, data, _ = await asyncio.to_thread(
            _cli, lab_dir, "vm", "list", "--json", in_process=here
        )
        record["vm_list"] = data
    finally:
        record["_fill"] = fill


def run_cell(cell: Cell, config: CellConfig, lab_dir: Path | None = None) -> dict[str, Any]:
    """Run one cell on a fresh lab (taken down again, also on failure); returns its record."""
    directory = lab_dir or Path(tempfile.mkdtemp(prefix="vmf-fault-"))
    record: dict[str, Any] = {
        "cell": cell.name,
        "fault": cell.fault,
        "phase": cell.phase,
        "strategy": cell.strategy,
        "netns": config.netns,
        "cli_timeout_s": config.cli_timeout_s,
    }
    started = time.monotonic()
    try:
        asyncio.run(_run(directory, cell, config, record))
        judge(cell, record)
    except Exception as err:  # the cell's boundary: a harness failure is a result too
        record["outcome"] = "HARNESS-ERROR"
        record["error"] = f"{type(err).__name__}: {err}"
        record.setdefault("notes", []).append(record["error"])
    finally:
        fill = record.pop("_fill", None)
        with contextlib.suppress(Exception):
            asyncio.run(_restore_links(config))
        down = asyncio.run(lab_down(directory))
        record["lab_down"] = {"agents": down.agents_stopped, "qemus": down.qemus_stopped}
        reap_children()
        if fill is not None:
            fill.remove()
        shutil.rmtree(directory, ignore_errors=True)
    record["wall_s"] = round(time.monotonic() - started, 1)
    return record


async def _restore_links(config: CellConfig) -> None:
    if not config.netns:
        return
    for host in (SOURCE, DESTINATION):
        await set_link(host, True)
        await set_link_rate(host, config.link_mbps * 1000)


# ---------------------------------------------------------------------------- reporting


def summary_row(record: dict[str, Any]) -> dict[str, Any]:
    report = record.get("report") or {}
    return {
        "cell": record["cell"],
        "outcome": record.get("outcome"),
        "exit": record.get("exit"),
        "report_status": report.get("status"),
        "ended_on": record.get("ended_on"),
        "verified": record.get("verified"),
        "notes": "; ".join(record.get("notes", [])),
    }


def markdown_table(records: list[dict[str, Any]], skipped: dict[str, str]) -> str:
    lines = [
        "| cell | lab | outcome | exit | report | ended on | verified | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for record in records:
        row = summary_row(record)
        notes = str(row["notes"]).replace("|", "/")
        lines.append(
            f"| {row['cell']} | {'netns' if record.get('netns') else 'loopback'} | "
            f"{row['outcome']} | {row['exit']} | {row['report_status']} | "
            f"{row['ended_on']} | {row['verified']} | {notes} |"
        )
    for name, why in skipped.items():
        lines.append(f"| {name} | | n/a | | | | | {why} |")
    return "\n".join(lines) + "\n"


def iter_cells(only: list[str] | None) -> Iterator[Cell]:
    if not only:
        yield from all_cells()
        return
    for text in only:
        if "@" in text:
            yield parse_cell(text)
        else:  # a whole fault or a whole phase
            for cell in all_cells():
                if text in (cell.fault, cell.phase):
                    yield cell
