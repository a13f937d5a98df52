"""The one-machine lab in one process: a host agent per lab host, moved between by the engine
``vmferry migrate`` runs.

Each host (``host-1``, ``host-2``, …) is a :class:`~vmferry.agent.host.HostAgent` with its own
state directory under the lab's workdir, all sharing this machine's QEMU, guest image and
accelerator. The controller speaks to them through in-process agents
(:class:`~vmferry.agent.inproc.InProcessAgent`, no HTTP) gathered in a
:class:`~vmferry.controller.cluster.Cluster`, so :meth:`LocalLab.migrate` is
:func:`vmferry.controller.migrate.migrate`, the same code as the CLI's.

Example:
    >>> async with await LocalLab.open() as lab:                         # doctest: +SKIP
    ...     await lab.boot(VmSpec.build("vm1", workload=parse_workload("idle")), "host-1")
    ...     report = await lab.migrate("vm1", "host-2", strategy="precopy", plan=False)
    ...     print(report.to_json())
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from collections.abc import Mapping
from contextlib import AsyncExitStack
from pathlib import Path
from types import TracebackType

from vmferry.agent.accel import probe_accel
from vmferry.agent.api import NotFound
from vmferry.agent.host import AgentConfig, HostAgent
from vmferry.agent.inproc import InProcessAgent
from vmferry.agent.vm import RunningVm
from vmferry.controller.cluster import Cluster
from vmferry.controller.inventory import HostEntry, Inventory
from vmferry.controller.migrate import MigrationRequest, ProgressCallback, migrate
from vmferry.core.errors import ConfigError, FerryError, GuestAgentTimeout
from vmferry.core.handoff import VerifyMode
from vmferry.core.model import MigrationReport, VmSpec
from vmferry.guest.image import GuestImage, build_image
from vmferry.lab.cluster import MAX_HOSTS, SHARED_DIR, default_memory_per_host_bytes
from vmferry.lab.cluster import mem_total_bytes as machine_memory_bytes
from vmferry.qemu.argv import Accel, BootFiles
from vmferry.qemu.binary import QemuBinary, find_qemu

__all__ = ["LocalLab"]

logger = logging.getLogger(__name__)

_LOOPBACK = "127.0.0.1"


def _instance(agent: HostAgent, name: str) -> RunningVm | None:
    """The QEMU instance ``agent`` runs for VM ``name`` (None: none).

    The lab hands its callers the instances themselves (to read heartbeats, corrupt a page,
    ask QMP), which no agent API offers; this is the one place it reaches into an agent.
    """
    try:
        return agent.slots.get(name).vm
    except NotFound:
        return None


class LocalLab:
    """Hosts ``host-1`` … ``host-N`` of this machine, each an agent in this process.

    Owns every QEMU its agents start; :meth:`close` (or leaving ``async with``) ends them all.
    Build it with :meth:`open`.
    """

    def __init__(
        self,
        qemu: QemuBinary,
        image: GuestImage,
        accel: Accel,
        workdir: Path,
        owns_workdir: bool,
        agents: Mapping[str, HostAgent],
    ) -> None:
        self.qemu = qemu
        self.image = image
        self.accel = accel
        self.workdir = workdir
        self._owns_workdir = owns_workdir
        self._agents = dict(agents)
        inventory = Inventory(
            directory=workdir,
            token="",  # nothing to authenticate to: the agents are in this process
            hosts=tuple(
                HostEntry(
                    name=host,
                    url=f"inproc:{host}",
                    pid=None,
                    state_dir=str(agent.config.state_dir),
                    address=agent.config.migration_address,
                )
                for host, agent in self._agents.items()
            ),
        )
        self.cluster = Cluster(
            inventory, {host: InProcessAgent(host, agent) for host, agent in self._agents.items()}
        )
        self._stop = asyncio.Event()
        # Holds the agents' task group open from _start() to close(); None before and after.
        self._keeper: asyncio.Task[None] | None = None
        self._stack = AsyncExitStack()

    @property
    def boot_files(self) -> BootFiles:
        return BootFiles(self.image.kernel_path, self.image.initrd_path)

    @property
    def hosts(self) -> tuple[str, ...]:
        return tuple(self._agents)

    @classmethod
    async def open(
        cls,
        workdir: Path | None = None,
        accel: Accel | None = None,
        hosts: int = 2,
        profile_interval_s: float | None = None,
    ) -> LocalLab:
        """Check QEMU, build (or reuse) the guest image, pick the accelerator, start the agents
        of ``hosts`` hosts (``host-1`` …). Unlike ``vmferry agent``, these agents keep no
        rolling profiles unless ``profile_interval_s`` is given: the lab's callers drive
        QEMU themselves (a background ``calc-dirty-rate`` would collide with theirs).

        Raises:
            ConfigError: ``hosts`` out of range, or too little memory to share.
            QEMUNotFound: no usable QEMU.
            ImageBuildError: the guest image cannot be built.
        """
        if not 1 <= hosts <= MAX_HOSTS:
            raise ConfigError(f"a lab has 1..{MAX_HOSTS} hosts, not {hosts}")
        qemu = await find_qemu()
        owns = workdir is None
        if workdir is None:
            workdir = Path(tempfile.mkdtemp(prefix="vmferry-lab-"))
        workdir.mkdir(parents=True, exist_ok=True)
        image = await asyncio.to_thread(build_image)
        boot = BootFiles(image.kernel_path, image.initrd_path)
        chosen = accel or await probe_accel(qemu, boot, workdir)
        memory_bytes = default_memory_per_host_bytes(hosts, machine_memory_bytes())
        (workdir / SHARED_DIR).mkdir(exist_ok=True)
        agents = {
            name: HostAgent(
                AgentConfig(
                    host=name,
                    state_dir=workdir / "hosts" / name,
                    memory_bytes=memory_bytes,
                    migration_address=_LOOPBACK,
                    shared_dir=workdir / SHARED_DIR,
                    profile_interval_s=profile_interval_s,
                ),
                qemu,
                boot,
                chosen,
            )
            for name in (f"host-{index}" for index in range(1, hosts + 1))
        }
        lab = cls(qemu, image, chosen, workdir, owns, agents)
        try:
            await lab._start()
        except BaseException:
            await lab.close()
            raise
        logger.info(
            "lab.open qemu=%s accel=%s hosts=%d dir=%s", qemu.version_text, chosen, hosts, workdir
        )
        return lab

    async def _start(self) -> None:
        held: asyncio.Future[asyncio.TaskGroup] = asyncio.get_running_loop().create_future()
        # The agents' background work (outgoing migrations) runs in one task group, held open
        # by this task until close(); the lab owns it and awaits it there.
        self._keeper = asyncio.create_task(self._hold(held), name="lab-agents")
        tasks = await held
        for agent in self._agents.values():
            await agent.start(tasks)
        await self._stack.enter_async_context(self.cluster)

    async def _hold(self, held: asyncio.Future[asyncio.TaskGroup]) -> None:
        async with asyncio.TaskGroup() as tasks:
            held.set_result(tasks)
            await self._stop.wait()

    async def __aenter__(self) -> LocalLab:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- VMs -----------------------------------------------------------------------------------

    @property
    def vms(self) -> dict[str, RunningVm]:
        """The QEMU instance holding each VM's guest now (a snapshot)."""
        found: dict[str, RunningVm] = {}
        for name in sorted({info.name for a in self._agents.values() for info in a.list_vms()}):
            vm = self._holder(name)
            if vm is not None:
                found[name] = vm
        return found

    def _holder(self, name: str) -> RunningVm | None:
        # As `vmferry` locates a VM: where it runs, or mid-migration its source.
        found = [
            (info.state == "incoming", agent)
            for agent in self._agents.values()
            for info in agent.list_vms()
            if info.name == name
        ]
        for _incoming, agent in sorted(found, key=lambda pair: pair[0]):
            vm = _instance(agent, name)
            if vm is not None:
                return vm
        return None

    async def boot(
        self, spec: VmSpec, host: str = "host-1", image: Path | None = None
    ) -> RunningVm:
        """Boot a new VM on ``host`` (through its agent): the lab guest, which this waits for
        until its workload is ready, or with ``image`` a guest of your own (a copy of it),
        which boots on meanwhile (see :meth:`wait_guest_agent`).

        Raises:
            ConfigError: the name is taken, no such host, no room there, a bad image.
            FerryError: it did not boot (as the agent reports it).
        """
        agent = self.cluster.client(host)
        await self.cluster.check_new_name(spec.name)
        await agent.create_vm(spec, image)
        return self.get(spec.name)

    async def wait_guest_agent(self, name: str, timeout_s: float) -> float:
        """Wait until VM ``name``'s guest agent answers; the seconds it took.

        Raises:
            GuestAgentTimeout: it did not answer within ``timeout_s``.
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        while loop.time() - started < timeout_s:
            if await self.get(name).guest_agent.ping(min(2.0, timeout_s)):
                return loop.time() - started
        raise GuestAgentTimeout(name, "guest-ping", timeout_s)

    def get(self, name: str) -> RunningVm:
        """The QEMU instance that holds VM ``name``'s guest.

        Raises:
            NotFound: no such VM.
        """
        vm = self._holder(name)
        if vm is None:
            raise NotFound(f"unknown VM {name!r}")
        return vm

    async def delete(self, name: str) -> None:
        """Stop VM ``name`` and forget it.

        Raises:
            NotFound: no such VM.
            StateError: it is migrating.
        """
        info = await self.cluster.locate(name)
        await self.cluster.client(info.host).delete_vm(name)

    async def migrate(
        self,
        name: str,
        to: str,
        *,
        strategy: str = "auto",
        max_downtime_ms: int = 300,
        deadline_s: float | None = None,
        bandwidth_mbps: int | None = None,
        plan: bool = True,
        force: bool = False,
        allow_postcopy: bool = True,
        verify: VerifyMode = VerifyMode.SAMPLE,
        on_progress: ProgressCallback | None = None,
    ) -> MigrationReport:
        """Live-migrate VM ``name`` to host ``to`` and verify it there, as
        ``vmferry migrate NAME --to TO`` does with the same options (see
        :class:`~vmferry.controller.migrate.MigrationRequest`).

        Returns the report; a failed migration is a report with status ``failed``.

        Raises:
            ConfigError: bad options, unknown VM or host, ``to`` is where it runs, no room;
                GoalUnreachable (``auto``) when no strategy meets the goal and not ``force``.
            StateError: the VM is already migrating.
        """
        request = MigrationRequest(
            vm=name,
            destination=to,
            strategy=strategy,
            max_downtime_ms=max_downtime_ms,
            deadline_s=deadline_s,
            bandwidth_mbps=bandwidth_mbps,
            force=force,
            allow_postcopy=allow_postcopy,
            plan=plan,
            verify=verify,
        )
        return await migrate(self.cluster, request, on_progress=on_progress)

    # -- teardown ------------------------------------------------------------------------------

    async def close(self) -> None:
        """End every QEMU this lab started and remove its directory if it made it.

        Raises:
            ExceptionGroup: an agent's background task failed (after everything was ended).
        """
        if self._stop.is_set():
            return  # closed already
        for agent in self._agents.values():
            agent.cancel_background()  # in-flight migrations cancel; guests stay at sources
        self._stop.set()
        failure: BaseException | None = None
        if self._keeper is not None:
            try:
                await self._keeper
            except Exception as err:
                failure = err
            self._keeper = None
        await self._stack.aclose()
        for agent in self._agents.values():
            await self._end_vms(agent)
            await agent.close()
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        if failure is not None:
            raise failure

    async def _end_vms(self, agent: HostAgent) -> None:
        for info in agent.list_vms():
            try:
                await agent.delete(info.name)
                continue
            except FerryError as err:
                logger.debug("lab.close: deleting %s: %s", info.name, err)
            vm = _instance(agent, info.name)
            if vm is None:
                continue
            try:
                await vm.stop()
            except (FerryError, OSError) as err:
                logger.error("lab.close: stopping %s: %s", vm.label, err)
