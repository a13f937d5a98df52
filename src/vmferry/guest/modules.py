"""Kernel modules for the lab guest's initramfs: read them out of Debian's kernel package,
find their dependencies from their own ``.modinfo``, and order their loading."""

from __future__ import annotations

import lzma
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import zstandard

from vmferry.core.errors import FerryError

__all__ = [
    "ALL_MODULES_LOAD",
    "DISK_DRIVERS",
    "DiskDrivers",
    "ImageBuildError",
    "KernelModule",
    "collect_disk_modules",
    "module_load_order",
    "read_modinfo",
]

# The drivers of each disk bus the lab offers, by the first two letters of the guest's device
# name (virtio-blk disks are vdX, virtio-scsi disks sdX); their dependencies are read from the
# modules themselves. /init loads only the disk's own bus: each insmod costs 20-100 ms under TCG.
DISK_DRIVERS: Mapping[str, tuple[str, ...]] = {
    "vd": ("virtio_pci", "virtio_blk"),
    "sd": ("virtio_pci", "virtio_scsi", "sd_mod"),
}
ALL_MODULES_LOAD = "all"


class ImageBuildError(FerryError):
    """The guest image could not be built (a missing tool, a failed download or compile)."""


@dataclass(frozen=True, slots=True)
class KernelModule:
    """A loadable kernel module, uncompressed, with what its ``.modinfo`` says about it.

    Attributes:
        name: the module name (``_``, never ``-``), e.g. ``virtio_blk``.
        depends: modules that must be loaded first (``depends=``), in their listed order.
        vermagic: the kernel it was built for, e.g. ``6.1.0-56-cloud-amd64 SMP preempt ...``.
        data: the ``.ko`` ELF image.
    """

    name: str
    depends: tuple[str, ...]
    vermagic: str
    data: bytes


def read_modinfo(data: bytes) -> dict[str, str]:
    """The ``key=value`` strings of a kernel module's ``.modinfo`` section.

    Args:
        data: an uncompressed ``.ko`` file.

    Returns:
        Each key's first value (keys such as ``alias`` repeat; ``name``, ``depends`` and
        ``vermagic`` do not).

    Raises:
        ImageBuildError: not a 64-bit little-endian ELF, or it has no ``.modinfo`` section.
    """
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ImageBuildError("not a 64-bit little-endian ELF file")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    if shentsize < 64 or shstrndx >= shnum or shoff + shnum * shentsize > len(data):
        raise ImageBuildError("ELF section header table out of bounds")

    def section(index: int) -> tuple[int, bytes]:
        base = shoff + index * shentsize
        (name_offset,) = struct.unpack_from("<I", data, base)
        offset, size = struct.unpack_from("<QQ", data, base + 24)
        return name_offset, data[offset : offset + size]

    _, names = section(shstrndx)
    for index in range(shnum):
        name_offset, body = section(index)
        end = names.find(b"\0", name_offset)
        if names[name_offset:end] != b".modinfo":
            continue
        info: dict[str, str] = {}
        for item in body.split(b"\0"):
            key, sep, value = item.decode("utf-8", errors="replace").partition("=")
            if sep:
                info.setdefault(key, value)
        return info
    raise ImageBuildError("no .modinfo section")


def module_load_order(
    modules: Mapping[str, KernelModule],
    wanted: Sequence[str],
    builtin: frozenset[str] = frozenset(),
) -> list[KernelModule]:
    """``wanted`` and everything they depend on, each module after its dependencies.

    Args:
        modules: the available modules by name (at least ``wanted`` and their dependencies).
        wanted: the modules to load, in the preferred order.
        builtin: modules compiled into the kernel: satisfied without loading.

    Returns:
        The modules in a valid ``insmod`` order (deterministic for the same inputs).

    Raises:
        ImageBuildError: a module or a dependency is neither available nor built in, or the
            dependencies form a cycle.
    """
    order: list[KernelModule] = []
    done: set[str] = set()
    visiting: list[str] = []

    def visit(name: str) -> None:
        if name in done or name in builtin:
            return
        if name in visiting:
            cycle = " -> ".join([*visiting[visiting.index(name) :], name])
            raise ImageBuildError(f"kernel module dependency cycle: {cycle}")
        module = modules.get(name)
        if module is None:
            needed_by = f" (needed by {visiting[-1]})" if visiting else ""
            raise ImageBuildError(f"kernel module {name}{needed_by} not found")
        visiting.append(name)
        for dependency in module.depends:
            visit(dependency)
        visiting.pop()
        done.add(name)
        order.append(module)

    for name in wanted:
        visit(name)
    return order


def _module_name(path: Path) -> str:
    return path.name.split(".ko", 1)[0].replace("-", "_")


def _read_module_file(path: Path) -> bytes:
    """A module file's ELF image; Debian ships plain ``.ko``, other builds compress them."""
    raw = path.read_bytes()
    try:
        if path.name.endswith(".ko.xz"):
            return lzma.decompress(raw)
        if path.name.endswith(".ko.zst"):
            return zstandard.ZstdDecompressor().decompressobj().decompress(raw)
    except (lzma.LZMAError, zstandard.ZstdError) as err:
        raise ImageBuildError(f"cannot decompress {path.name}: {err}") from err
    if not path.name.endswith(".ko"):
        raise ImageBuildError(f"unsupported kernel module compression: {path.name}")
    return raw


def _load_module(path: Path, kernel_version: str) -> KernelModule:
    data = _read_module_file(path)
    try:
        info = read_modinfo(data)
    except ImageBuildError as err:
        raise ImageBuildError(f"kernel module {path.name}: {err}") from err
    name = info.get("name", _module_name(path))
    vermagic = info.get("vermagic", "")
    # insmod refuses a module built for another kernel; say so at build time instead.
    if vermagic.split(" ", 1)[0] != kernel_version:
        raise ImageBuildError(
            f"kernel module {path.name} is for {vermagic or 'an unknown kernel'!r}, "
            f"not {kernel_version}"
        )
    depends = tuple(d.replace("-", "_") for d in info.get("depends", "").split(",") if d)
    return KernelModule(name, depends, vermagic, data)


@dataclass(frozen=True, slots=True)
class DiskDrivers:
    """The modules to ship, and the load order of each bus's drivers (module names)."""

    modules: list[KernelModule]
    load_orders: dict[str, list[str]]


def collect_disk_modules(root: Path, kernel_version: str) -> DiskDrivers:
    """Read `DISK_DRIVERS` and their dependencies out of the unpacked kernel package."""
    base = root / "lib" / "modules" / kernel_version
    paths = {_module_name(path): path for path in sorted(base.glob("kernel/**/*.ko*"))}
    builtin_list = base / "modules.builtin"
    builtin = frozenset(
        _module_name(Path(line.strip()))
        for line in (builtin_list.read_text().splitlines() if builtin_list.is_file() else [])
        if line.strip()
    )
    wanted = list(dict.fromkeys(name for names in DISK_DRIVERS.values() for name in names))
    modules: dict[str, KernelModule] = {}
    pending = list(wanted)
    while pending:
        name = pending.pop()
        if name in modules or name in builtin:
            continue
        path = paths.get(name)
        if path is None:
            continue  # module_load_order names it and the module that needs it
        module = _load_module(path, kernel_version)
        modules[name] = module
        pending.extend(module.depends)
    everything = module_load_order(modules, wanted, builtin)
    load_orders = {
        prefix: [module.name for module in module_load_order(modules, names, builtin)]
        for prefix, names in DISK_DRIVERS.items()
    }
    load_orders[ALL_MODULES_LOAD] = [module.name for module in everything]
    return DiskDrivers(everything, load_orders)
