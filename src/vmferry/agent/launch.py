"""Starting and ending a VM's QEMU on this host: the room check, the disk image, the launch
and the record a successor agent finds; and the way back (retire, drop)."""

from __future__ import annotations

import logging
from pathlib import Path

from vmferry.agent.config import AgentConfig
from vmferry.agent.qemu_user import QemuArea
from vmferry.agent.slots import Slot, Slots, VmState
from vmferry.agent.store import VmStore
from vmferry.agent.vm import launch
from vmferry.core.errors import ConfigError, StateError
from vmferry.core.heartbeat import HeartbeatGaps
from vmferry.core.model import MigrationOptions, VmSpec
from vmferry.qemu.argv import OVMF_PATHS, Accel, BootFiles
from vmferry.qemu.binary import QemuBinary
from vmferry.qemu.qcow2 import ImageInfo, copy_image, create_image

__all__ = ["Launcher"]

logger = logging.getLogger(__name__)

# Copying a user's image (qemu-img convert, sparse): generous for large images on slow disks.
_COPY_TIMEOUT_S = 3600.0


class Launcher:
    """Starts and ends this host's QEMUs."""

    def __init__(
        self,
        config: AgentConfig,
        qemu: QemuBinary,
        boot: BootFiles,
        accel: Accel,
        slots: Slots,
        store: VmStore,
        area: QemuArea,
    ) -> None:
        self.config = config
        self.qemu = qemu
        self.boot = boot
        self.accel = accel
        self.slots = slots
        self.store = store
        self.area = area

    async def launch(
        self,
        spec: VmSpec,
        *,
        incoming: bool,
        new_disk: bool,
        image: ImageInfo | None = None,
        hold: bool = False,
    ) -> Slot:
        """Check room, reserve the name, create the disk image if ``new_disk`` (a copy of
        ``image``, the user's own, if given), start QEMU and persist the definition at once
        (so a successor agent, or `lab down`, finds it). Leaves nothing behind on failure (an
        image it did not create is never removed).

        Raises:
            ConfigError, CapacityError: no room, or a disk image this host cannot see.
            QEMULaunchError, GuestError: QEMU did not start.
        """
        self.slots.check_room(spec)
        self._check_boot_files(spec)
        disk = self.store.disk_path(spec)
        if new_disk:
            self.slots.check_disk_room(spec)
        elif disk is not None and not disk.exists():
            raise ConfigError(f"{self.config.host} cannot see {spec.name}'s disk image {disk}")
        slot = Slot(spec, VmState.INCOMING, None)  # reserves the name and memory meanwhile
        self.slots.add(slot)
        created = None
        try:
            if new_disk and disk is not None and spec.disk is not None:
                created = disk
                if image is None:
                    await create_image(disk, spec.disk.size_bytes)
                else:
                    await copy_image(image, disk, _COPY_TIMEOUT_S)
            slot.vm = await launch(
                self.qemu.path,
                spec,
                self.boot,
                self.store.directory(spec.name),
                role=self.config.host,
                accel=self.accel,
                heartbeats=HeartbeatGaps(),
                incoming=incoming,
                disk_image=disk,
                run_as=None if self.config.qemu_user is None else self.config.qemu_user.name,
                hold=hold,
                firmware=next((path for path in OVMF_PATHS if path.exists()), None),
            )
            self.store.persist(spec)
        except BaseException:
            if slot.vm is not None:
                await slot.vm.stop()
            self.drop(spec.name, created)
            raise
        return slot

    def _check_boot_files(self, spec: VmSpec) -> None:
        """Raises: ConfigError: a kernel or initrd of a user's guest this host cannot see."""
        boot = spec.boot
        for path in () if boot is None else (boot.kernel, boot.initrd):
            if path is not None and not path.is_file():
                raise ConfigError(f"{self.config.host} cannot see {spec.name}'s boot file {path}")

    async def retire(self, name: str, required: VmState) -> None:
        """End and forget VM ``name``'s QEMU, which must be in state ``required``, and remove
        its local disk image (a shared image belongs to whichever host runs the VM).

        Raises:
            NotFound: no such VM.
            StateError: it is in another state.
        """
        slot = self.slots.get(name)
        if slot.state != required:
            raise StateError(f"VM {name}", slot.state.value, required.value)
        if slot.vm is not None:
            await slot.vm.stop()
        self.drop(name, self.store.owned_disk(slot.spec))

    def drop(self, name: str, disk: Path | None) -> None:
        """Drop the slot, its runtime directory and, if given, its disk image."""
        self.slots.pop(name)
        self.store.remove(name, disk)

    def tls_dir(self, options: MigrationOptions) -> Path | None:
        """The credentials QEMU loads for ``options`` (None: in clear).

        Raises:
            ConfigError: TLS asked for and this host has no QEMU credentials, or they are
                incomplete.
        """
        if not options.tls:
            return None
        if self.config.qemu_tls_dir is None:
            raise ConfigError(
                f"{self.config.host} has no QEMU TLS credentials for a --tls migration "
                "(start its agent with --qemu-tls-dir)"
            )
        return self.area.stage_tls(self.config.qemu_tls_dir)
