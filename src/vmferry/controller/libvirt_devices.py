"""The <devices> of a libvirt domain, judged for vmferry: its one disk, its NIC, the rest.

A vmferry VM has one disk image (virtio-blk or virtio-scsi) and at most one NIC; everything
else a domain lists is dropped when the guest does not need it (displays, sound, USB, the
balloon, controllers vmferry builds itself) or refused when the guest would lose something it
relies on (host devices, shared directories, a TPM, more disks). Also the record of what the
walk found and the element helpers that ``libvirt_xml`` shares.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lxml import etree

from vmferry.core.model import DiskBus

__all__ = [
    "DiskFormat",
    "Element",
    "Findings",
    "ImportedDisk",
    "abs_path",
    "attrs",
    "children",
    "judge_devices",
    "tag_name",
]

Element = etree._Element
DiskFormat = Literal["qcow2", "raw"]


@dataclass(frozen=True, slots=True)
class ImportedDisk:
    """The domain's one disk: an image file, its format as the XML declares it, its bus."""

    path: Path
    format: DiskFormat
    bus: DiskBus


@dataclass
class Findings:
    """What the walk over the document found: reasons to refuse, changes, dropped devices."""

    refused: list[str] = field(default_factory=list)
    adjusted: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def refuse(self, reason: str) -> None:
        self.refused.append(reason)

    def adjust(self, change: str) -> None:
        self.adjusted.append(change)

    def ignore(self, device: str) -> None:
        self.ignored.append(device)

    def ignored_counted(self) -> tuple[str, ...]:
        """Dropped devices once each, in order, with a count where there were several."""
        counts = Counter(self.ignored)
        return tuple(d if counts[d] == 1 else f"{d} x{counts[d]}" for d in counts)


def judge_devices(
    devices: Element | None, found: Findings
) -> tuple[ImportedDisk | None, bool, str | None]:
    """The one disk, whether there is a NIC (and its MAC); every other device judged."""
    if devices is None:
        found.refuse(_NO_DISK)
        return None, False, None
    disks, interfaces = devices.findall("disk"), devices.findall("interface")
    scsi_models = {
        c.get("index", "0"): c.get("model") for c in devices.findall("controller[@type='scsi']")
    }
    for child in children(devices):
        if child.tag not in ("disk", "interface"):
            _judge_device(child, found)
    imported = [_disk(d, scsi_models, found) for d in disks]
    real = [d for d in disks if d.get("device", "disk") in ("disk", "lun")]
    if not real:
        found.refuse(_NO_DISK)
    if len(real) > 1:
        targets = ", ".join(_target(d) for d in real)
        found.refuse(f"{len(real)} disks ({targets}): vmferry moves one disk per VM")
    disk = next((d for d in imported if d is not None), None)
    if len(interfaces) > 1:
        found.refuse(f"{len(interfaces)} network interfaces: a vmferry VM has at most one NIC")
    nics = [_interface(i, found) for i in interfaces]
    mac = interfaces[0].find("mac") if interfaces else None
    return disk, any(nics), None if mac is None else mac.get("address")


_NO_DISK = "the domain has no disk: a vmferry VM runs from one disk image"


def _target(disk: Element) -> str:
    target = disk.find("target")
    return "?" if target is None else target.get("dev", "?")


_DISK_BUSES: dict[str, DiskBus] = {"virtio": "virtio-blk", "scsi": "virtio-scsi"}
# What libvirt infers when <target> names no bus.
_BUS_BY_PREFIX = {"vd": "virtio", "sd": "scsi", "hd": "ide", "fd": "fdc", "xv": "xen"}


def _disk(el: Element, scsi_models: dict[str, str | None], found: Findings) -> ImportedDisk | None:
    device, kind, dev = el.get("device", "disk"), el.get("type", "file"), _target(el)
    source = el.find("source")
    source_attrs = {} if source is None else attrs(source)
    if device in ("cdrom", "floppy"):
        media = source_attrs.get("file") or source_attrs.get("dev") or source_attrs.get("name")
        if not media:
            found.ignore(f"empty {device} {dev}")
        else:
            found.refuse(
                f"{device} {dev} holds {media}: vmferry moves one disk image per VM; "
                "eject it first (virsh change-media --eject)"
            )
        return None
    if device != "disk":
        found.refuse(f"{device} {dev} (<disk device='{device}'>): a host SCSI LUN passes through")
        return None
    refused = len(found.refused)
    path = _disk_path(kind, dev, source_attrs, found)
    disk_format = _disk_format(el, dev, found)
    bus = _disk_bus(el, dev, scsi_models, found)
    _disk_flags(el, dev, found)
    if len(found.refused) > refused or path is None or bus is None or disk_format is None:
        return None
    return ImportedDisk(path=path, format=disk_format, bus=bus)


def _disk_path(kind: str, dev: str, source: dict[str, str], found: Findings) -> Path | None:
    if kind == "network":
        where = f"{source.get('protocol', '?')} {source.get('name', '')}".strip()
        found.refuse(f"network disk {dev} ({where}): vmferry moves image files")
    elif kind == "block":
        found.refuse(
            f"block device disk {dev} ({source.get('dev', '?')}): vmferry moves image files"
        )
    elif kind == "volume":
        found.refuse(
            f"storage pool volume {dev} (pool {source.get('pool')!r}, volume "
            f"{source.get('volume')!r}): name its image file instead (<disk type='file'>)"
        )
    elif kind != "file":
        found.refuse(f"disk {dev} of type {kind!r}: vmferry moves image files")
    elif "file" not in source:
        found.refuse(f"disk {dev} names no image file (<source file=...>)")
    else:
        return abs_path(source["file"], f"the image of disk {dev}", found)
    return None


def _disk_format(el: Element, dev: str, found: Findings) -> DiskFormat | None:
    driver = el.find("driver")
    declared = None if driver is None else driver.get("type")
    if declared is None:
        # libvirt never probes a format: without one the image is raw to the guest.
        found.adjust(f"disk {dev} declares no format: raw, as libvirt reads it")
        return "raw"
    if declared == "qcow2":
        return "qcow2"
    if declared == "raw":
        return "raw"
    found.refuse(f"disk {dev} is {declared}: vmferry runs qcow2 and raw images")
    return None


def _disk_bus(
    el: Element, dev: str, scsi_models: dict[str, str | None], found: Findings
) -> DiskBus | None:
    """virtio and SCSI on virtio-scsi map as they are. SATA and IDE are refused, not mapped
    onto virtio: a guest without virtio drivers (Windows as virt-install sets it up, with a
    SATA disk) does not boot from another controller, and one whose fstab names /dev/sda
    loses its root; both only show at boot, on the destination. Change the bus in libvirt,
    where the guest can be checked, then import."""
    target = el.find("target")
    bus = None if target is None else target.get("bus")
    bus = bus or _BUS_BY_PREFIX.get(dev[:2], "")
    if bus == "scsi":
        address = el.find("address[@type='drive']")
        index = "0" if address is None else address.get("controller", "0")
        model = scsi_models.get(index)
        if model != "virtio-scsi":
            found.refuse(
                f"disk {dev} sits on a SCSI controller of model {model or 'unset'} "
                "(libvirt's default is lsilogic): vmferry's SCSI disks are virtio-scsi"
            )
            return None
    if bus not in _DISK_BUSES:
        found.refuse(
            f"disk {dev} is on the {bus or 'unknown'} bus: vmferry attaches disks as "
            "virtio-blk or virtio-scsi (the guest would need other drivers)"
        )
        return None
    return _DISK_BUSES[bus]


_DISK_FLAGS_REFUSED = {
    "shareable": "is shared with other VMs (<shareable/>)",
    "readonly": "is read-only (<readonly/>)",
    "transient": "is transient (<transient/>): its writes are thrown away",
    "encryption": "is encrypted (<encryption>): its secret stays with libvirt",
}


def _disk_flags(el: Element, dev: str, found: Findings) -> None:
    for tag, text in _DISK_FLAGS_REFUSED.items():
        if el.find(tag) is not None:
            found.refuse(f"disk {dev} {text}")
    backing = el.find("backingStore/source")
    if backing is not None:
        found.refuse(
            f"disk {dev} has a backing chain: vmferry moves one image file "
            "(flatten it with qemu-img convert)"
        )
    if el.find("iotune") is not None:
        found.adjust(f"I/O limits of disk {dev} (<iotune>) not applied")


_PLAIN_NETWORKS = ("network", "bridge", "user")


def _interface(el: Element, found: Findings) -> bool:
    kind = el.get("type", "?")
    if kind not in _PLAIN_NETWORKS:
        label, why = _NIC_REFUSALS.get(kind, (f"{kind} interface", _NIC_WHY))
        host_side = _source_text(el)
        found.refuse(f"{label} ({host_side}): {why}" if host_side else f"{label}: {why}")
        return False
    model_el = el.find("model")
    model = "unset" if model_el is None else model_el.get("type", "unset")
    if model != "virtio":
        found.adjust(f"network card {model} becomes virtio-net (the guest needs its driver)")
    source = el.find("source")
    where = "" if source is None else attrs(source).get(kind, "")
    if kind != "user":
        on = f"{kind} {where!r}" if where else kind
        found.adjust(f"the interface on {on} becomes QEMU user networking (outbound only)")
    extras = [
        t for t in ("filterref", "bandwidth", "vlan", "virtualport") if el.find(t) is not None
    ]
    if extras:
        found.adjust(f"interface settings not applied: {', '.join(extras)}")
    return True


_NIC_WHY = (
    "a vmferry VM's one NIC is virtio on QEMU user networking (from a network, bridge or user one)"
)
_NIC_REFUSALS = {
    "vhostuser": (
        "vhost-user interface",
        "an outside process (e.g. OVS-DPDK) switches its packets through shared guest "
        "memory, and vmferry cannot recreate it",
    ),
    "direct": ("macvtap interface (type='direct')", "it is bound to a host NIC"),
    "hostdev": ("passthrough interface (type='hostdev')", "the SR-IOV function stays on its host"),
    "vdpa": ("vDPA interface", "it is a host device"),
}


# Devices vmferry drops without loss to the guest's work: its own VMs have a serial console,
# no display, and controllers and a guest-agent channel of their own.
_IGNORED = frozenset(
    {"controller", "graphics", "video", "sound", "audio", "redirdev", "hub", "rng", "input"}
    | {"watchdog", "panic", "memballoon", "serial", "console", "parallel", "channel"}
)
_DEVICE_REFUSALS = {
    "hostdev": "host device passthrough {dev}: the device stays on its host",
    "filesystem": "shared host directory {dev}: vmferry moves one disk image, not directories",
    "tpm": "TPM {dev}: its state (keys, sealed secrets) lives outside the disk image",
    "memory": "hotplugged memory {dev}: vmferry gives a VM one block of RAM",
    "iommu": "virtual IOMMU {dev}: vmferry's machines have none",
    "vsock": "vsock {dev}: vmferry does not manage vsock addresses",
    "shmem": "shared memory device {dev}: its memory is shared with the host",
    "smartcard": "smartcard {dev}: a host device",
    "lease": "lock manager lease {dev}",
    "crypto": "crypto device {dev}",
}


def _judge_device(el: Element, found: Findings) -> None:
    tag = el.tag
    if tag == "emulator" or (tag == "memballoon" and el.get("model") == "none"):
        return
    described = f"{tag_name(el)} {_source_text(el)}".strip()
    if tag in _DEVICE_REFUSALS:
        found.refuse(_DEVICE_REFUSALS[tag].format(dev=described))
    elif tag not in _IGNORED:
        found.refuse(f"{described} is not something vmferry can express")
    elif tag == "input" and el.get("type") in ("passthrough", "evdev"):
        found.refuse(f"host input device {described}: it stays on its host")
    elif tag in ("serial", "console", "parallel") and el.get("type", "pty") == "dev":
        found.refuse(f"host {tag} port {described}: it stays on its host")
    elif tag in ("serial", "console", "parallel") and el.get("type", "pty") != "pty":
        found.adjust(f"{tag} port to {el.get('type')} not kept: vmferry keeps its own console")
    elif tag == "channel":
        _channel(el, found)
    else:
        found.ignore(_device_label(el))


_KNOWN_CHANNELS = ("org.qemu.guest_agent.0", "com.redhat.spice.0")


def _channel(el: Element, found: Findings) -> None:
    target = el.find("target")
    name = "" if target is None else target.get("name", "")
    if name in _KNOWN_CHANNELS or el.get("type") in ("spicevmc", "qemu-vdagent"):
        found.ignore(f"channel {name or el.get('type')}")
    else:
        found.adjust(f"channel {name or el.get('type')!r} not kept")


def _device_label(el: Element) -> str:
    """A dropped device as a short label: its element and its kind or model."""
    model_el = el.find("model")
    kind = el.get("model") or (None if model_el is None else model_el.get("type"))
    kind = kind or el.get("type") or el.get("bus")
    return f"{el.tag} {kind}" if kind else el.tag


def _source_text(el: Element) -> str:
    """Where a device comes from on the host, e.g. a PCI address or a socket path."""
    source = el.find("source")
    if source is None:
        return ""
    address = source.find("address")
    if address is not None and address.get("slot") is not None:
        return "PCI " + _pci_address(address)
    vendor, product = source.find("vendor"), source.find("product")
    if vendor is not None and product is not None:
        return f"USB {vendor.get('id', '?')}:{product.get('id', '?')}"
    pairs = [*attrs(source).items()]
    pairs += [pair for child in children(source) for pair in attrs(child).items()]
    return " ".join(f"{k}={v}" for k, v in pairs)


def _pci_address(address: Element) -> str:
    """``0000:06:12.5`` from libvirt's fields, hex as dumpxml writes them or decimal as
    virt-install does."""
    texts = [address.get(key, "0") for key in ("domain", "bus", "slot", "function")]
    try:
        numbers = [int(t, 16) if t.lower().startswith("0x") else int(t) for t in texts]
    except ValueError:
        return " ".join(f"{k}={v}" for k, v in attrs(address).items())
    return "{:04x}:{:02x}:{:02x}.{:x}".format(*numbers)


def abs_path(text: str | None, what: str, found: Findings) -> Path | None:
    if text is None or not text.strip():
        if text is not None:
            found.refuse(f"{what} is empty")
        return None
    path = Path(text.strip())
    if not path.is_absolute():
        found.refuse(f"{what} {text.strip()!r} is not an absolute path")
        return None
    return path


def children(el: Element) -> Iterator[Element]:
    """Child elements only (no comments or unresolved entities)."""
    return el.iterchildren(etree.Element)


def tag_name(el: Element) -> str:
    """The element's start tag as written, e.g. ``<hostdev mode='subsystem' type='pci'>``."""
    qname = etree.QName(el)
    name = f"{el.prefix}:{qname.localname}" if el.prefix else qname.localname
    return "<" + name + "".join(f" {k}='{v}'" for k, v in attrs(el).items()) + ">"


def attrs(el: Element) -> dict[str, str]:
    """An element's attributes (lxml types them as str or bytes; they are always str here)."""
    return {k: v for k, v in el.items() if isinstance(k, str) and isinstance(v, str)}
