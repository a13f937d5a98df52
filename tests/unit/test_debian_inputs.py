"""The pure parts of the Debian image builder: the cache key, apt's and dpkg's output, the boot
sectors."""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

import pytest

from vmferry.guest.archive import parse_dpkg_status, parse_simulated_installs
from vmferry.guest.bootdisk import (
    Partition,
    grub_embedded_config,
    mbr_sector,
    write_boot_sectors,
)
from vmferry.guest.debian import ROOT_APPEND, BuildInputs, cache_key
from vmferry.guest.modules import ImageBuildError

INPUTS = BuildInputs(
    sources=("deb http://deb.debian.org/debian bookworm main",),
    packages=("udev", "systemd-sysv"),
    resolved=(("udev", "252.39-1~deb12u2"), ("libc6", "2.36-9+deb12u14")),
    recipe="MODULES=list",
    tools=("mmdebstrap 1.3.5",),
)


def test_the_key_is_a_stable_sha256() -> None:
    key = cache_key(INPUTS)
    assert len(key) == 64
    assert int(key, 16) >= 0
    assert cache_key(dataclasses.replace(INPUTS)) == key


def test_the_order_of_packages_does_not_change_the_key() -> None:
    shuffled = dataclasses.replace(
        INPUTS,
        packages=tuple(reversed(INPUTS.packages)),
        resolved=tuple(reversed(INPUTS.resolved)),
    )
    assert cache_key(shuffled) == cache_key(INPUTS)


@pytest.mark.parametrize(
    "change",
    [
        {"sources": ("deb http://deb.debian.org/debian trixie main",)},
        {"packages": ("udev", "systemd-sysv", "stress-ng")},
        {"resolved": (("udev", "252.39-1~deb12u3"), ("libc6", "2.36-9+deb12u14"))},
        {"resolved": (("udev", "252.39-1~deb12u2"),)},
        {"recipe": "MODULES=most"},
        {"tools": ("mmdebstrap 1.5.0",)},
    ],
    ids=["sources", "packages", "a-version", "a-package-less", "recipe", "tools"],
)
def test_every_input_changes_the_key(change: dict[str, object]) -> None:
    assert cache_key(dataclasses.replace(INPUTS, **change)) != cache_key(INPUTS)  # type: ignore[arg-type]


SIMULATED = """\
NOTE: This is only a simulation!
Reading package lists...
Inst gcc-12-base (12.2.0-14+deb12u1 Debian:12.15/oldstable [amd64])
Inst libc6 (2.36-9+deb12u14 Debian:12.15/oldstable [amd64]) []
Inst linux-image-cloud-amd64 (6.1.192-3 Debian-Security:12/oldstable-security [amd64])
Inst udev [252.38-1~deb12u1] (252.39-1~deb12u2 Debian:12.15/oldstable [amd64])
Inst libfoo:amd64 (1.0-1 Debian:12.15/oldstable [amd64])
Conf gcc-12-base (12.2.0-14+deb12u1 Debian:12.15/oldstable [amd64])
"""


def test_simulated_installs_give_every_package_and_its_new_version() -> None:
    assert parse_simulated_installs(SIMULATED) == (
        ("gcc-12-base", "12.2.0-14+deb12u1"),
        ("libc6", "2.36-9+deb12u14"),
        ("libfoo", "1.0-1"),
        ("linux-image-cloud-amd64", "6.1.192-3"),
        ("udev", "252.39-1~deb12u2"),
    )


def test_no_installs_give_nothing() -> None:
    assert parse_simulated_installs("Reading package lists...\n0 upgraded\n") == ()


DPKG_STATUS = """\
Package: udev
Status: install ok installed
Priority: important
Version: 252.39-1~deb12u2
Description: /dev and hotplug management daemon
 udev is a daemon which dynamically creates and removes device nodes from

Package: old-config
Status: deinstall ok config-files
Version: 1.0

Package: libc6
Status: install ok installed
Architecture: amd64
Version: 2.36-9+deb12u14
"""


def test_dpkg_status_gives_installed_packages_only() -> None:
    assert parse_dpkg_status(DPKG_STATUS) == {
        "udev": "252.39-1~deb12u2",
        "libc6": "2.36-9+deb12u14",
    }


BOOT_CODE = bytes(range(256)) * 2  # 512 bytes, as GRUB's boot.img


def test_the_mbr_keeps_the_boot_code_and_describes_the_partition() -> None:
    sector = mbr_sector(BOOT_CODE, 0x12345678, (Partition(2048, 2095104),))
    assert len(sector) == 512
    assert sector[:440] == BOOT_CODE[:440]
    assert struct.unpack_from("<I", sector, 440) == (0x12345678,)
    status, kind, start, count = struct.unpack_from("<B3xB3xII", sector, 446)
    assert (status, kind, start, count) == (0x80, 0x83, 2048, 2095104)
    assert sector[462:510] == bytes(48)  # three empty entries
    assert sector[510:] == b"\x55\xaa"


@pytest.mark.parametrize(
    "partitions",
    [
        tuple(Partition(2048 + i, 1) for i in range(5)),
        (Partition(0, 100),),
        (Partition(2048, 0),),
        (Partition(2048, 0xFFFFFFFF),),
    ],
    ids=["five", "at-sector-0", "empty", "beyond-2TiB"],
)
def test_an_impossible_table_is_refused(partitions: tuple[Partition, ...]) -> None:
    with pytest.raises(ImageBuildError):
        mbr_sector(BOOT_CODE, 1, partitions)


def test_boot_sectors_land_in_the_gap_before_the_partition(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(b"\xee" * (3 << 20))
    core = b"\xc0" * 1000
    write_boot_sectors(image, BOOT_CODE, core, 7, Partition(2048, 4096))
    data = image.read_bytes()
    assert data[510:512] == b"\x55\xaa"
    assert data[512:1512] == core
    assert data[1512:1600] == b"\xee" * 88  # the rest is left alone
    assert len(data) == 3 << 20


def test_a_core_image_larger_than_the_gap_is_refused(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(1 << 20))
    with pytest.raises(ImageBuildError, match=r"core\.img"):
        write_boot_sectors(image, BOOT_CODE, bytes(2048 * 512), 7, Partition(2048, 100))


def test_grub_boots_the_kernel_with_the_direct_boot_arguments() -> None:
    config = grub_embedded_config(ROOT_APPEND)
    assert f"linux /vmlinuz {ROOT_APPEND}\n" in config
    assert config.endswith("initrd /initrd.img\nboot\n")
    assert "root=LABEL=" in ROOT_APPEND
