"""QEMU command lines and query-migrate parsing (pure parts of vmferry.qemu)."""

from __future__ import annotations

from pathlib import Path

from vmferry.core.model import VmSpec
from vmferry.core.workload import parse_workload
from vmferry.qemu.argv import BootFiles, RuntimePaths, build_argv
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
    assert source[source.index("-machine") + 1] == "pc-q35-10.0"
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
