"""The multi-host lab on one machine: one ``vmferry agent`` process per host, optionally each in
its own network namespace with a shaped link.

``lab_up`` starts the agents detached (they outlive the CLI) and writes the inventory the CLI and
controller read; ``lab_status`` asks each agent about its host; ``lab_down`` stops everything the
lab started — also after a crash, from what it finds on disk (ready files, pid files) rather than
from the inventory alone.

Lab directory layout::

    <lab_dir>/lab.json  token  network.json (netns labs)
    <lab_dir>/tls/ca.pem ca.key host-i.pem host-i.key   (see vmferry.lab.pki; keys 0600)
    <lab_dir>/hosts/host-i/agent.pid  ready.json  agent.log  vms/<vm>/qemu.pid
    <lab_dir>/hosts/host-i/qemu-tls/ca-cert.pem server-*.pem client-*.pem   (QEMU's TLS creds)

Example:
    >>> inventory = await lab_up(2)                                   # doctest: +SKIP
    >>> [s.reachable for s in await lab_status()]                     # doctest: +SKIP
    [True, True]
    >>> await lab_down()                                              # doctest: +SKIP
    DownReport(agents_stopped=2, qemus_stopped=0, namespaces_removed=0)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import aiohttp

from vmferry.agent.client import agent_ssl
from vmferry.controller.inventory import HostEntry, Inventory, default_lab_dir
from vmferry.core.errors import ConfigError, FerryError, ProcessStartError
from vmferry.lab import netns as lab_netns
from vmferry.lab import pki
from vmferry.lab._reaper import (
    agent_pids,
    is_agent,
    is_qemu,
    qemu_children,
    qemu_pids,
    read_ready,
    stop_pids,
)
from vmferry.qemu.process import tail_lines

__all__ = [
    "MAX_HOSTS",
    "MAX_LINK_MBPS",
    "AgentStartError",
    "DownReport",
    "HostStatus",
    "default_memory_per_host_bytes",
    "lab_down",
    "lab_restart",
    "lab_status",
    "lab_up",
    "mem_total_bytes",
    "validate_lab_request",
]

logger = logging.getLogger(__name__)

MAX_HOSTS = 16
MAX_LINK_MBPS = 100_000
GIB = 1024**3
MAX_MEMORY_PER_HOST_BYTES = 8 * GIB
RESERVED_MEMORY_BYTES = 2 * GIB

READY_TIMEOUT_S = 60.0
STATUS_TIMEOUT_S = 5.0
_LOG_TAIL_LINES = 20

_NETWORK_FILE = "network.json"
_HOSTS_DIR = "hosts"
_TLS_DIR = "tls"
_ARGV_FILE = "agent.argv.json"
# Seen by every host at the same path: the lab's "shared storage" for VM disk images.
SHARED_DIR = "shared"


class AgentStartError(ProcessStartError):
    """An agent did not come up.

    Attributes:
        host: the host it was for.
        exitcode: its exit status, None if it still ran (it never became ready).
        log_tail: the end of its ``agent.log``.
    """

    log_label = "agent.log ends"

    def __init__(self, host: str, message: str, exitcode: int | None, log_tail: str) -> None:
        super().__init__(f"agent for {host} {message}", exitcode, log_tail)
        self.host = host


@dataclass(frozen=True, slots=True)
class HostStatus:
    """What ``lab status`` found out about one host."""

    name: str
    url: str
    reachable: bool  # its agent answered GET /v1/host
    pid_alive: bool  # its agent process exists
    info: dict[str, object] | None  # the agent's answer
    error: str | None  # why it is not reachable


@dataclass(frozen=True, slots=True)
class DownReport:
    """What ``lab down`` stopped and removed."""

    agents_stopped: int
    qemus_stopped: int
    namespaces_removed: int
    lab_dir_removed: bool = False

    @property
    def nothing_to_do(self) -> bool:
        return not (
            self.agents_stopped
            or self.qemus_stopped
            or self.namespaces_removed
            or self.lab_dir_removed
        )


def validate_lab_request(
    hosts: int,
    *,
    netns: bool = False,
    link_mbps: int | None = None,
    memory_per_host_bytes: int | None = None,
    disk_per_host_bytes: int | None = None,
) -> None:
    """Check ``lab up``'s arguments before anything is touched.

    Raises:
        ConfigError: a value is out of range or the combination makes no sense.
    """
    if isinstance(hosts, bool) or not 1 <= hosts <= MAX_HOSTS:
        raise ConfigError(f"--hosts must be 1..{MAX_HOSTS}, not {hosts}")
    if link_mbps is not None:
        if not netns:
            raise ConfigError(
                "--link-mbps shapes the links between network namespaces: add --netns"
            )
        if isinstance(link_mbps, bool) or not 1 <= link_mbps <= MAX_LINK_MBPS:
            raise ConfigError(f"--link-mbps must be 1..{MAX_LINK_MBPS}, not {link_mbps}")
    if memory_per_host_bytes is not None and memory_per_host_bytes <= 0:
        raise ConfigError(f"memory per host must be positive, not {memory_per_host_bytes}")
    if disk_per_host_bytes is not None and disk_per_host_bytes <= 0:
        raise ConfigError(f"disk space per host must be positive, not {disk_per_host_bytes}")


def default_memory_per_host_bytes(hosts: int, mem_total_bytes: int) -> int:
    """Each host's share of this machine: ``min(8 GiB, (MemTotal - 2 GiB) // hosts)``.

    Raises:
        ConfigError: the machine has too little memory to share.
    """
    share = (mem_total_bytes - RESERVED_MEMORY_BYTES) // hosts
    if share <= 0:
        raise ConfigError(
            f"this machine has {mem_total_bytes // 2**20} MiB; "
            "too little for a lab (2 GiB are kept for the host)"
        )
    return min(MAX_MEMORY_PER_HOST_BYTES, share)


def mem_total_bytes() -> int:
    """This machine's memory (MemTotal).

    Raises:
        ConfigError: /proc/meminfo does not say.
    """
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise ConfigError("MemTotal missing from /proc/meminfo")


# --------------------------------------------------------------------------------------- up


async def lab_up(
    hosts: int,
    *,
    netns: bool = False,
    link_mbps: int | None = None,
    lab_dir: Path | None = None,
    memory_per_host_bytes: int | None = None,
    disk_per_host_bytes: int | None = None,
) -> Inventory:
    """Start a lab: ``hosts`` agents (host-1..host-N), on loopback or in network namespaces.

    Agents run detached and outlive the caller. If anything fails midway, everything started
    so far is stopped and removed again. Each agent finds (or builds) the guest image at start:
    warm the cache first (``build_image``, as the CLI does), or a cold build runs once per agent
    inside the ready timeout.

    Args:
        hosts: how many hosts, 1..16.
        netns: give each host its own network namespace (needs root).
        link_mbps: shape each host's link to this rate in both directions (needs ``netns``).
        lab_dir: where the lab keeps its state; default :func:`default_lab_dir`.
        memory_per_host_bytes: the memory each agent may hand to VMs; default
            :func:`default_memory_per_host_bytes`.
        disk_per_host_bytes: the space each agent may give local disk images (sum of their
            virtual sizes); default: the free space of the lab directory's filesystem.
            Every host also sees ``<lab_dir>/shared`` as shared storage.

    Returns:
        The saved inventory.

    Raises:
        ConfigError: bad arguments, not root with ``netns``, or a lab (or its leftovers) exists.
        AgentStartError: an agent exited or did not become ready in time.
        NetworkCommandError: setting up the namespaces failed.
    """
    validate_lab_request(
        hosts,
        netns=netns,
        link_mbps=link_mbps,
        memory_per_host_bytes=memory_per_host_bytes,
        disk_per_host_bytes=disk_per_host_bytes,
    )
    if netns:
        lab_netns.require_root()
    directory = lab_dir or default_lab_dir()
    memory = memory_per_host_bytes or default_memory_per_host_bytes(hosts, mem_total_bytes())
    if (directory / "lab.json").exists():
        raise ConfigError(f"a lab is already up at {directory}: run `vmferry lab down` first")
    subnet = None
    if netns:
        leftovers = lab_netns.existing_namespaces()
        if leftovers:
            raise ConfigError(
                f"lab namespaces exist ({', '.join(leftovers)}): run `vmferry lab down` first"
            )
        subnet = await lab_netns.choose_subnet()
    directory.mkdir(parents=True, exist_ok=True)
    try:
        # Claims the directory: a second `lab up` racing this one fails here.
        (directory / _HOSTS_DIR).mkdir()
    except FileExistsError:
        raise ConfigError(
            f"leftovers of a lab are in {directory}: run `vmferry lab down` first"
        ) from None
    try:
        inventory = await _start(directory, hosts, subnet, link_mbps, memory, disk_per_host_bytes)
    except BaseException as err:
        logger.error("lab.up failed (%s); undoing", str(err) or type(err).__name__)
        try:
            await asyncio.shield(lab_down(directory))
        except FerryError as undo_err:
            # The original failure is the one to report; the undo's goes to the log.
            logger.error("lab.up undo incomplete: %s (run `vmferry lab down`)", undo_err)
        raise
    logger.info("lab.up hosts=%d netns=%s link_mbps=%s dir=%s", hosts, netns, link_mbps, directory)
    return inventory


async def _start(
    directory: Path,
    hosts: int,
    subnet: str | None,
    link_mbps: int | None,
    memory_bytes: int,
    disk_bytes: int | None,
) -> Inventory:
    token = secrets.token_urlsafe(32)
    token_file = directory / "token"
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")

    network: lab_netns.LabNetwork | None = None
    if subnet is not None:
        # Written first so `lab down` knows this lab owns the namespaces, even after a crash.
        (directory / _NETWORK_FILE).write_text(
            json.dumps({"subnet": subnet, "link_mbps": link_mbps}) + "\n"
        )
        network = await lab_netns.setup(
            hosts, link_mbps=link_mbps, subnet=subnet, owner=str(directory.resolve())
        )

    ca = pki.make_ca(directory / _TLS_DIR)
    procs: list[tuple[str, Path, asyncio.subprocess.Process]] = []
    for index in range(1, hosts + 1):
        name = f"host-{index}"
        ns = network.hosts[index - 1] if network else None
        address = ns.address if ns else "127.0.0.1"
        state_dir = directory / _HOSTS_DIR / name
        state_dir.mkdir()
        argv = _agent_argv(name, address, state_dir, token_file, memory_bytes)
        argv += ["--shared-dir", str(directory / SHARED_DIR)]
        cert = pki.issue_server_cert(ca, name, address)  # SAN = the address it listens on
        argv += ["--tls-cert", str(cert.cert_file), "--tls-key", str(cert.key_file)]
        # QEMU's own credentials for `migrate --tls` (SAN = the migration address). Private
        # to root here: an agent whose QEMU drops root copies them where QEMU's group reads.
        qemu_tls = pki.issue_qemu_creds(ca, name, address, state_dir / "qemu-tls")
        argv += ["--qemu-tls-dir", str(qemu_tls)]
        if disk_bytes is not None:
            argv += ["--disk", str(disk_bytes)]
        if ns:
            argv = ["ip", "netns", "exec", ns.netns, *argv]
        (state_dir / _ARGV_FILE).write_text(json.dumps(argv) + "\n")  # for `lab restart`
        procs.append((name, state_dir, await _spawn(argv, state_dir)))

    entries: list[HostEntry] = []
    waiting_for = procs[0]
    try:
        async with asyncio.timeout(READY_TIMEOUT_S):
            for waiting_for in procs:
                url, pid = await _wait_ready(*waiting_for)
                index = len(entries)
                entries.append(
                    HostEntry(
                        name=waiting_for[0],
                        url=url,
                        pid=pid,
                        state_dir=str(waiting_for[1]),
                        address=network.hosts[index].address if network else "127.0.0.1",
                        netns=network.hosts[index].netns if network else None,
                    )
                )
    except TimeoutError:
        name, state_dir, _ = waiting_for
        raise AgentStartError(
            name, f"was not ready within {READY_TIMEOUT_S:g} s", None, _log_tail(state_dir)
        ) from None
    inventory = Inventory(
        directory=directory,
        token=token,
        hosts=tuple(entries),
        netns=network is not None,
        link_mbps=link_mbps,
        ca_file=ca.cert_file,
    )
    inventory.save()
    return inventory


def _agent_argv(
    name: str, address: str, state_dir: Path, token_file: Path, memory_bytes: int
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "vmferry.cli.main",
        "agent",
        "--host",
        name,
        "--listen",
        f"{address}:0",
        "--state-dir",
        str(state_dir),
        "--token-file",
        str(token_file),
        "--memory",
        str(memory_bytes),
        "--migration-address",
        address,
        "--ready-file",
        str(state_dir / "ready.json"),
    ]


async def _spawn(argv: list[str], state_dir: Path) -> asyncio.subprocess.Process:
    log_fd = os.open(state_dir / "agent.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log_fd,
            stderr=log_fd,
            start_new_session=True,  # detached: survives the CLI and its terminal
        )
    except OSError as err:
        raise AgentStartError(state_dir.name, f"could not start: {err}", None, "") from err
    finally:
        os.close(log_fd)
    # Recorded at once so `lab down` finds it even if we crash before it is ready.
    (state_dir / "agent.pid").write_text(f"{proc.pid}\n")
    logger.debug("agent %s spawned pid=%d argv=%s", state_dir.name, proc.pid, argv)
    return proc


async def _wait_ready(
    name: str, state_dir: Path, proc: asyncio.subprocess.Process
) -> tuple[str, int]:
    """Wait for the agent's ready file; the caller bounds the wait with a deadline.

    Raises:
        AgentStartError: the agent exited first.
    """
    ready_file = state_dir / "ready.json"
    while True:
        ready = read_ready(ready_file)
        if ready is not None:
            return ready
        if proc.returncode is not None:
            raise AgentStartError(
                name, "exited before it was ready", proc.returncode, _log_tail(state_dir)
            )
        # No file-appeared event without inotify; the agent's exit is polled alongside.
        await asyncio.sleep(0.05)


async def lab_restart(name: str, lab_dir: Path | None = None) -> HostEntry:
    """Start host ``name``'s agent again after it died (or was killed), with the arguments
    and the port it had, so controllers still holding its URL reach it again. The new agent
    adopts the VMs its predecessor left running and settles half-done migrations.

    Raises:
        ConfigError: no lab, unknown host, or its agent still runs.
        AgentStartError: it exited or was not ready in time.
    """
    directory = lab_dir or default_lab_dir()
    inventory = Inventory.load(directory)
    entry = inventory.host(name)
    if entry.pid is not None and is_agent(entry.pid):
        raise ConfigError(f"{name}'s agent is running (pid {entry.pid}): nothing to restart")
    state_dir = Path(entry.state_dir)
    try:
        argv = [str(arg) for arg in json.loads((state_dir / _ARGV_FILE).read_text())]
    except (OSError, ValueError) as err:
        raise ConfigError(f"{name} was not started by this lab ({err})") from None
    port = entry.url.rsplit(":", 1)[1]
    listen = argv.index("--listen") + 1
    argv[listen] = f"{argv[listen].rsplit(':', 1)[0]}:{port}"
    (state_dir / "ready.json").unlink(missing_ok=True)
    proc = await _spawn(argv, state_dir)
    try:
        async with asyncio.timeout(READY_TIMEOUT_S):
            url, pid = await _wait_ready(name, state_dir, proc)
    except TimeoutError:
        raise AgentStartError(
            name, f"was not ready within {READY_TIMEOUT_S:g} s", None, _log_tail(state_dir)
        ) from None
    restarted = replace(entry, url=url, pid=pid)
    hosts = tuple(restarted if h.name == name else h for h in inventory.hosts)
    replace(inventory, hosts=hosts).save()
    logger.info("lab.restart %s pid=%d url=%s", name, pid, url)
    return restarted


def _log_tail(state_dir: Path) -> str:
    return tail_lines(state_dir / "agent.log", _LOG_TAIL_LINES)


# ----------------------------------------------------------------------------------- status


async def lab_status(lab_dir: Path | None = None) -> list[HostStatus]:
    """Ask every host's agent about its host (``GET /v1/host``), all at once.

    Raises:
        ConfigError: there is no lab.
    """
    inventory = Inventory.load(lab_dir)
    timeout = aiohttp.ClientTimeout(total=STATUS_TIMEOUT_S)
    headers = {"Authorization": f"Bearer {inventory.token}"}
    # One context for all: every agent of a lab serves the same scheme and CA.
    tls = agent_ssl(inventory.hosts[0].url, inventory.ca_file) if inventory.hosts else False
    connector = aiohttp.TCPConnector(ssl=tls)
    async with aiohttp.ClientSession(
        timeout=timeout, headers=headers, connector=connector
    ) as session:
        return list(await asyncio.gather(*(_probe(session, h) for h in inventory.hosts)))


async def _probe(session: aiohttp.ClientSession, host: HostEntry) -> HostStatus:
    alive = host.pid is not None and is_agent(host.pid)
    info: dict[str, object] | None = None
    error: str | None = None
    try:
        async with asyncio.timeout(STATUS_TIMEOUT_S):
            async with session.get(f"{host.url}/v1/host") as response:
                if response.status != 200:
                    error = f"HTTP {response.status}: {(await response.text())[:200]}"
                else:
                    body = await response.json()
                    if isinstance(body, dict):
                        info = body
                    else:
                        error = "answer is not a JSON object"
    except TimeoutError:
        error = f"no answer within {STATUS_TIMEOUT_S:g} s"
    except (aiohttp.ClientError, ValueError) as err:
        error = str(err) or type(err).__name__
    return HostStatus(
        name=host.name,
        url=host.url,
        reachable=info is not None,
        pid_alive=alive,
        info=info,
        error=error,
    )


# ------------------------------------------------------------------------------------- down


async def lab_down(lab_dir: Path | None = None) -> DownReport:
    """Stop everything a lab started and remove its state. Idempotent; works after a crash.

    Agents and QEMUs are found from the inventory *and* from the files under ``hosts/`` (so a
    lab whose inventory was never written or whose agents died is cleaned up too). A process is
    only signalled if its command line shows it is ours (survives PID reuse). Files in the lab
    directory that the lab did not make (e.g. ``history.db``) are kept.

    Returns:
        What was stopped and removed (all zero: there was nothing to do).

    Raises:
        ConfigError: namespaces must be removed but we are not root.
        NetworkCommandError: removing the namespaces failed.
    """
    directory = lab_dir or default_lab_dir()
    inventory: Inventory | None = None
    with contextlib.suppress(ConfigError):
        inventory = Inventory.load(directory)
    state_dirs = _state_dirs(directory, inventory)

    agents_found = agent_pids(state_dirs, inventory)
    # QEMUs an agent runs but has not recorded yet (e.g. its start-up KVM probe) are found as
    # its children, before stopping it orphans them.
    children = qemu_children(agents_found)
    agents = await stop_pids(agents_found, is_agent)
    # After the agents, so none of them starts or restarts a QEMU behind our back.
    qemus = await stop_pids(qemu_pids(state_dirs) | children, is_qemu)

    namespaces = await lab_netns.teardown() if await _owns_network(directory, inventory) else 0
    removed = _remove_state(directory)
    report = DownReport(
        agents_stopped=agents,
        qemus_stopped=qemus,
        namespaces_removed=namespaces,
        lab_dir_removed=removed,
    )
    logger.info("lab.down %s dir=%s", report, directory)
    return report


async def _owns_network(directory: Path, inventory: Inventory | None) -> bool:
    """Whether this lab's `down` should remove the (machine-global) lab network."""
    if (directory / _NETWORK_FILE).exists() or (inventory is not None and inventory.netns):
        return True
    if (directory / "lab.json").exists() or (directory / _HOSTS_DIR).exists():
        return False  # a loopback lab: the namespaces, if any, belong to another lab
    # No lab here at all: remove an orphaned network (its lab directory is gone, so no `lab
    # down` could ever claim it), but never another live lab's.
    owner = await lab_netns.network_owner()
    if owner and (Path(owner) / _NETWORK_FILE).exists():
        logger.info("lab network belongs to the lab in %s; left alone", owner)
        return False
    if not lab_netns.existing_namespaces():
        return True  # at most stray links of a crashed setup; otherwise a no-op
    if os.geteuid() != 0:
        return False  # a root's lab: not ours to judge, and we could not remove it anyway
    busy = await lab_netns.namespaces_in_use()
    if busy:
        logger.info("lab network in use (%s); left alone", ", ".join(busy))
    return not busy


def _state_dirs(directory: Path, inventory: Inventory | None) -> list[Path]:
    found = {Path(h.state_dir) for h in inventory.hosts} if inventory else set()
    with contextlib.suppress(OSError):
        found.update(p for p in (directory / _HOSTS_DIR).iterdir() if p.is_dir())
    return sorted(found)


def _remove_state(directory: Path) -> bool:
    """Remove what the lab made in its directory, then the directory if nothing else is left."""
    removed = False
    for name in ("lab.json", "lab.tmp", "token", "token.tmp", "history.db", _NETWORK_FILE):
        with contextlib.suppress(FileNotFoundError):
            (directory / name).unlink()
            removed = True
    # ``serve``: the default state directory of ``vmferry serve`` (its tokens) for this lab.
    for owned in (_HOSTS_DIR, SHARED_DIR, _TLS_DIR, "serve"):
        if (directory / owned).exists():
            shutil.rmtree(directory / owned)
            removed = True
    with contextlib.suppress(OSError):
        directory.rmdir()  # only if empty: a user-chosen directory may hold other things
    return removed
