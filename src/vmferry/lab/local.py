"""The one-machine lab: lab guests on named hosts of this machine, moved between them live.

Example:
    >>> async with await LocalLab.open() as lab:                         # doctest: +SKIP
    ...     await lab.boot(VmSpec.build("vm1", workload=parse_workload("idle")), "host-1")
    ...     outcome = await lab.migrate("vm1", "host-2")
    ...     print(outcome.to_json())
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from pathlib import Path
from types import TracebackType

from vmferry.agent.accel import probe_accel
from vmferry.agent.vm import RunningVm, launch
from vmferry.core.errors import ConfigError, FerryError, StateError
from vmferry.core.heartbeat import HeartbeatGaps
from vmferry.core.model import MigrationOptions, MigrationReport, VmSpec, validate_name
from vmferry.guest.image import GuestImage, build_image
from vmferry.lab.migration import ProgressCallback, migrate_between
from vmferry.qemu.argv import Accel, BootFiles
from vmferry.qemu.binary import QemuBinary, find_qemu

__all__ = ["LocalLab"]

logger = logging.getLogger(__name__)

_KVM_PROBE_TIMEOUT_S = 12.0


class LocalLab:
    """Lab guests on hosts of this machine (``host-1``, ``host-2``, …: QEMU processes here).

    Owns every QEMU it starts; :meth:`close` (or leaving ``async with``) ends them all.
    """

    def __init__(
        self, qemu: QemuBinary, image: GuestImage, accel: Accel, workdir: Path, owns_workdir: bool
    ) -> None:
        self.qemu = qemu
        self.image = image
        self.accel = accel
        self.workdir = workdir
        self._owns_workdir = owns_workdir
        self.vms: dict[str, RunningVm] = {}
        self._busy: set[str] = set()

    @property
    def boot_files(self) -> BootFiles:
        return BootFiles(self.image.kernel_path, self.image.initrd_path)

    @classmethod
    async def open(cls, workdir: Path | None = None, accel: Accel | None = None) -> LocalLab:
        """Check QEMU, build (or reuse) the guest image, pick the accelerator.

        Raises:
            QEMUNotFound: no usable QEMU.
            ImageBuildError: the guest image cannot be built.
        """
        qemu = await find_qemu()
        owns = workdir is None
        if workdir is None:
            workdir = Path(tempfile.mkdtemp(prefix="vmferry-lab-"))
        workdir.mkdir(parents=True, exist_ok=True)
        image = await asyncio.to_thread(build_image)
        boot = BootFiles(image.kernel_path, image.initrd_path)
        chosen = accel or await probe_accel(qemu, boot, workdir)
        logger.info("lab.open qemu=%s accel=%s dir=%s", qemu.version_text, chosen, workdir)
        return cls(qemu, image, chosen, workdir, owns)

    async def __aenter__(self) -> LocalLab:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _directory(self, host: str, name: str) -> Path:
        return self.workdir / validate_name(host, "host name") / validate_name(name)

    async def boot(self, spec: VmSpec, host: str = "host-1") -> RunningVm:
        """Boot a new lab guest on ``host`` and wait until its workload is ready.

        Raises:
            ConfigError: the name is taken.
            QEMULaunchError, GuestError: it did not boot.
        """
        if spec.name in self.vms:
            raise ConfigError(f"VM {spec.name!r} already exists on {self.vms[spec.name].role}")
        vm = await launch(
            self.qemu.path,
            spec,
            self.boot_files,
            self._directory(host, spec.name),
            role=host,
            accel=self.accel,
            heartbeats=HeartbeatGaps(),
        )
        self.vms[spec.name] = vm
        return vm

    def get(self, name: str) -> RunningVm:
        """The running instance of VM ``name``.

        Raises:
            ConfigError: no such VM.
        """
        try:
            return self.vms[name]
        except KeyError:
            raise ConfigError(f"unknown VM {name!r}") from None

    async def migrate(
        self,
        name: str,
        to: str,
        *,
        options: MigrationOptions | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> MigrationReport:
        """Live-migrate VM ``name`` to host ``to`` and verify it there.

        Returns the report; a failed migration leaves the VM running where it was.

        Raises:
            ConfigError: unknown VM, bad host name, or ``to`` is where it already runs.
            StateError: the VM is already migrating.
        """
        vm = self.get(name)
        validate_name(to, "host name")
        if vm.role == to:
            raise ConfigError(f"VM {name!r} already runs on {to}")
        if name in self._busy:
            raise StateError(f"VM {name}", "migrating", "idle")
        self._busy.add(name)
        try:
            outcome = await migrate_between(
                vm,
                to,
                self._directory(to, name),
                qemu=self.qemu.path,
                boot=self.boot_files,
                accel=self.accel,
                options=options or MigrationOptions(),
                on_progress=on_progress,
            )
        finally:
            self._busy.discard(name)
        self.vms[name] = outcome.vm
        return outcome.report

    async def close(self) -> None:
        """End every QEMU this lab started and remove its directory if it made it."""
        vms = list(self.vms.values())
        self.vms.clear()
        for vm in vms:
            try:
                await vm.stop()
            except (FerryError, OSError) as err:
                logger.error("lab.close: stopping %s: %s", vm.label, err)
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
