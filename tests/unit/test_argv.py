"""QEMU command lines and query-migrate parsing (pure parts of vmferry.qemu)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmferry.core.boot import GuestBoot
from vmferry.core.errors import ConfigError
from vmferry.core.model import DiskSpec, VmName, VmSpec, spec_from_json, spec_to_json
from vmferry.core.workload import parse_workload
from vmferry.qemu.argv import SANDBOX_OPTION, BootFiles, RuntimePaths, build_argv
from vmferry.qemu.migration import stats_from_reply

BOOT = BootFiles(Path("/img/vmlinuz"), Path("/img/initrd"))


def _argv(directory: str, incoming: bool) -> list[str]:
    spec = VmSpec.build("vm1", memory="1G", workload=parse_workload("idle"))
    return build_argv("qemu", spec, BOOT, RuntimePaths(Path(directory)), incoming=incoming)


def test_same_device_model_on_both_sides() -> None:
    source = _argv("/run/a", incoming=False)
    destination = _argv("/run/b", incoming=True)
    assert destination[-2:] == ["-incoming", "defer"]
    strip = [arg.replace("/run/b", "/run/a") for arg in destination[:-2]]
    assert strip == source
    assert source[source.index("-machine") + 1] == "pc-q35-10.0,memory-backend=ram0"
    assert source[source.index("-cpu") + 1] == "qemu64"
    assert source[source.index("-m") + 1] == "1024M"


def test_kernel_cmdline_carries_workload() -> None:
    argv = _argv("/run/a", incoming=False)
    append = argv[argv.index("-append") + 1]
    assert "console=ttyS0" in append
    assert "vmferry.mode=idle" in append


def test_stats_from_reply() -> None:
    stats = stats_from_reply(
        {
            "status": "completed",
            "total-time": 1234,
            "downtime": 17,
            "ram": {
                "transferred": 1000,
                "remaining": 0,
                "total": 4096,
                "dirty-pages-rate": 3,
                "page-size": 4096,
                "dirty-sync-count": 4,
                "mbps": 8.0,
            },
        }
    )
    assert stats.status == "completed"
    assert stats.downtime_ms == 17
    assert stats.iterations == 4
    assert stats.throughput_bps == 1_000_000
    assert stats.dirty_rate_bps == 3 * 4096
    assert stats_from_reply({"status": "setup"}).transferred_bytes == 0


def test_disk_gets_the_same_node_on_both_sides_and_a_guest_device() -> None:
    for bus, device, guest in (
        ("virtio-blk", "virtio-blk-pci,drive=disk0", "vda"),
        ("virtio-scsi", "scsi-hd,drive=disk0", "sda"),
    ):
        spec = VmSpec.build("vm1", memory="1G", disk="2G", disk_bus=bus)
        source = build_argv(
            "qemu", spec, BOOT, RuntimePaths(Path("/run/a")), disk_image=Path("/d/a.qcow2")
        )
        target = build_argv(
            "qemu",
            spec,
            BOOT,
            RuntimePaths(Path("/run/a")),
            incoming=True,
            disk_image=Path("/d/b.qcow2"),
        )
        joined = " ".join(source)
        assert "driver=qcow2,file=disk0-file,node-name=disk0" in joined
        assert device in joined
        assert f"vmferry.disk_dev={guest}" in joined
        assert [a.replace("/d/b.qcow2", "/d/a.qcow2") for a in target[:-2]] == source


def test_disk_needs_an_image_path_without_commas() -> None:
    spec = VmSpec.build("vm1", memory="1G", disk="1G")
    with pytest.raises(ConfigError, match="image path"):
        build_argv("qemu", spec, BOOT, RuntimePaths(Path("/run/a")))
    with pytest.raises(ConfigError, match="','"):
        build_argv("qemu", spec, BOOT, RuntimePaths(Path("/run/a")), disk_image=Path("/x,y"))


@pytest.mark.parametrize(
    ("disk", "bus", "storage", "message"),
    [
        ("1K", "virtio-blk", "local", "out of range"),
        ("3T", "virtio-blk", "local", "out of range"),
        ("100.5M", "virtio-blk", "local", "size"),
        ("1G", "ide", "local", "unknown disk bus"),
        ("1G", "virtio-blk", "nfs", "unknown storage mode"),
    ],
)
def test_bad_disks_are_refused(disk: str, bus: str, storage: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        VmSpec.build("vm1", disk=disk, disk_bus=bus, storage=storage)


def test_disk_spec_round_trips_through_json() -> None:
    spec = VmSpec.build("vm1", disk="1G", disk_bus="virtio-scsi", storage="shared")
    assert spec_from_json(spec_to_json(spec)) == spec
    assert spec_from_json(spec_to_json(VmSpec.build("vm2"))).disk is None
    with pytest.raises(ConfigError):
        spec_from_json({**spec_to_json(spec), "disk": {"size_bytes": "1G"}})


def test_qemu_always_runs_under_its_seccomp_sandbox() -> None:
    argv = _argv("/run/a", incoming=False)
    index = argv.index("-sandbox")
    assert argv[index + 1] == SANDBOX_OPTION
    assert set(SANDBOX_OPTION.split(",")) == {
        "on",
        "obsolete=deny",
        "elevateprivileges=deny",
        "spawn=deny",
        "resourcecontrol=deny",
    }


def _own_guest(heartbeat: bool) -> VmSpec:
    return VmSpec(
        name=VmName("deb"),
        memory_bytes=1 << 30,
        disk=DiskSpec(1 << 30, storage="shared"),
        boot=GuestBoot(kernel=Path("/img/k"), append="root=/dev/vda", heartbeat=heartbeat),
    )


@pytest.mark.parametrize("heartbeat", [False, True])
def test_an_own_guest_gets_the_heartbeat_port_only_when_it_asks(heartbeat: bool) -> None:
    spec = _own_guest(heartbeat)
    argv = build_argv("qemu", spec, BOOT, RuntimePaths(Path("/run/a")), disk_image=Path("/d"))
    serials = [argv[i + 1] for i, arg in enumerate(argv) if arg == "-serial"]
    # ttyS0 the console, ttyS1 the channel: the same order as the lab guest's.
    assert serials == (["chardev:console", "chardev:channel"] if heartbeat else ["chardev:console"])
    assert spec.has_heartbeats is heartbeat
    assert not spec.is_lab_guest
    assert spec_from_json(spec_to_json(spec)) == spec


def test_an_old_spec_without_the_heartbeat_field_still_loads() -> None:
    data = spec_to_json(_own_guest(False))
    boot = data["boot"]
    assert isinstance(boot, dict)
    del boot["heartbeat"]
    assert spec_from_json(data).has_heartbeats is False
