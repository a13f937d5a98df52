"""A running VM on this machine: its QEMU process, QMP session and, for the lab guest, the
lab channel.

:func:`launch` starts one QEMU instance (a fresh guest, or an empty destination waiting for an
incoming migration) and returns a :class:`RunningVm` that must be closed with
:meth:`RunningVm.stop`, which always reaps the process.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from vmferry.core.errors import ConfigError, FerryError, GuestError
from vmferry.core.heartbeat import HeartbeatGaps
from vmferry.core.model import GuestAgentCheck, IntegrityReport, VmSpec
from vmferry.guest.channel import GuestChannel
from vmferry.guest.protocol import Corrupted, corrupt_command
from vmferry.qemu.argv import Accel, BootFiles, RuntimePaths, build_argv
from vmferry.qemu.guest_agent import GuestAgent
from vmferry.qemu.process import QemuProcess, tail_lines
from vmferry.qemu.session import QmpSession

__all__ = [
    "BOOT_TIMEOUT_S",
    "IDLE_HEARTBEAT_HZ",
    "RunningVm",
    "check_guest_agent",
    "launch",
    "reattach",
]

logger = logging.getLogger(__name__)

# Boot to READY under TCG takes ~4 s plus writing the working set; leave ample room on a busy
# 2-core machine.
BOOT_TIMEOUT_S = 90.0
_START_TIMEOUT_S = 15.0
# After a move a guest agent that ran before answers at once; one that never ran costs this.
_GUEST_AGENT_PING_S = 2.0
_GUEST_AGENT_CALL_S = 5.0
# The lab guest's heartbeat rate while no move measures its stalls (a gap up to 50 ms then
# says nothing; a move raises the rate to its workload's first).
IDLE_HEARTBEAT_HZ = 20
_RATE_TIMEOUT_S = 2.0  # the guest reads commands at least every 50 ms


def _verify_timeout_s(spec: VmSpec) -> float:
    # Checksumming under TCG runs at a few hundred MB/s at worst, reading the disk region back
    # about as fast; be generous (a disk write in flight may also be slowed by a mirror).
    disk = 0 if spec.disk is None else spec.workload.disk_region_bytes(spec.disk.size_bytes)
    return 30.0 + (spec.workload.size_bytes + disk) / (20 << 20)


@dataclass(slots=True)
class RunningVm:
    """One QEMU instance and the connections vmferry holds to it. The lab guest has a lab
    channel (heartbeats, page checks); a user's guest is reached through its guest agent, if
    it runs one, and has the channel for heartbeats only if it asked for one."""

    spec: VmSpec
    role: str
    paths: RuntimePaths
    process: QemuProcess
    qmp: QmpSession
    channel: GuestChannel | None
    heartbeats: HeartbeatGaps

    @property
    def label(self) -> str:
        return f"{self.spec.name}@{self.role}"

    @property
    def guest_agent(self) -> GuestAgent:
        """The guest's qemu-guest-agent port (it answers only if the guest runs one)."""
        return GuestAgent(self.paths.guest_agent_socket, self.label)

    @property
    def lab_channel(self) -> GuestChannel:
        """Raises: ConfigError: the VM runs a guest of its own (heartbeats at most)."""
        if self.channel is None or not self.spec.is_lab_guest:
            raise ConfigError(
                f"VM {self.spec.name} runs its own guest: only the lab guest checks its pages "
                "(its moves are verified by comparing digests of both copies)"
            )
        return self.channel

    async def verify(self) -> IntegrityReport:
        """Ask the guest to check every page of its working set and every block of its disk
        region (a VM with a disk whose guest checked no block is not ok).

        Raises:
            GuestError: the guest did not answer.
        """
        result = await self.lab_channel.verify(_verify_timeout_s(self.spec))
        disk_ok = self.spec.disk is None or (result.blocks_checked > 0 and result.bad_blocks == 0)
        return IntegrityReport(
            ok=result.bad_pages == 0 and result.pages_checked > 0 and disk_ok,
            pages_checked=result.pages_checked,
            bad_pages=result.bad_pages,
            blocks_checked=result.blocks_checked,
            bad_blocks=result.bad_blocks,
        )

    async def heartbeat_for(self, *, measuring: bool) -> None:
        """Best effort: the lab guest's heartbeats at its workload's rate while a move measures
        its stalls (``measuring``), else at :data:`IDLE_HEARTBEAT_HZ` (each heartbeat costs its
        QEMU and this agent CPU: at 200 Hz ~25 % of a core between them under TCG). A guest
        built before the rate command keeps its rate."""
        if self.channel is None or not self.spec.is_lab_guest:
            return
        full_hz = self.spec.workload.heartbeat_hz
        hz = full_hz if measuring else min(IDLE_HEARTBEAT_HZ, full_hz)
        try:
            await self.channel.set_heartbeat_rate(hz, _RATE_TIMEOUT_S)
        except (GuestError, OSError) as err:
            logger.info("vm.heartbeat_rate %s %d Hz: %s", self.label, hz, err)

    async def corrupt(self, page: int) -> None:
        """Damage one working-set page behind the guest's bookkeeping (for tests and drills).

        Raises:
            GuestError: the guest did not confirm.
        """
        await self.lab_channel.request(corrupt_command(page), Corrupted, 10.0)

    async def detach(self) -> None:
        """Drop our connections and leave QEMU running (agent shutdown or restart)."""
        if self.channel is not None:
            await self.channel.close()
        await self.qmp.close()

    async def stop(self) -> None:
        """Disconnect and end QEMU; always reaps the process."""
        try:
            if self.channel is not None:
                await self.channel.close()
            await self.qmp.close()
        finally:
            await self.process.stop()


async def launch(
    qemu: str,
    spec: VmSpec,
    boot: BootFiles,
    directory: Path,
    *,
    role: str,
    accel: Accel,
    heartbeats: HeartbeatGaps,
    incoming: bool = False,
    disk_image: Path | None = None,
    run_as: str | None = None,
    hold: bool = False,
    firmware: Path | None = None,
) -> RunningVm:
    """Start QEMU for ``spec`` in ``directory`` and connect QMP and the lab channel.

    With ``incoming`` QEMU waits (``-incoming defer``) for a migration (``hold``: and keeps
    the guest paused once it has arrived); otherwise it boots the guest and, for the lab
    guest, returns once its workload reports READY (a user's guest boots on meanwhile). With
    ``run_as`` QEMU drops root to that user once its files and sockets are open.

    Raises:
        QEMULaunchError: QEMU would not start.
        QMPConnectError, QMPTimeout: its QMP socket did not answer.
        GuestError: the guest did not become ready.
    """
    paths = RuntimePaths(directory)
    for path in {directory, paths.socket_dir}:
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
    argv = build_argv(
        qemu,
        spec,
        boot,
        paths,
        accel=accel,
        incoming=incoming,
        disk_image=disk_image,
        run_as=run_as,
        hold=hold,
        firmware=firmware,
    )
    process = QemuProcess(argv, paths.qemu_log, f"{spec.name}.{role}")
    qmp = QmpSession(f"{spec.name}.{role}")
    channel = GuestChannel(f"{spec.name}.{role}", heartbeats) if spec.has_heartbeats else None
    vm = RunningVm(spec, role, paths, process, qmp, channel, heartbeats)
    await process.start()
    try:
        if process.pid is not None:
            (directory / "qemu.pid").write_text(f"{process.pid}\n")
        await process.wait_for_socket(paths.qmp_socket, _START_TIMEOUT_S)
        await qmp.connect(paths.qmp_socket)
        if channel is not None:
            await channel.connect(paths.channel_socket)
        # An own guest that sends heartbeats boots on (its program starts late, if at all).
        if channel is not None and not incoming and spec.is_lab_guest:
            try:
                await channel.wait_ready(BOOT_TIMEOUT_S)
            except GuestError as err:
                console = (
                    tail_lines(paths.console_log, 20)
                    if paths.console_log.exists()
                    else "(no console output)"
                )
                raise GuestError(f"{err}; guest console ends with:\n{console}") from err
    except BaseException:
        await vm.stop()
        raise
    if not incoming:
        await vm.heartbeat_for(measuring=False)
    logger.info("vm.launched %s pid=%s accel=%s", vm.label, process.pid, accel)
    return vm


async def reattach(spec: VmSpec, directory: Path, *, role: str, pid: int) -> RunningVm:
    """Take over a QEMU that an earlier agent started (the VM kept running meanwhile).

    Raises:
        QMPConnectError, QMPTimeout: its QMP socket does not answer.
        GuestError: its guest channel is unreachable.
    """
    paths = RuntimePaths(directory)
    process = QemuProcess.adopt(pid, paths.qemu_log, f"{spec.name}.{role}")
    qmp = QmpSession(f"{spec.name}.{role}")
    heartbeats = HeartbeatGaps()
    channel = GuestChannel(f"{spec.name}.{role}", heartbeats) if spec.has_heartbeats else None
    vm = RunningVm(spec, role, paths, process, qmp, channel, heartbeats)
    try:
        await qmp.connect(paths.qmp_socket)
        if channel is not None:
            await channel.connect(paths.channel_socket, timeout_s=5.0)
    except BaseException:
        # Only drop our connections: the guest itself must keep running.
        if channel is not None:
            await channel.close()
        await qmp.close()
        raise
    logger.info("vm.reattached %s pid=%s", vm.label, pid)
    return vm


async def check_guest_agent(vm: RunningVm) -> GuestAgentCheck:
    """Ping the guest's agent and set its clock from the host's (the guest slept through the
    switchover; OpenStack Nova does the same after a move). A guest without an agent answers
    nothing: that is reported, not raised."""
    agent = vm.guest_agent
    if not await agent.ping(_GUEST_AGENT_PING_S):
        logger.info("guest_agent.silent %s", vm.label)
        return GuestAgentCheck(answered=False)
    try:
        await agent.sync_time(_GUEST_AGENT_CALL_S)
        guest_ns = await agent.guest_time_ns(_GUEST_AGENT_CALL_S)
    except FerryError as err:
        logger.warning("guest_agent.time_failed %s: %s", vm.label, err)
        return GuestAgentCheck(answered=True)
    offset_ms = round((guest_ns - time.time_ns()) / 1e6)
    return GuestAgentCheck(answered=True, clock_synced=True, clock_offset_ms=offset_ms)
