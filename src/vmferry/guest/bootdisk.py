"""The boot sectors of a BIOS-bootable disk image, written without a loop device or a mount.

An MBR disk whose first partition holds the root filesystem (made with ``mke2fs -d`` at an
offset inside the image file) boots through SeaBIOS when its first sector carries GRUB's
``boot.img`` and the gap before the partition carries GRUB's ``core.img``: the same bytes
``grub-install`` would write, without its need for a block device. ``grub-mkimage`` fills
core.img's own blocklist (it reads its sectors from sector 2 on, after its first sector), and
boot.img loads sector 1 by default, so no patching is needed beyond the partition table.

The kernel command line lives in the configuration embedded in core.img: GRUB runs it before
anything else and boots without a menu, so the firmware path costs no timeout.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from vmferry.guest.modules import ImageBuildError

__all__ = [
    "GRUB_MODULES",
    "PARTITION_START_BYTES",
    "SECTOR_BYTES",
    "Partition",
    "grub_embedded_config",
    "mbr_sector",
    "write_boot_sectors",
]

SECTOR_BYTES = 512
# The first partition starts at 1 MiB, as fdisk aligns it; the gap before it holds core.img.
PARTITION_START_BYTES = 1 << 20
# GRUB's i386-pc modules in core.img: disk access, the partition table, ext4, the Linux loader,
# and the serial console (so a boot failure is readable on ttyS0).
GRUB_MODULES = ("biosdisk", "part_msdos", "ext2", "linux", "boot", "serial", "terminal")
# boot.img's code ends where the MBR's disk signature begins.
_BOOT_CODE_BYTES = 440
_PARTITION_TYPE_LINUX = 0x83
_BOOTABLE = 0x80
# CHS fields of a partition beyond what CHS can address: firmware and Linux use the LBA fields.
_CHS_BEYOND = b"\xfe\xff\xff"


@dataclass(frozen=True, slots=True)
class Partition:
    """A primary MBR partition, in sectors of 512 bytes."""

    start_sector: int
    sector_count: int
    partition_type: int = _PARTITION_TYPE_LINUX
    bootable: bool = True


def mbr_sector(boot_code: bytes, disk_id: int, partitions: tuple[Partition, ...]) -> bytes:
    """The first sector of a disk: boot code, disk signature, partition table, 0x55AA.

    Args:
        boot_code: GRUB's ``boot.img`` (its first 440 bytes are the code; longer is cut).
        disk_id: the 32-bit disk signature.
        partitions: up to four primary partitions.

    Returns:
        512 bytes.

    Raises:
        ImageBuildError: more than four partitions, or one outside the MBR's 32-bit range.
    """
    if len(partitions) > 4:
        raise ImageBuildError(f"an MBR holds 4 primary partitions, not {len(partitions)}")
    table = b""
    for part in partitions:
        if not (part.start_sector > 0 and part.sector_count > 0) or (
            part.start_sector + part.sector_count > 0xFFFFFFFF
        ):
            raise ImageBuildError(f"partition {part} does not fit an MBR")
        table += struct.pack(
            "<B3sB3sII",
            _BOOTABLE if part.bootable else 0,
            _CHS_BEYOND,
            part.partition_type,
            _CHS_BEYOND,
            part.start_sector,
            part.sector_count,
        )
    code = boot_code[:_BOOT_CODE_BYTES].ljust(_BOOT_CODE_BYTES, b"\0")
    sector = code + struct.pack("<IH", disk_id & 0xFFFFFFFF, 0) + table.ljust(64, b"\0")
    return sector + b"\x55\xaa"


def grub_embedded_config(kernel_args: str) -> str:
    """The script embedded in core.img: boot ``/vmlinuz`` of the first partition at once.

    ``(hd0)`` is always the disk the BIOS booted from, and the kernel finds its root by label,
    so the disk may sit on virtio-blk or virtio-scsi. ``/vmlinuz`` and ``/initrd.img`` are the
    symlinks Debian's linux-base keeps pointing at the installed kernel.
    """
    return (
        "serial --unit=0 --speed=115200\n"
        "terminal_output console serial\n"
        "set root=(hd0,msdos1)\n"
        f"linux /vmlinuz {kernel_args}\n"
        "initrd /initrd.img\n"
        "boot\n"
    )


def write_boot_sectors(
    image: Path, boot_img: bytes, core_img: bytes, disk_id: int, partition: Partition
) -> None:
    """Write the MBR and GRUB's core.img into the first MiB of a raw disk image file.

    Raises:
        ImageBuildError: core.img does not fit the gap before the partition, or the file
            cannot be written.
    """
    gap_bytes = partition.start_sector * SECTOR_BYTES - SECTOR_BYTES
    if len(core_img) > gap_bytes:
        raise ImageBuildError(
            f"GRUB core.img is {len(core_img)} bytes; the gap before the partition is {gap_bytes}"
        )
    try:
        with image.open("r+b") as f:
            f.write(mbr_sector(boot_img, disk_id, (partition,)))
            f.write(core_img)
    except OSError as err:
        raise ImageBuildError(f"cannot write the boot sectors of {image}: {err}") from err
