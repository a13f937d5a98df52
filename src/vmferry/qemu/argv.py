"""Pure construction of QEMU command lines: the same device model on both sides of a move."""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vmferry.core.model import VmSpec

__all__ = ["Accel", "BootFiles", "RuntimePaths", "build_argv", "kernel_cmdline"]

Accel = Literal["kvm", "tcg"]


@dataclass(frozen=True, slots=True)
class BootFiles:
    """Kernel and initramfs of the guest."""

    kernel: Path
    initrd: Path


# UNIX socket paths are limited to 107 bytes; keep ours well inside that.
_MAX_SOCKET_PATH = 96


@dataclass(frozen=True, slots=True)
class RuntimePaths:
    """Where one QEMU instance keeps its sockets and logs (one directory per instance).

    Sockets live in the directory itself when the path is short enough, else in a directory
    under the system temp dir named by a hash of it (deterministic, so a restarted agent finds
    them again).
    """

    directory: Path

    @property
    def socket_dir(self) -> Path:
        if len(str(self.directory / "channel.sock")) <= _MAX_SOCKET_PATH:
            return self.directory
        digest = hashlib.sha256(str(self.directory.resolve()).encode()).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / "vmferry-sockets" / digest

    @property
    def qmp_socket(self) -> Path:
        return self.socket_dir / "qmp.sock"

    @property
    def channel_socket(self) -> Path:
        return self.socket_dir / "channel.sock"

    @property
    def console_log(self) -> Path:
        return self.directory / "console.log"

    @property
    def qemu_log(self) -> Path:
        return self.directory / "qemu.log"


def kernel_cmdline(spec: VmSpec) -> str:
    """The guest kernel command line: console on ttyS0, workload settings for our init."""
    parts = ["console=ttyS0", "panic=-1", "quiet", "loglevel=3", *spec.workload.kernel_args()]
    return " ".join(parts)


def build_argv(
    qemu: str,
    spec: VmSpec,
    boot: BootFiles,
    paths: RuntimePaths,
    *,
    accel: Accel = "tcg",
    incoming: bool = False,
) -> list[str]:
    """Build the argv of one QEMU instance of ``spec``.

    Source and destination must get identical device models, so everything that shapes the
    guest comes from ``spec``; only sockets, logs and ``-incoming`` differ.
    """
    argv = [
        qemu,
        "-name",
        f"{spec.name},debug-threads=on",
        "-machine",
        spec.machine_type,
        "-accel",
        accel,
        "-cpu",
        spec.cpu_model,
        "-m",
        f"{spec.memory_bytes >> 20}M",
        "-smp",
        str(spec.vcpus),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-kernel",
        str(boot.kernel),
        "-initrd",
        str(boot.initrd),
        "-append",
        kernel_cmdline(spec),
        "-chardev",
        f"socket,id=qmp,path={paths.qmp_socket},server=on,wait=off",
        "-mon",
        "chardev=qmp,mode=control",
        "-chardev",
        f"file,id=console,path={paths.console_log}",
        "-serial",
        "chardev:console",
        "-chardev",
        f"socket,id=channel,path={paths.channel_socket},server=on,wait=off",
        "-serial",
        "chardev:channel",
    ]
    if incoming:
        argv += ["-incoming", "defer"]
    return argv
