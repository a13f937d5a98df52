"""A real Debian 12 guest disk image, built from Debian's packages and cached.

``debian_image()`` returns a qcow2 disk holding a minimal bookworm (``mmdebstrap
--variant=minbase`` plus systemd, udev, qemu-guest-agent, stress-ng and Debian's cloud kernel
with its initramfs), bootable two ways: through the firmware (SeaBIOS loads GRUB from the MBR,
GRUB boots the kernel at once) and directly (``-kernel``/``-initrd``/``-append`` with the kernel
and initramfs copied out of the image). The root filesystem is found by its label, so the disk
may be a virtio-blk ``vda`` or a virtio-scsi ``sda``; the qemu-guest-agent starts as soon as the
``org.qemu.guest_agent.0`` virtio-serial port appears. It also holds the lab guest's workload
program (static, compiled from ``workload.c``) with a systemd unit that starts it when the
kernel command line has ``vmferry.mode=`` (its settings are the lab guest's ``vmferry.*``
arguments): booted with ``--heartbeat``, its heartbeats on ``/dev/ttyS1`` give the downtime
the guest felt, as the lab guest's do.

Nothing is mounted on the host: mmdebstrap builds the tree in its own mount namespace,
``mke2fs -d`` writes the tree into the partition at an offset inside the image file, and the
boot sectors are written as bytes (:mod:`vmferry.guest.bootdisk`). The build needs root (for
the files' ownership) and Debian's mirror; nothing else from the network.

Images are cached under ``<user cache>/vmferry/debian/<key>/``. The key hashes every input:
the exact version of every package that goes in (resolved by apt against Debian's current
package lists, kept in a private apt state beside the images), the build recipe (hooks,
initramfs modules, kernel arguments, disk size) and the tools' versions. A new package version
in the archive gives a new key, hence a rebuild; the lists are handed to mmdebstrap, so the
image holds the very versions the key names. Without network the last lists are used. Old
images are kept (a VM may still use one as its backing file): delete them by hand.

Example:
    >>> image = debian_image(on_progress=print)  # doctest: +SKIP
    >>> argv = ["qemu-system-x86_64", "-kernel", str(image.kernel),
    ...         "-initrd", str(image.initrd), "-append", image.root_append,
    ...         "-drive", f"file={overlay},if=virtio"]  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shlex
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from vmferry.guest.archive import (
    APT_SOURCES,
    KEYRING,
    parse_dpkg_status,
    resolve_packages,
)
from vmferry.guest.bootdisk import (
    GRUB_MODULES,
    PARTITION_START_BYTES,
    SECTOR_BYTES,
    Partition,
    grub_embedded_config,
    write_boot_sectors,
)
from vmferry.guest.hosttools import run_logged, run_tool
from vmferry.guest.image import compile_workload, workload_source
from vmferry.guest.modules import ImageBuildError

__all__ = [
    "APT_SOURCES",
    "BUILDER_VERSION",
    "DISK_SIZE_BYTES",
    "PACKAGES",
    "ROOT_APPEND",
    "BuildInputs",
    "DebianImage",
    "ImageBuildError",
    "cache_key",
    "debian_image",
    "default_cache_dir",
]

logger = logging.getLogger(__name__)
logger.addHandler(logging.NullHandler())

BUILDER_VERSION = "1"
SUITE = "bookworm"
# What minbase installs besides PACKAGES: Essential:yes, Priority:required, apt, and the
# merged-/usr marker the merged-usr hook installs (not usrmerge, which pulls in perl: ~47 MB).
BASE_SELECTION = ("?essential", "?priority(required)", "apt", "usr-is-merged")
PACKAGES = (
    "systemd-sysv",
    "udev",
    "qemu-guest-agent",
    "stress-ng",
    "linux-image-cloud-amd64",
    "initramfs-tools",
)
# The initramfs holds these and their dependencies only (MODULES=list): the disk drivers of
# both buses (ext4 is built into the cloud kernel; listed in case a kernel builds it as a module).
INITRAMFS_MODULES = ("virtio_pci", "virtio_blk", "virtio_scsi", "sd_mod", "ext4")
HOSTNAME = "vmferry-debian"
ROOT_LABEL = "vmferry-root"
# rw: no remount and no fsck of a pristine image (fstab's pass is 0); panic=-1 with QEMU's
# -no-reboot turns a panic into a QEMU exit instead of a hang.
ROOT_APPEND = f"root=LABEL={ROOT_LABEL} rw console=ttyS0 panic=-1"
DISK_SIZE_BYTES = 1 << 30
# Units nothing in a test guest needs, each costing boot time or doing work behind a test's back.
MASKED_UNITS = (
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "man-db.timer",
    "getty@tty1.service",
    "getty-static.service",
    "systemd-pstore.service",
)
DPKG_OPTIONS = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
)
# No reserved blocks: everything in the guest runs as root anyway.
MKE2FS_OPTIONS = ("-t", "ext4", "-b", "4096", "-m", "0")
# zstd-compressed clusters: a third of the size (~95 MB, not ~275 MB), and no slower to boot
# under TCG (measured); a guest's writes land uncompressed in its overlay or copy.
QCOW2_OPTIONS = ("-c", "-o", "compat=1.1,compression_type=zstd")
GRUB_DIR = Path("/usr/lib/grub/i386-pc")
WORKLOAD_PATH = "/usr/local/sbin/vmferry-workload"
WORKLOAD_UNIT_NAME = "vmferry-workload.service"
# Started only when asked for on the kernel command line; the program reads its settings there.
WORKLOAD_UNIT = f"""\
[Unit]
Description=vmferry workload (heartbeats on ttyS1, memory dirtying) from vmferry.* kernel args
ConditionKernelCommandLine=vmferry.mode
After=dev-ttyS1.device

[Service]
ExecStart={WORKLOAD_PATH}

[Install]
WantedBy=multi-user.target
"""
MERGED_USR_HOOKS = Path("/usr/share/mmdebstrap/hooks/merged-usr")

ESSENTIAL_HOOK = f"""\
#!/bin/sh
# Before the kernel is installed: its initramfs gets the listed modules only.
set -eu
mkdir -p "$1/etc/initramfs-tools/conf.d" "$1/usr/share/initramfs-tools/modules.d"
echo MODULES=list > "$1/etc/initramfs-tools/conf.d/vmferry.conf"
printf '%s\\n' {" ".join(INITRAMFS_MODULES)} > "$1/usr/share/initramfs-tools/modules.d/vmferry"
"""

CUSTOMIZE_HOOK = f"""\
#!/bin/sh
# After every package is installed: identity, fstab, units.
set -eu
echo {HOSTNAME} > "$1/etc/hostname"
printf '127.0.0.1\\tlocalhost\\n127.0.1.1\\t{HOSTNAME}\\n::1\\tlocalhost ip6-localhost\\n' \\
    > "$1/etc/hosts"
printf 'LABEL={ROOT_LABEL}\\t/\\text4\\tdefaults,errors=remount-ro\\t0\\t0\\n' > "$1/etc/fstab"
chroot "$1" systemctl mask --quiet {" ".join(MASKED_UNITS)}
# Units with ConditionNeedsUpdate= (systemd-sysusers) run while /usr is newer than these
# stamps; Debian writes none, so they would run on every boot.
touch -d "@$(($(stat -c %Y "$1/usr") + 1))" "$1/etc/.updated" "$1/var/.updated"
test -e "$1/vmlinuz" && test -e "$1/initrd.img"
"""


@dataclass(frozen=True, slots=True)
class DebianImage:
    """A built Debian guest; never boot ``disk`` read-write (use an overlay or a copy).

    Attributes:
        disk: qcow2, bootable by SeaBIOS and usable with direct kernel boot.
        kernel: the image's kernel (``vmlinuz``), for ``-kernel``.
        initrd: the image's initramfs, for ``-initrd``.
        root_append: the kernel command line for direct boot (``-append``).
        key: the cache key (hex sha256 of every input).
    """

    disk: Path
    kernel: Path
    initrd: Path
    root_append: str
    key: str


@dataclass(frozen=True, slots=True)
class BuildInputs:
    """Everything an image is made from; equal inputs give the same image.

    Attributes:
        sources: the apt source lines.
        packages: the packages asked for.
        resolved: every package that goes in, as (name, version), in any order.
        recipe: the hooks and settings that shape the image, as text.
        tools: the version lines of the host tools that write it.
    """

    sources: tuple[str, ...]
    packages: tuple[str, ...]
    resolved: tuple[tuple[str, str], ...]
    recipe: str
    tools: tuple[str, ...]


def cache_key(inputs: BuildInputs) -> str:
    """The hex sha256 naming the image built from ``inputs`` (package order does not count)."""
    canonical = {
        "builder": BUILDER_VERSION,
        "sources": list(inputs.sources),
        "packages": sorted(inputs.packages),
        "resolved": sorted(f"{name}={version}" for name, version in inputs.resolved),
        "recipe": inputs.recipe,
        "tools": list(inputs.tools),
    }
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()


def _recipe() -> str:
    settings = {
        "suite": SUITE,
        "variant": "minbase",
        "base": BASE_SELECTION,
        "dpkg": DPKG_OPTIONS,
        "root_append": ROOT_APPEND,
        "label": ROOT_LABEL,
        "disk_bytes": DISK_SIZE_BYTES,
        "mke2fs": MKE2FS_OPTIONS,
        "qcow2": QCOW2_OPTIONS,
        "grub_modules": GRUB_MODULES,
        "grub_config": grub_embedded_config(ROOT_APPEND),
        "workload_sha256": hashlib.sha256(workload_source()).hexdigest(),
        "workload_unit": WORKLOAD_UNIT,
    }
    return "\n".join([json.dumps(settings, sort_keys=True), ESSENTIAL_HOOK, CUSTOMIZE_HOOK])


def default_cache_dir() -> Path:
    """Where Debian images are cached: ``<user cache dir>/vmferry/debian``."""
    return Path(platformdirs.user_cache_dir("vmferry")) / "debian"


def _require_tools() -> None:
    if os.geteuid() != 0:
        raise ImageBuildError(
            "building the Debian image needs root (the image's files are owned by root)"
        )
    needed = {
        "mmdebstrap": "mmdebstrap",
        "apt-get": "apt",
        "mke2fs": "e2fsprogs",
        "grub-mkimage": "grub-common",
        "qemu-img": "qemu-utils",
        "gcc": "gcc libc6-dev",
    }
    missing = sorted({pkg for tool, pkg in needed.items() if shutil.which(tool) is None})
    for path, pkg in ((GRUB_DIR / "boot.img", "grub-pc-bin"), (KEYRING, "debian-archive-keyring")):
        if not path.exists():
            missing.append(pkg)
    if missing:
        raise ImageBuildError(
            f"cannot build the Debian image: apt-get install {' '.join(missing)} "
            "(or run scripts/setup-host.sh)"
        )


def _tool_versions() -> tuple[str, ...]:
    lines = []
    for argv in (
        ["mmdebstrap", "--version"],
        ["mke2fs", "-V"],
        ["grub-mkimage", "--version"],
        ["qemu-img", "--version"],
    ):
        lines.append(run_tool(argv, what="reading tool versions").strip().splitlines()[0])
    return tuple(lines)


@contextlib.contextmanager
def _build_lock(root: Path, say: Callable[[str], None]) -> Iterator[None]:
    """One builder per cache directory; the others wait, then find its image."""
    with (root / ".build.lock").open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another build in {root}")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _sweep_leftovers(root: Path) -> None:
    """Remove the work directories of builds that were killed (the caller holds the lock)."""
    for leftover in [*root.glob(".tmp-*"), *root.glob(".old-*")]:
        logger.info("removing the leftover %s", leftover)
        shutil.rmtree(leftover, ignore_errors=True)


def _load_cached(directory: Path, key: str) -> DebianImage | None:
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    files = [directory / name for name in ("disk.qcow2", "vmlinuz", "initrd.img")]
    if not all(f.is_file() for f in files) or not isinstance(manifest, dict):
        return None
    append = manifest.get("root_append")
    if manifest.get("key") != key or not isinstance(append, str):
        return None
    return DebianImage(files[0], files[1], files[2], append, key)


def _mmdebstrap(work: Path, apt_dir: Path, say: Callable[[str], None]) -> Path:
    """Build the root tree in ``work/rootfs`` from the resolved lists; return its path."""
    rootfs = work / "rootfs"
    hooks = {"essential": ESSENTIAL_HOOK, "customize": CUSTOMIZE_HOOK}
    for name, text in hooks.items():
        (work / f"{name}.sh").write_text(text)
        (work / f"{name}.sh").chmod(0o755)
    lists = shlex.quote(str(apt_dir / "lists"))
    copy_lists = (
        'mkdir -p "$1/var/lib/apt/lists" && '
        f'cp -p {lists}/*_InRelease {lists}/*_Packages.* "$1/var/lib/apt/lists/"'
    )
    argv = [
        "mmdebstrap",
        "--mode=unshare",  # as root: a private mount namespace, nothing left mounted on exit
        "--variant=minbase",
        "--format=directory",
        f"--include={','.join(PACKAGES)}",
        '--aptopt=APT::Install-Recommends "false"',
        '--aptopt=Acquire::Languages "none"',
        '--aptopt=APT::Sandbox::User "root"',  # the lists are root's
        *(f"--dpkgopt={option}" for option in DPKG_OPTIONS),
        f"--hook-dir={MERGED_USR_HOOKS}",
        f"--setup-hook={copy_lists}",
        "--skip=update",  # the lists the key was computed from, not newer ones
        f"--essential-hook={work / 'essential.sh'}",
        f"--customize-hook={work / 'customize.sh'}",
        SUITE,
        str(rootfs),
        *APT_SOURCES,
    ]
    say("mmdebstrap: downloading and installing the packages (about a minute)")
    run_logged(argv, what="building the Debian root tree", say=say)
    return rootfs


def _install_workload(work: Path, rootfs: Path, say: Callable[[str], None]) -> None:
    """Put the static workload program and its (enabled) unit into ``rootfs``."""
    say("compiling the workload program into the image")
    binary = compile_workload(workload_source(), work)
    target = rootfs / WORKLOAD_PATH.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(binary, target)
    target.chmod(0o755)
    units = rootfs / "etc/systemd/system"
    (units / WORKLOAD_UNIT_NAME).write_text(WORKLOAD_UNIT)
    wants = units / "multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / WORKLOAD_UNIT_NAME).symlink_to(f"/etc/systemd/system/{WORKLOAD_UNIT_NAME}")


def _inside(rootfs: Path, name: str) -> Path:
    """The file a symlink at the root of ``rootfs`` names, resolved inside ``rootfs``."""
    target = os.readlink(rootfs / name)
    return rootfs / target.lstrip("/")


def _make_disk(work: Path, rootfs: Path, key: str, disk: Path, say: Callable[[str], None]) -> None:
    """Write ``rootfs`` into partition 1 of a raw disk, add the boot sectors, convert to qcow2."""
    raw = work / "disk.raw"
    with raw.open("wb") as f:
        f.truncate(DISK_SIZE_BYTES)
    fs_bytes = DISK_SIZE_BYTES - PARTITION_START_BYTES
    say(f"mke2fs: writing the root filesystem ({fs_bytes >> 20} MiB, label {ROOT_LABEL})")
    run_tool(
        [
            *("mke2fs", "-q", "-F", *MKE2FS_OPTIONS),
            *("-L", ROOT_LABEL, "-U", str(uuid.UUID(key[:32]))),
            *("-E", f"offset={PARTITION_START_BYTES}", "-d", str(rootfs)),
            *(str(raw), f"{fs_bytes // 1024}k"),
        ],
        what="writing the root filesystem",
    )
    core = work / "core.img"
    (work / "grub.cfg").write_text(grub_embedded_config(ROOT_APPEND))
    run_tool(
        [
            *("grub-mkimage", "-O", "i386-pc", "-d", str(GRUB_DIR), "-o", str(core)),
            *("-c", str(work / "grub.cfg"), "-p", "(hd0,msdos1)/boot/grub", *GRUB_MODULES),
        ],
        what="making GRUB's core image",
    )
    partition = Partition(PARTITION_START_BYTES // SECTOR_BYTES, fs_bytes // SECTOR_BYTES)
    boot_img = (GRUB_DIR / "boot.img").read_bytes()
    write_boot_sectors(raw, boot_img, core.read_bytes(), int(key[:8], 16), partition)
    say("qemu-img: converting to compressed qcow2")
    run_tool(
        [
            "qemu-img",
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            "qcow2",
            *QCOW2_OPTIONS,
            str(raw),
            str(disk),
        ],
        what="converting the disk to qcow2",
    )


def _build_into(
    staging: Path, apt_dir: Path, key: str, inputs: BuildInputs, say: Callable[[str], None]
) -> None:
    """Fill ``staging`` with disk.qcow2, vmlinuz, initrd.img and manifest.json."""
    work = Path(tempfile.mkdtemp(prefix=f".tmp-{key[:12]}-work-", dir=staging.parent))
    try:
        rootfs = _mmdebstrap(work, apt_dir, say)
        _install_workload(work, rootfs, say)
        kernel = _inside(rootfs, "vmlinuz")
        shutil.copyfile(kernel, staging / "vmlinuz")
        shutil.copyfile(_inside(rootfs, "initrd.img"), staging / "initrd.img")
        installed = parse_dpkg_status((rootfs / "var/lib/dpkg/status").read_text())
        resolved = dict(inputs.resolved)
        differ = sorted(
            f"{name} {version} (resolved {resolved.get(name)})"
            for name, version in installed.items()
            if resolved.get(name) != version
        )
        if differ:
            say(f"installed packages differ from the resolved ones: {', '.join(differ)}")
        _make_disk(work, rootfs, key, staging / "disk.qcow2", say)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    manifest = {
        "key": key,
        "builder_version": BUILDER_VERSION,
        "kernel_version": kernel.name.removeprefix("vmlinuz-"),
        "root_append": ROOT_APPEND,
        "disk_virtual_bytes": DISK_SIZE_BYTES,
        "sources": list(inputs.sources),
        "tools": list(inputs.tools),
        "packages": installed,
    }
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def debian_image(
    *,
    cache_dir: Path | None = None,
    force: bool = False,
    on_progress: Callable[[str], None] | None = None,
) -> DebianImage:
    """Return the Debian guest image for the current inputs, building it if it is not cached.

    Blocking (a cold build downloads ~100 MB and takes a minute or more; a cached one costs a
    refresh of the package lists, ~1 s); call it from a thread in async code. Builders of the
    same cache directory take turns on a lock beside it.

    Args:
        cache_dir: directory holding one subdirectory per image key; default
            :func:`default_cache_dir`.
        force: rebuild even if the image is cached (it is replaced atomically).
        on_progress: called with a short line per step.

    Returns:
        The image, its files inside ``cache_dir/<key>/``.

    Raises:
        ImageBuildError: not root, a tool is missing (the message says what to install), the
            packages cannot be resolved or downloaded, or a build step fails. Nothing is left
            behind but the cache directory's apt state.
    """
    say = on_progress if on_progress is not None else logger.info
    _require_tools()
    root = cache_dir if cache_dir is not None else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with _build_lock(root, say):
        _sweep_leftovers(root)
        apt_dir = root / "apt"
        resolved = resolve_packages(apt_dir, (*BASE_SELECTION, *PACKAGES), say)
        inputs = BuildInputs(APT_SOURCES, PACKAGES, resolved, _recipe(), _tool_versions())
        key = cache_key(inputs)
        final = root / key
        if not force and (cached := _load_cached(final, key)) is not None:
            say(f"using cached Debian image {key[:12]}")
            return cached
        say(f"building Debian image {key[:12]} ({len(inputs.resolved)} packages)")
        started = time.monotonic()
        staging = Path(tempfile.mkdtemp(prefix=f".tmp-{key[:12]}-", dir=root))
        try:
            staging.chmod(0o755)  # readable by an agent's unprivileged QEMU user
            _build_into(staging, apt_dir, key, inputs, say)
            if final.exists():
                trash = Path(tempfile.mkdtemp(prefix=f".old-{key[:12]}-", dir=root))
                os.replace(final, trash / key)
                shutil.rmtree(trash, ignore_errors=True)
            os.rename(staging, final)
        except OSError as err:
            raise ImageBuildError(f"cannot write the image to {final}: {err}") from err
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    image = _load_cached(final, key)
    if image is None:
        raise ImageBuildError(f"image {final} is incomplete after building")
    say(f"Debian image ready in {time.monotonic() - started:.0f} s: {final}")
    return image


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vmferry.guest.debian``: build (or reuse) the image and print its paths."""
    parser = argparse.ArgumentParser(
        prog="python -m vmferry.guest.debian",
        description="Build (or reuse) vmferry's Debian 12 guest image and print its paths.",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: user cache dir")
    args = parser.parse_args(argv)

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        image = debian_image(cache_dir=args.cache_dir, force=args.force, on_progress=progress)
    except ImageBuildError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"disk: {image.disk}\nkernel: {image.kernel}\ninitrd: {image.initrd}")
    print(f"append: {image.root_append}\nkey: {image.key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
