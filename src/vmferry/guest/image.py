"""Build (and cache) the lab guest: Debian's cloud kernel plus an initramfs we write ourselves.

The kernel comes out of the ``linux-image-*-cloud-amd64`` .deb (``apt-get download`` and
``dpkg-deb -x`` into a temporary directory; nothing is installed on the host). The initramfs
holds a static busybox, the static workload program compiled from ``workload.c``, the disk
drivers (Debian builds virtio-pci, virtio-blk and virtio-scsi as modules) and an ``/init``
script that, when the VM has a disk (``vmferry.disk_dev=`` on the kernel command line), loads
the drivers of that disk's bus and then starts the workload with the ``vmferry.*`` kernel
arguments. A diskless guest loads no modules; loading them costs ~0.2 s (virtio-blk) to
~0.4 s (virtio-scsi) of boot under TCG.

The module load order is computed from the ``depends=`` field of each module's ``.modinfo``
section (the .deb ships no ``modules.dep``), dependencies first.

Images are cached under ``<user cache>/vmferry/images/<key>/``, where the key hashes every
input (kernel package and version, workload source, busybox binary, init script, builder
version), so a changed input gives a new image and an unchanged one is never rebuilt.

Example:
    >>> image = build_image(log=print)  # doctest: +SKIP
    >>> argv = ["qemu-system-x86_64", "-kernel", str(image.kernel_path),
    ...         "-initrd", str(image.initrd_path),
    ...         "-append", " ".join([*KERNEL_BASE_ARGS, *spec.kernel_args()])]  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from vmferry.guest.modules import (
    DISK_DRIVERS,
    DiskDrivers,
    ImageBuildError,
    KernelModule,
    collect_disk_modules,
    module_load_order,
    read_modinfo,
)
from vmferry.guest.newc import DeviceNode, Directory, Entry, RegularFile, Symlink, build_archive

__all__ = [
    "BUILDER_VERSION",
    "DISK_DRIVERS",
    "INIT_SCRIPT",
    "KERNEL_BASE_ARGS",
    "KERNEL_META_PACKAGE",
    "GuestImage",
    "ImageBuildError",
    "KernelModule",
    "build_image",
    "compile_workload",
    "default_cache_dir",
    "module_load_order",
    "read_modinfo",
    "workload_source",
]

logger = logging.getLogger(__name__)
logger.addHandler(logging.NullHandler())

BUILDER_VERSION = "2"
KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
# ttyS0 is the console, ttyS1 the workload channel; panic=-1 turns a guest panic into a QEMU
# exit (with -no-reboot) instead of a hang.
KERNEL_BASE_ARGS = ("console=ttyS0", "panic=-1", "rdinit=/init")
BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
APT_LISTS = Path("/var/lib/apt/lists")
KERNEL_MEMO = "kernel-package.json"  # apt's answer, beside the images
# Where /init finds the modules (<name>.ko) and the load orders (<prefix>.load, all.load).
MODULE_DIR = "lib/modules"
_TOOL_TIMEOUT_S = 600.0

INIT_SCRIPT = """\
#!/bin/busybox sh
# vmferry guest init: mount the API filesystems, start the workload, never exit.
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox --install -s
args=""
disk=""
for word in $(cat /proc/cmdline); do
    case "$word" in
        vmferry.disk_dev=*) disk="${word#vmferry.disk_dev=}"; args="$args ${word#vmferry.}" ;;
        vmferry.*=*) args="$args ${word#vmferry.}" ;;
    esac
done
# Only a VM with a disk pays for drivers, and only for its bus's (by the device name's first
# two letters; all of them for an unknown name). The workload waits for the device node.
if [ -n "$disk" ]; then
    load="/lib/modules/${disk%"${disk#??}"}.load"
    [ -f "$load" ] || load=/lib/modules/all.load
    while read -r module; do
        insmod "/lib/modules/$module" || echo "vmferry-init: insmod $module failed"
    done < "$load"
fi
echo "vmferry-init: starting /bin/workload$args"
/bin/workload $args
echo "vmferry-init: workload exited with status $?"
while true; do
    sleep 3600
done
"""


@dataclass(frozen=True, slots=True)
class GuestImage:
    """A built guest: boot it with ``-kernel kernel_path -initrd initrd_path``.

    Attributes:
        kernel_path: the kernel (``vmlinuz``).
        initrd_path: the uncompressed newc initramfs.
        kernel_version: e.g. ``6.1.0-56-cloud-amd64``.
        key: the cache key (hex sha256 of every input).
    """

    kernel_path: Path
    initrd_path: Path
    kernel_version: str
    key: str


def default_cache_dir() -> Path:
    """Where images are cached: ``<user cache dir>/vmferry/images``."""
    return Path(platformdirs.user_cache_dir("vmferry")) / "images"


def _run(argv: Sequence[str], *, cwd: Path | None = None, what: str) -> str:
    """Run a tool, return its stdout; translate every failure into ImageBuildError."""
    logger.debug("running %s", argv)
    try:
        done = subprocess.run(
            list(argv),
            cwd=cwd,
            check=True,
            capture_output=True,
            text=True,
            timeout=_TOOL_TIMEOUT_S,
        )
    except FileNotFoundError as err:
        raise ImageBuildError(f"{what}: {argv[0]} not found") from err
    except subprocess.TimeoutExpired as err:
        raise ImageBuildError(f"{what}: {argv[0]} took longer than {_TOOL_TIMEOUT_S:g} s") from err
    except subprocess.CalledProcessError as err:
        tail = "\n".join((err.stderr or err.stdout or "").strip().splitlines()[-10:])
        raise ImageBuildError(
            f"{what}: {' '.join(argv)} failed with status {err.returncode}\n{tail}"
        ) from err
    return done.stdout


def _require_tools() -> None:
    missing = [
        (tool, package)
        for tool, package in (
            ("apt-get", "apt"),
            ("apt-cache", "apt"),
            ("dpkg-deb", "dpkg"),
            ("gcc", "gcc (and libc6-dev for static linking)"),
        )
        if shutil.which(tool) is None
    ]
    if missing:
        names = ", ".join(tool for tool, _ in missing)
        packages = ", ".join(sorted({package for _, package in missing}))
        raise ImageBuildError(
            f"cannot build the guest image: {names} not found; install {packages} "
            "(the builder needs a Debian-family host)"
        )


def _find_busybox() -> Path:
    for candidate in BUSYBOX_CANDIDATES:
        path = Path(candidate)
        if path.is_file() and _is_static_elf(path):
            return path
    raise ImageBuildError(
        "no static busybox found (looked at "
        f"{', '.join(BUSYBOX_CANDIDATES)}): apt-get install busybox-static"
    )


def _is_static_elf(path: Path) -> bool:
    """True for a 64-bit little-endian ELF without a PT_INTERP (dynamic loader) header."""
    with path.open("rb") as f:
        ident = f.read(64)
        if len(ident) < 64 or ident[:4] != b"\x7fELF" or ident[4] != 2 or ident[5] != 1:
            return False
        (phoff,) = struct.unpack_from("<Q", ident, 32)
        phentsize, phnum = struct.unpack_from("<HH", ident, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    pt_interp = 3
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != pt_interp for i in range(phnum))


def _apt_lists_signature() -> str | None:
    """What apt's answers depend on: its package lists (``apt-get update`` replaces them).
    None when they cannot be read (then nothing is remembered)."""
    try:
        stats = [(entry.name, entry.stat()) for entry in APT_LISTS.iterdir() if entry.is_file()]
    except OSError:
        return None
    entries = sorted((name, st.st_mtime_ns, st.st_size) for name, st in stats)
    return _sha256(repr(entries).encode()) if entries else None


def _kernel_package(root: Path) -> tuple[str, str]:
    """:func:`_resolve_kernel_package`, remembered in ``root`` for as long as apt's package
    lists stay the same: every lab, agent and CLI start looks the image up, and one
    ``apt-cache show`` costs a second of CPU on hosts without apt's binary cache."""
    memo = root / KERNEL_MEMO
    signature = _apt_lists_signature()
    try:
        known = json.loads(memo.read_text())
        if signature is not None and known["lists"] == signature:
            return str(known["package"]), str(known["version"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    package, version = _resolve_kernel_package()
    if signature is not None:
        try:
            root.mkdir(parents=True, exist_ok=True)
            fd, staging = tempfile.mkstemp(prefix=".kernel-", dir=root)
            with os.fdopen(fd, "w") as out:
                json.dump({"lists": signature, "package": package, "version": version}, out)
            os.replace(staging, memo)
        except OSError as err:  # a read-only cache still builds and loads images
            logger.debug("cannot remember the kernel package in %s: %s", memo, err)
    return package, version


def _resolve_kernel_package() -> tuple[str, str]:
    """Name and version of the kernel package the cloud meta-package depends on.

    One ``apt-cache show`` of the meta-package gives both (its Depends pins the version);
    apt-cache is slow (~1.5 s) on hosts without a binary package cache, so calls count.
    """
    depends = re.compile(
        r"^Depends:.*?\b(linux-image-\S+-cloud-amd64)\b(?:\s*\(=\s*([^)\s]+)\))?", re.MULTILINE
    )

    def lookup() -> tuple[str, str | None] | None:
        try:
            out = _run(
                ["apt-cache", "show", "--no-all-versions", KERNEL_META_PACKAGE],
                what="resolving the kernel package",
            )
        except ImageBuildError:
            return None
        match = depends.search(out)
        return (match[1], match[2]) if match else None

    found = lookup()
    if found is None:
        logger.info("kernel package not known to apt; running apt-get update")
        _run(["apt-get", "update"], what="refreshing the package lists")
        found = lookup()
    if found is None:
        raise ImageBuildError(
            f"apt knows no {KERNEL_META_PACKAGE}: enable Debian's main archive in apt sources"
        )
    package, version = found
    return package, version if version is not None else _package_version(package)


def _package_version(package: str) -> str:
    out = _run(["apt-cache", "show", "--no-all-versions", package], what=f"looking up {package}")
    match = re.search(r"^Version:\s*(\S+)", out, re.MULTILINE)
    if match is None:
        raise ImageBuildError(f"apt-cache show {package} printed no Version")
    return match[1]


def workload_source() -> bytes:
    """The workload program's C source, as shipped in this package."""
    return (importlib.resources.files("vmferry.guest") / "workload.c").read_bytes()


def compile_workload(source: bytes, directory: Path) -> Path:
    """Compile the workload program, static, into ``directory/workload``; return its path.

    Raises:
        ImageBuildError: gcc (or the static libc) is missing, or the source does not compile.
    """
    (directory / "workload.c").write_bytes(source)
    _run(
        [
            *("gcc", "-static", "-pthread", "-O2", "-Wall", "-Wextra"),
            *("-o", "workload", "workload.c"),
        ],
        cwd=directory,
        what="compiling the guest workload (needs gcc and libc6-dev)",
    )
    return directory / "workload"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _cache_key(package: str, version: str, source: bytes, busybox: bytes) -> str:
    parts = [
        f"builder={BUILDER_VERSION}",
        f"kernel={package}={version}",
        f"workload={_sha256(source)}",
        f"busybox={_sha256(busybox)}",
        f"init={_sha256(INIT_SCRIPT.encode())}",
        f"modules={json.dumps(DISK_DRIVERS, sort_keys=True)}",
    ]
    return _sha256("\n".join(parts).encode())


def _load_cached(directory: Path, key: str) -> GuestImage | None:
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    kernel = directory / "vmlinuz"
    initrd = directory / "initrd.cpio"
    if not (kernel.is_file() and initrd.is_file()) or not isinstance(manifest, dict):
        return None
    version = manifest.get("kernel_version")
    if not isinstance(version, str):
        return None
    return GuestImage(kernel, initrd, version, key)


def _initramfs_entries(busybox: bytes, workload: bytes, drivers: DiskDrivers) -> list[Entry]:
    dirs = ["bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "run", "root"]
    return [
        *(Directory(d) for d in dirs),
        # The kernel opens /dev/console for init before devtmpfs is mounted.
        DeviceNode("dev/console", "c", 5, 1, 0o600),
        DeviceNode("dev/null", "c", 1, 3, 0o666),
        RegularFile("init", INIT_SCRIPT.encode(), 0o755),
        RegularFile("bin/busybox", busybox, 0o755),
        Symlink("bin/sh", "busybox"),
        RegularFile("bin/workload", workload, 0o755),
        Directory("lib"),
        Directory(MODULE_DIR),
        *(RegularFile(f"{MODULE_DIR}/{m.name}.ko", m.data) for m in drivers.modules),
        *(
            RegularFile(f"{MODULE_DIR}/{name}.load", "".join(f"{n}.ko\n" for n in order).encode())
            for name, order in drivers.load_orders.items()
        ),
    ]


def _build_into(
    staging: Path, package: str, busybox: bytes, source: bytes, log: Callable[[str], None]
) -> str:
    """Fill ``staging`` with vmlinuz and initrd.cpio; return the kernel version."""
    with tempfile.TemporaryDirectory(prefix="vmferry-build-") as tmp_name:
        tmp = Path(tmp_name)
        log(f"downloading {package}")
        _run(["apt-get", "download", package], cwd=tmp, what=f"downloading {package}")
        debs = sorted(tmp.glob(f"{package}_*.deb"))
        if not debs:
            raise ImageBuildError(f"apt-get download {package} produced no .deb")
        log(f"unpacking {debs[0].name}")
        root = tmp / "root"
        _run(["dpkg-deb", "-x", str(debs[0]), str(root)], what=f"unpacking {debs[0].name}")
        kernels = sorted((root / "boot").glob("vmlinuz-*"))
        if not kernels:
            raise ImageBuildError(f"{debs[0].name} holds no boot/vmlinuz-*")
        kernel_version = kernels[0].name.removeprefix("vmlinuz-")
        shutil.copyfile(kernels[0], staging / "vmlinuz")
        drivers = collect_disk_modules(root, kernel_version)
        for name, order in drivers.load_orders.items():
            log(f"disk drivers for {name}: {' '.join(order)}")

        log("compiling workload.c")
        workload = compile_workload(source, tmp).read_bytes()

    log("writing initramfs")
    archive = build_archive(_initramfs_entries(busybox, workload, drivers))
    (staging / "initrd.cpio").write_bytes(archive)
    manifest = {
        "builder_version": BUILDER_VERSION,
        "kernel_package": package,
        "kernel_version": kernel_version,
        "workload_sha256": _sha256(source),
        "busybox_sha256": _sha256(busybox),
        "module_load_orders": drivers.load_orders,
    }
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return kernel_version


def build_image(
    cache_dir: Path | None = None,
    *,
    force: bool = False,
    log: Callable[[str], None] | None = None,
) -> GuestImage:
    """Return the guest image for the current inputs, building it if it is not cached.

    Blocking (downloads and compiles); call it from a thread in async code.

    Args:
        cache_dir: directory holding one subdirectory per image key; default
            `default_cache_dir()`.
        force: rebuild even if a cached image exists (it is replaced atomically).
        log: called with a short progress line per step.

    Returns:
        The image, its files inside ``cache_dir/<key>/``.

    Raises:
        ImageBuildError: a tool is missing (the message says what to install), the kernel
            package cannot be resolved or downloaded, or the workload does not compile.
    """
    say = log if log is not None else logger.info
    _require_tools()
    busybox_path = _find_busybox()
    busybox = busybox_path.read_bytes()
    source = workload_source()
    root = cache_dir if cache_dir is not None else default_cache_dir()
    package, version = _kernel_package(root)
    key = _cache_key(package, version, source, busybox)
    final = root / key
    if not force and (cached := _load_cached(final, key)) is not None:
        say(f"using cached image {key[:12]} ({cached.kernel_version})")
        return cached

    say(f"building image {key[:12]} from {package} {version}")
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{key[:12]}-", dir=root))
    try:
        _build_into(staging, package, busybox, source, say)
        if final.exists():
            # force, or a broken leftover: move it aside first so the swap stays atomic.
            trash = Path(tempfile.mkdtemp(prefix=f".old-{key[:12]}-", dir=root))
            os.replace(final, trash / key)
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.rename(staging, final)
        except OSError:
            # Another builder won the race with the same inputs: use its image.
            if _load_cached(final, key) is None:
                raise
    except OSError as err:
        raise ImageBuildError(f"cannot write the image to {final}: {err}") from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    image = _load_cached(final, key)
    if image is None:
        raise ImageBuildError(f"image {final} is incomplete after building")
    say(f"image ready: {final}")
    return image
