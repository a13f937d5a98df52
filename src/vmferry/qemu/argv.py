"""Pure construction of QEMU command lines: the same device model on both sides of a move."""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vmferry.core.errors import ConfigError
from vmferry.core.model import DISK_NODE, VmSpec

__all__ = [
    "GUEST_AGENT_PORT",
    "OVMF_PATHS",
    "RAM_BACKEND",
    "SANDBOX_OPTION",
    "SANDBOX_OPTION_DROPPING_ROOT",
    "Accel",
    "BootFiles",
    "RuntimePaths",
    "build_argv",
    "disk_args",
    "kernel_cmdline",
]

# QEMU's seccomp filter: no obsolete syscalls, no setuid/setgid, no fork/exec, no CPU affinity or
# priority changes. (QEMU has no "obtain" key; ``obsolete`` is the one that exists.)
SANDBOX_OPTION = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
# With ``-run-with user=``: QEMU installs its filter while parsing options, long before it
# drops root (os_setup_post), so ``elevateprivileges=deny`` (and ``children``) kill it with
# SIGSYS on its own setgid() (measured: audit "syscall=106", exit 159). Only that key is
# relaxed; after the drop QEMU has no capabilities left, so set*id can only pick its own ids,
# and spawn=deny still forbids executing anything (no setuid binaries).
SANDBOX_OPTION_DROPPING_ROOT = (
    "on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny"
)

Accel = Literal["kvm", "tcg"]

# Guest RAM lives in a shared memfd (QEMU names it after the backend type): the host agent
# reads it through /proc/<pid>/fd to digest both copies at a handoff. share=on makes QEMU's
# mapping the memfd's own pages (a private mapping would leave the memfd all zeros).
RAM_BACKEND = "ram0"
# The virtio-serial port qemu-guest-agent opens inside the guest.
GUEST_AGENT_PORT = "org.qemu.guest_agent.0"
# Debian's ovmf package: the combined code+vars image (vars are not kept across a reboot).
OVMF_PATHS = (Path("/usr/share/ovmf/OVMF.fd"), Path("/usr/share/qemu/OVMF.fd"))


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
    def guest_agent_socket(self) -> Path:
        return self.socket_dir / "qga.sock"

    @property
    def console_log(self) -> Path:
        return self.directory / "console.log"

    @property
    def qemu_log(self) -> Path:
        return self.directory / "qemu.log"


def kernel_cmdline(spec: VmSpec) -> str:
    """The guest kernel command line: console on ttyS0, workload settings for our init."""
    parts = ["console=ttyS0", "panic=-1", "quiet", "loglevel=3", *spec.workload.kernel_args()]
    if spec.disk is not None:
        parts.append(f"vmferry.disk_dev={spec.disk.guest_device}")
    return " ".join(parts)


def disk_args(spec: VmSpec, image: Path) -> list[str]:
    """``-blockdev``/``-device`` arguments of the VM's qcow2 disk (empty without one).

    The format node is named :data:`DISK_NODE` on every host: the NBD export on a destination
    and the mirror on a source address it by that name. The host page cache is bypassed
    (``cache.direct=on``, O_DIRECT, what libvirt calls ``cache=none``): a disk on shared
    storage then has no host-side cache that could go stale when the other host takes over,
    and no host holds gigabytes of dirty cache that the switchover's flush would have to write
    while the guest is paused. QEMU's image locking (on by default) keeps two QEMUs from
    opening an image read-write at once (an incoming QEMU holds it inactive, without the
    write lock, until the switchover). The filesystem must support O_DIRECT (not tmpfs).
    """
    if spec.disk is None:
        return []
    if "," in str(image):
        raise ConfigError(f"disk image path must not contain ',': {image}")
    file_node = f"{DISK_NODE}-file"
    args = [
        "-blockdev",
        f"driver=file,filename={image},node-name={file_node},"
        "cache.direct=on,"
        "cache.no-flush=off,discard=unmap",
        "-blockdev",
        f"driver=qcow2,file={file_node},node-name={DISK_NODE},discard=unmap",
    ]
    if spec.disk.bus == "virtio-blk":
        args += ["-device", f"virtio-blk-pci,drive={DISK_NODE},id={DISK_NODE}-dev"]
    else:
        args += [
            "-device",
            "virtio-scsi-pci,id=scsi0",
            "-device",
            f"scsi-hd,drive={DISK_NODE},bus=scsi0.0,id={DISK_NODE}-dev",
        ]
    return args


def build_argv(
    qemu: str,
    spec: VmSpec,
    boot: BootFiles,
    paths: RuntimePaths,
    *,
    accel: Accel = "tcg",
    incoming: bool = False,
    disk_image: Path | None = None,
    run_as: str | None = None,
    hold: bool = False,
    firmware: Path | None = None,
) -> list[str]:
    """Build the argv of one QEMU instance of ``spec``.

    QEMU always runs under its seccomp filter (``-sandbox``, see ``SANDBOX_OPTION``): no
    fork/exec, no privilege or scheduler changes; ``find_qemu`` refuses a QEMU without it.
    With ``run_as`` (a user name) QEMU started as root opens its files and sockets, then
    becomes that user (``-run-with user=``) before it runs the guest; its filter then allows
    the set*id calls of that one drop (``SANDBOX_OPTION_DROPPING_ROOT``).

    Source and destination must get identical device models, so everything that shapes the
    guest comes from ``spec``; only sockets, logs, the disk image path and ``-incoming`` differ.
    With ``hold`` an incoming QEMU keeps the guest paused once it has arrived (``-S``).
    ``firmware`` is OVMF's image, for UEFI guests.

    Raises:
        ConfigError: the spec has a disk but no ``disk_image`` was given (or a bad path).
    """
    if spec.disk is not None and disk_image is None:
        raise ConfigError(f"VM {spec.name} has a disk: an image path is needed")
    argv = [
        qemu,
        "-name",
        f"{spec.name},debug-threads=on",
        "-machine",
        f"{spec.machine_type},memory-backend={RAM_BACKEND}",
        "-accel",
        accel,
        "-cpu",
        spec.cpu_model,
        "-object",
        f"memory-backend-memfd,id={RAM_BACKEND},size={spec.memory_bytes >> 20}M,share=on",
        "-m",
        f"{spec.memory_bytes >> 20}M",
        "-smp",
        str(spec.vcpus),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        # The lab guest panics on purpose to end (panic=-1); a user's guest may reboot.
        *(["-no-reboot"] if spec.is_lab_guest else []),
        "-sandbox",
        SANDBOX_OPTION if run_as is None else SANDBOX_OPTION_DROPPING_ROOT,
        *boot_args(spec, boot, firmware),
        "-chardev",
        f"socket,id=qmp,path={paths.qmp_socket},server=on,wait=off",
        "-mon",
        "chardev=qmp,mode=control",
        "-chardev",
        f"file,id=console,path={paths.console_log}",
        "-serial",
        "chardev:console",
        *_channel_args(spec, paths),
    ]
    if disk_image is not None:
        argv += disk_args(spec, disk_image)
    if run_as is not None:
        if not run_as or "," in run_as or "=" in run_as:
            raise ConfigError(f"bad user name for QEMU: {run_as!r}")
        argv += ["-run-with", f"user={run_as}"]
    if incoming:
        # Held: the guest stays paused once it has arrived (QEMU's autostart off), so both
        # copies can be compared before it runs; a ``cont`` during the migration undoes it.
        argv += ["-S", "-incoming", "defer"] if hold else ["-incoming", "defer"]
    return argv


def boot_args(spec: VmSpec, boot: BootFiles, firmware: Path | None) -> list[str]:
    """How the guest boots: the lab's kernel and initramfs, or the user's own guest through
    the firmware (``firmware``: OVMF's image for UEFI) or a kernel given directly.

    Raises:
        ConfigError: a UEFI guest without a firmware image.
    """
    own = spec.boot
    if own is None:
        return [
            *("-kernel", str(boot.kernel), "-initrd", str(boot.initrd)),
            *("-append", kernel_cmdline(spec)),
        ]
    args: list[str] = []
    if own.firmware == "uefi":
        if firmware is None:
            raise ConfigError(f"VM {spec.name} boots with UEFI: install OVMF (apt install ovmf)")
        args += ["-bios", str(firmware)]
    if own.kernel is not None:
        args += ["-kernel", str(own.kernel)]
        if own.initrd is not None:
            args += ["-initrd", str(own.initrd)]
        if own.append is not None:
            args += ["-append", own.append]
    if own.nic:
        args += ["-netdev", "user,id=net0", "-device", "virtio-net-pci,netdev=net0,id=net0-dev"]
    return args


def _channel_args(spec: VmSpec, paths: RuntimePaths) -> list[str]:
    """The lab channel, a second serial port (guests that send heartbeats), and the guest
    agent's port (every VM)."""
    args: list[str] = []
    if spec.has_heartbeats:
        args += [
            "-chardev",
            f"socket,id=channel,path={paths.channel_socket},server=on,wait=off",
            "-serial",
            "chardev:channel",
        ]
    return [
        *args,
        "-chardev",
        f"socket,id=qga0,path={paths.guest_agent_socket},server=on,wait=off",
        "-device",
        "virtio-serial-pci,id=vserial0",
        "-device",
        f"virtserialport,chardev=qga0,name={GUEST_AGENT_PORT},id=qga0-port",
    ]
