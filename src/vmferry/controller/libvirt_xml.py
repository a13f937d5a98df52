"""Map a libvirt domain XML onto a VM vmferry can run, or refuse it with every reason why.

``virsh dumpxml NAME`` (or the XML ``virt-install`` writes) describes a guest in far more
detail than a vmferry VM holds: one disk image, at most one NIC, memory, vCPUs, a machine
type, a CPU model, and the firmware or a kernel to boot. :func:`parse_domain` maps what fits,
says what it had to change (``adjusted``) and which harmless devices it drops (``ignored``),
and refuses everything else in one error that lists every reason: a domain is imported whole
or not at all. The caller reads the file; nothing here touches a disk or the network, and the
parser neither resolves entities nor fetches anything. The domain's <devices> are judged in
``libvirt_devices``.

Example::

    domain = parse_domain(Path("debian12.xml").read_bytes(), name="debian12")
    print(domain.memory_bytes, domain.disk, domain.adjusted)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from lxml import etree

from vmferry.controller.libvirt_devices import (
    Element,
    Findings,
    ImportedDisk,
    abs_path,
    attrs,
    children,
    judge_devices,
    tag_name,
)
from vmferry.core.boot import Firmware, GuestBoot
from vmferry.core.errors import ConfigError
from vmferry.core.model import DEFAULT_CPU_MODEL, VmName, VmSpec, validate_name

__all__ = ["DomainImportError", "ImportedDisk", "ImportedDomain", "parse_domain"]


class DomainImportError(ConfigError):
    """A libvirt domain vmferry cannot import as it is. Nothing was created.

    Attributes:
        reasons: every reason found, one human sentence each, in document order.
    """

    def __init__(self, reasons: Iterable[str]) -> None:
        self.reasons = tuple(reasons)
        super().__init__(self.reasons)

    def __str__(self) -> str:
        return "cannot import this libvirt domain:\n" + "\n".join(f"  - {r}" for r in self.reasons)


@dataclass(frozen=True, slots=True)
class ImportedDomain:
    """What vmferry will run for a libvirt domain.

    ``nvram`` (the UEFI variable store, where the guest's boot entries live) and
    ``mac_address`` are carried so that the VM's creator can keep them; the guest may depend
    on either (a boot entry outside the removable-media path, a MAC-bound network config).
    """

    name: str
    memory_bytes: int
    vcpus: int
    machine_type: str
    cpu_model: str
    firmware: Firmware
    kernel: Path | None
    initrd: Path | None
    cmdline: str | None
    disk: ImportedDisk | None
    nic: bool
    adjusted: tuple[str, ...]
    ignored: tuple[str, ...]
    nvram: Path | None = None
    mac_address: str | None = None

    def guest_boot(self) -> GuestBoot:
        """How the VM boots, as a vmferry spec holds it (checked by :func:`parse_domain`)."""
        return GuestBoot(self.firmware, self.kernel, self.initrd, self.cmdline, self.nic)


def parse_domain(xml_text: str | bytes, *, name: str | None = None) -> ImportedDomain:
    """Map a libvirt domain XML onto a vmferry VM.

    Args:
        xml_text: the document, e.g. the output of ``virsh dumpxml NAME``.
        name: the VM's name in vmferry; defaults to the domain's ``<name>``.

    Returns:
        The VM to create, with the changes made to fit (``adjusted``) and the devices dropped
        (``ignored``).

    Raises:
        DomainImportError: the text is not a libvirt KVM/QEMU domain, or the domain uses
            anything vmferry cannot express; ``reasons`` lists all of it.
    """
    root = _parse_xml(xml_text)
    found = Findings()
    _check_domain_type(root, found)
    _walk_top_level(root, found)
    vm_name = _name(root, name, found)
    memory_bytes = _memory(root, found)
    vcpus = _vcpus(root, found)
    _check_fits(memory_bytes, vcpus, found)
    boot = _os(root.find("os"), found)
    cpu_model = _cpu(root.find("cpu"), found)
    disk, nic, mac = judge_devices(root.find("devices"), found)
    _check_boot(boot, nic, found)
    if found.refused:
        raise DomainImportError(found.refused)
    return ImportedDomain(
        name=vm_name,
        memory_bytes=memory_bytes or 0,
        vcpus=vcpus,
        machine_type=boot.machine_type,
        cpu_model=cpu_model,
        firmware=boot.firmware,
        kernel=boot.kernel,
        initrd=boot.initrd,
        cmdline=boot.cmdline,
        disk=disk,
        nic=nic,
        adjusted=tuple(found.adjusted),
        ignored=found.ignored_counted(),
        nvram=boot.nvram,
        mac_address=mac,
    )


def _parse_xml(xml_text: str | bytes) -> Element:
    """Parse without entities, DTDs, network or huge trees; the root must be <domain>.

    Raises:
        DomainImportError: not XML, or not a domain.
    """
    # A str is already decoded: make libxml2 ignore any encoding the declaration names.
    parser = etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        huge_tree=False,
        load_dtd=False,
        remove_comments=True,
        remove_pis=True,
        encoding="utf-8" if isinstance(xml_text, str) else None,
    )
    data = xml_text.encode("utf-8") if isinstance(xml_text, str) else xml_text
    try:
        root = etree.fromstring(data, parser)
    except etree.XMLSyntaxError as err:
        raise DomainImportError([f"not an XML document: {err.msg}"]) from err
    if root.getroottree().docinfo.internalDTD is not None:
        raise DomainImportError(["the document has a DOCTYPE; libvirt domain XML never does"])
    if root.tag != "domain":
        what = f"the root element is {tag_name(root)}, not <domain>"
        raise DomainImportError([f"{what} (`virsh dumpxml NAME` writes one)"])
    return root


def _check_domain_type(root: Element, found: Findings) -> None:
    kind = root.get("type")
    if kind not in ("kvm", "qemu"):
        found.refuse(f"domain type {kind!r}: vmferry runs QEMU guests (type 'kvm' or 'qemu')")


# Top-level elements read by their own step, or harmless to drop without a word.
_TOP_LEVEL_READ = frozenset(
    {"name", "uuid", "title", "description", "metadata", "memory", "currentMemory", "vcpu"}
    | {"vcpus", "os", "cpu", "devices", "features", "clock", "pm", "seclabel", "resource"}
    | {"on_poweroff", "on_reboot", "on_crash", "on_lockfailure", "perf", "cputune"}
    | {"memoryBacking", "iothreadids", "defaultiothread"}
)
# Host-side settings vmferry does not apply; the guest runs the same without them.
_TOP_LEVEL_ADJUSTED = {
    "iothreads": "I/O threads (<iothreads>) not kept: QEMU serves the disk from its main loop",
    "memtune": "host memory limits (<memtune>) not applied",
    "blkiotune": "host block I/O weights (<blkiotune>) not applied",
    "sysinfo": "SMBIOS strings (<sysinfo>) not kept: the guest sees QEMU's defaults",
    "genid": "VM generation ID (<genid>) not kept",
}
_TOP_LEVEL_REFUSED = {
    "numatune": "host NUMA memory placement (<numatune>): vmferry does not bind guest memory "
    "to host NUMA nodes, and the destination may have other nodes",
    "maxMemory": "memory hotplug (<maxMemory>): vmferry gives a VM one fixed block of RAM",
    "launchSecurity": "confidential guest (<launchSecurity>): its encrypted memory cannot be "
    "compared or moved by vmferry",
    "idmap": "user namespace mapping (<idmap>) is for containers, not QEMU guests",
    "bootloader": "a host-side bootloader (<bootloader>) is for Xen guests",
    "keywrap": "key wrapping (<keywrap>) is for s390 guests",
}


def _walk_top_level(root: Element, found: Findings) -> None:
    for child in children(root):
        tag = child.tag
        if tag in _TOP_LEVEL_READ:
            continue
        if tag in _TOP_LEVEL_ADJUSTED:
            found.adjust(_TOP_LEVEL_ADJUSTED[tag])
        elif tag in _TOP_LEVEL_REFUSED:
            found.refuse(_TOP_LEVEL_REFUSED[tag])
        else:
            found.refuse(f"{tag_name(child)} is not something vmferry can express")
    _cputune(root.find("cputune"), found)
    _memory_backing(root.find("memoryBacking"), found)
    _features_and_clock(root, found)


def _features_and_clock(root: Element, found: Findings) -> None:
    features = root.find("features")
    dropped = (
        []
        if features is None
        else [t for t in _HYPERVISOR_FEATURES if features.find(t) is not None]
    )
    if dropped:
        found.adjust(
            f"hypervisor enlightenments not kept (<features>: {', '.join(dropped)}): the guest "
            "runs without them"
        )
    clock = root.find("clock")
    offset = "utc" if clock is None else clock.get("offset", "utc")
    if offset != "utc":
        found.adjust(f"clock offset {offset!r} not kept: the guest's real-time clock runs in UTC")


_HYPERVISOR_FEATURES = ("hyperv", "kvm", "xen")


def _name(root: Element, override: str | None, found: Findings) -> str:
    if override is not None:
        return _valid_name(override, "--name", found)
    text = (root.findtext("name") or "").strip()
    if not text:
        found.refuse("the domain has no <name>: choose one with --name")
        return ""
    return _valid_name(text, "libvirt name", found)


def _valid_name(text: str, what: str, found: Findings) -> str:
    try:
        return validate_name(text, what)
    except ConfigError as err:
        hint = "; choose another with --name" if what != "--name" else ""
        found.refuse(f"{err}{hint}")
        return text


# libvirt's size suffixes (virScaleInteger): the first letter in either case; alone or with
# "iB" it is binary, with "B" decimal; "b"/"bytes" are bytes. No unit means KiB.
_POWERS = "kmgtpe"


def _scale(unit: str) -> int | None:
    if not unit:
        return 1024
    if unit.lower() in ("b", "byte", "bytes"):
        return 1
    power, rest = _POWERS.find(unit[0].lower()) + 1, unit[1:].lower()
    if power == 0 or rest not in ("", "ib", "b"):
        return None
    return int((1000 if rest == "b" else 1024) ** power)


def _size_bytes(el: Element, found: Findings) -> int | None:
    """An element's size in bytes, rounded up to KiB as libvirt does; None if unreadable."""
    text, unit = (el.text or "").strip(), el.get("unit", "")
    scale = _scale(unit)
    if scale is None or not text.isdigit():
        found.refuse(f"<{el.tag}> {text!r} with unit {unit!r} is not a size libvirt accepts")
        return None
    return -(-int(text) * scale // 1024) * 1024


def _memory(root: Element, found: Findings) -> int | None:
    memory_el, current_el = root.find("memory"), root.find("currentMemory")
    if memory_el is None:
        found.refuse("the domain has no <memory>")
        return None
    memory = _size_bytes(memory_el, found)
    if memory is None:
        return None
    current = None if current_el is None else _size_bytes(current_el, found)
    if current is not None and current < memory:
        found.adjust(
            f"the balloon target (<currentMemory> {_mib(current)}) is dropped: the guest gets "
            f"all of its <memory>, {_mib(memory)}"
        )
    whole_mib = -(-memory // (1 << 20)) << 20
    if whole_mib != memory:
        found.adjust(f"memory {memory} bytes rounded up to {_mib(whole_mib)} (vmferry counts MiB)")
    return whole_mib


def _vcpus(root: Element, found: Findings) -> int:
    vcpu = root.find("vcpu")
    if vcpu is None:
        return 1  # libvirt's default
    text, current = (vcpu.text or "").strip(), vcpu.get("current")
    if not text.isdigit() or (current is not None and not current.isdigit()):
        found.refuse(f"<vcpu> {text!r} (current {current!r}) is not a vCPU count")
        return 1
    if vcpu.get("cpuset"):
        found.refuse(f"vCPU pinning (<vcpu cpuset='{vcpu.get('cpuset')}'>): vmferry does not pin")
    if vcpu.get("placement") == "auto":
        found.adjust("automatic NUMA placement (<vcpu placement='auto'>) not applied")
    if current is not None and int(current) < int(text):
        found.adjust(
            f"vCPU hotplug dropped: {current} of {text} vCPUs were online, the VM gets {current}"
        )
        return int(current)
    return int(text)


def _check_fits(memory_bytes: int | None, vcpus: int, found: Findings) -> None:
    """Refuse sizes a vmferry VM cannot have; the limits are VmSpec's own."""
    checks: list[Callable[[], object]] = [lambda: VmSpec(name=VmName("import"), vcpus=vcpus)]
    if memory_bytes is not None:
        checks.insert(0, lambda: VmSpec(name=VmName("import"), memory_bytes=memory_bytes))
    for check in checks:
        try:
            check()
        except ConfigError as err:
            found.refuse(str(err))


def _check_boot(boot: _Boot, nic: bool, found: Findings) -> None:
    """Refuse what GuestBoot refuses (paths QEMU cannot take, a multi-line command line)."""
    try:
        GuestBoot(boot.firmware, boot.kernel, boot.initrd, boot.cmdline, nic)
    except ConfigError as err:
        found.refuse(str(err))


_PINNING = ("vcpupin", "emulatorpin", "iothreadpin")


def _cputune(cputune: Element | None, found: Findings) -> None:
    if cputune is None:
        return
    tags = [child.tag for child in children(cputune)]
    pins = [t for t in dict.fromkeys(tags) if t in _PINNING]
    if pins:
        found.refuse(
            f"CPU pinning (<cputune>: {', '.join(pins)}): vmferry does not pin vCPUs or QEMU's "
            "threads, and the destination has other CPUs"
        )
    rest = [t for t in dict.fromkeys(tags) if t not in _PINNING]
    if rest:
        found.adjust(f"host CPU tuning not applied (<cputune>: {', '.join(rest)})")


# <memoryBacking> children: hugepages and a file-backed RAM change where guest memory must
# come from on every host, so they are refused; the rest only tune the host side.
_BACKING_REFUSED = {
    "hugepages": "hugepages (<memoryBacking><hugepages>): the guest's RAM would have to come "
    "from reserved hugepages on every host; vmferry allocates ordinary memory",
}


def _memory_backing(backing: Element | None, found: Findings) -> None:
    if backing is None:
        return
    host_options = []
    for child in children(backing):
        tag = child.tag
        if tag in _BACKING_REFUSED:
            found.refuse(_BACKING_REFUSED[tag])
        elif tag == "source" and child.get("type") == "file":
            found.refuse(
                "RAM in a host file (<memoryBacking><source type='file'>): vmferry chooses "
                "the RAM backend itself"
            )
        elif tag == "access" and child.get("mode") == "shared":
            found.adjust(
                "shared RAM (<memoryBacking><access mode='shared'>) dropped: it serves "
                "vhost-user and virtiofs, which vmferry does not import"
            )
        else:
            host_options.append(tag_name(child))
    if host_options:
        found.adjust(f"host RAM options not applied: {', '.join(host_options)}")


@dataclass(frozen=True, slots=True)
class _Boot:
    machine_type: str = "pc"
    firmware: Firmware = "bios"
    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str | None = None
    nvram: Path | None = None


_OS_SILENT = frozenset({"type", "boot", "bootmenu", "bios", "smbios", "loader", "nvram"})
_OS_READ = frozenset({"kernel", "initrd", "cmdline", "firmware"})


def _os(os_el: Element | None, found: Findings) -> _Boot:
    if os_el is None:
        found.refuse("the domain has no <os>")
        return _Boot()
    for child in children(os_el):
        if child.tag not in _OS_SILENT | _OS_READ:
            found.refuse(f"<os>{tag_name(child)} is not something vmferry can express")
    kernel = abs_path(os_el.findtext("kernel"), "<kernel>", found)
    initrd = abs_path(os_el.findtext("initrd"), "<initrd>", found)
    cmdline = os_el.findtext("cmdline")
    if kernel is None and initrd is not None:
        found.refuse("<initrd> without <kernel>")
        initrd = None
    if kernel is None and cmdline is not None:
        found.adjust("<cmdline> without <kernel> is not used")
        cmdline = None
    firmware, nvram = _firmware(os_el, found)
    return _Boot(
        machine_type=_machine(os_el.find("type"), found),
        firmware=firmware,
        kernel=kernel,
        initrd=initrd,
        cmdline=cmdline,
        nvram=nvram,
    )


def _machine(type_el: Element | None, found: Findings) -> str:
    if type_el is None or (type_el.text or "").strip() != "hvm":
        found.refuse("the guest is not a full virtual machine (<os><type>hvm</type>)")
        return "pc"
    arch = type_el.get("arch", "x86_64")
    if arch != "x86_64":
        found.refuse(f"architecture {arch}: vmferry runs x86_64 guests")
    machine = type_el.get("machine")
    if machine is None:
        found.adjust("no machine type given: vmferry uses 'pc', as libvirt does on x86_64")
        return "pc"
    is_pc = machine in ("pc", "q35") or machine.startswith(("pc-i440fx-", "pc-q35-"))
    if not is_pc or not _is_plain_word(machine):
        found.refuse(f"machine type {machine!r}: vmferry builds 'pc' (i440fx) and 'q35' machines")
    return machine


def _firmware(os_el: Element, found: Findings) -> tuple[Firmware, Path | None]:
    """BIOS or UEFI, and the UEFI variable store. Secure boot is refused: its enrolled keys
    and the SMM-protected variables cannot be rebuilt on the destination by vmferry."""
    loader = os_el.find("loader")
    loader_path = "" if loader is None else (loader.text or "").strip()
    is_uefi = os_el.get("firmware") == "efi" or (
        loader is not None
        and (loader.get("type") == "pflash" or any(k in loader_path.lower() for k in _UEFI_HINTS))
    )
    features = os_el.findall("firmware/feature")
    enabled = [f.get("name", "") for f in features if f.get("enabled") == "yes"]
    secure = [n for n in enabled if n in ("secure-boot", "enrolled-keys")]
    if loader is not None and loader.get("secure") == "yes":
        secure.insert(0, "loader secure='yes'")
    if secure:
        found.refuse(
            f"UEFI secure boot ({', '.join(secure)}): its keys live in the variable store "
            "and need SMM-protected firmware; vmferry boots plain UEFI"
        )
    if not is_uefi:
        if loader_path:
            found.adjust(f"custom BIOS {loader_path} not used: vmferry boots QEMU's SeaBIOS")
        return "bios", None
    nvram = os_el.find("nvram")
    if nvram is None:
        return "uefi", None
    # libvirt >= 8.5 may write <nvram type='file'><source file='...'/></nvram>.
    source = nvram.find("source")
    path = (nvram.text or "").strip() or ("" if source is None else source.get("file", ""))
    return "uefi", abs_path(path, "<nvram>", found) if path else None


_UEFI_HINTS = ("ovmf", "edk2", "uefi")


def _cpu(cpu: Element | None, found: Findings) -> str:
    if cpu is None:
        return DEFAULT_CPU_MODEL
    mode = cpu.get("mode", "custom")
    model = (cpu.findtext("model") or "").strip()
    if cpu.find("numa") is not None:
        cells = len(cpu.findall("numa/cell"))
        found.refuse(f"guest NUMA topology (<cpu><numa>, {cells} cells): vmferry builds one node")
    topology = cpu.find("topology")
    if topology is not None and any(topology.get(k, "1") != "1" for k in _SMT_KEYS):
        layout = ", ".join(f"{k}={v}" for k, v in attrs(topology).items())
        found.adjust(f"CPU topology ({layout}) not kept: QEMU lays out the vCPUs itself")
    flags = [f"{f.get('policy', 'require')} {f.get('name')}" for f in cpu.findall("feature")]
    if mode != "custom" or not model:
        if mode != "custom":
            found.adjust(
                f"CPU mode {mode} becomes {DEFAULT_CPU_MODEL}: every host must present the "
                "same CPU for the guest to move"
            )
        return DEFAULT_CPU_MODEL
    if flags:
        found.adjust(f"CPU feature flags not kept: {', '.join(flags)}")
    if not _is_plain_word(model):
        found.refuse(f"CPU model {model!r} is not a QEMU CPU model name")
    return model


_SMT_KEYS = ("dies", "clusters", "cores", "threads")


def _is_plain_word(text: str) -> bool:
    """A machine type or CPU model goes on QEMU's command line: no commas, no spaces."""
    return (
        bool(text)
        and len(text) <= 64
        and all((c.isascii() and c.isalnum()) or c in "._-" for c in text)
    )


def _mib(n: int) -> str:
    return f"{n / (1 << 20):g} MiB"
