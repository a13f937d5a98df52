"""libvirt domain XML import: real virt-install/virsh documents map to exact values or are
refused with exactly their reasons; small domains pin each rule (units, buses, firmware...).

The documents in tests/data/libvirt/ are described in the README.md beside them.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from vmferry.controller.libvirt_xml import (
    DomainImportError,
    ImportedDisk,
    ImportedDomain,
    parse_domain,
)
from vmferry.core.boot import GuestBoot
from vmferry.core.errors import ConfigError

DATA = Path(__file__).resolve().parents[1] / "data" / "libvirt"

GiB = 1 << 30
MiB = 1 << 20

CPU_PASSTHROUGH = (
    "CPU mode host-passthrough becomes qemu64: every host must present the same CPU for the "
    "guest to move"
)
CPU_HOST_MODEL = CPU_PASSTHROUGH.replace("host-passthrough", "host-model")
Q35_CONTROLLERS = ("controller qemu-xhci", "controller pcie-root", "controller pcie-root-port x14")
ONE_DISK = "vmferry moves one disk per VM"

ACCEPTED: dict[str, ImportedDomain] = {
    "debian12-q35-bios.xml": ImportedDomain(
        name="debian12",
        memory_bytes=2 * GiB,
        vcpus=2,
        machine_type="pc-q35-7.2",
        cpu_model="qemu64",
        firmware="bios",
        kernel=None,
        initrd=None,
        cmdline=None,
        disk=ImportedDisk(Path("/var/lib/libvirt/images/debian12.qcow2"), "qcow2", "virtio-blk"),
        nic=True,
        adjusted=(
            CPU_PASSTHROUGH,
            "the interface on network 'default' becomes QEMU user networking (outbound only)",
        ),
        ignored=(
            *Q35_CONTROLLERS,
            "controller sata",
            "controller virtio-serial",
            "serial pty",
            "console pty",
            "channel org.qemu.guest_agent.0",
            "channel com.redhat.spice.0",
            "input tablet",
            "input mouse",
            "input keyboard",
            "graphics spice",
            "sound ich9",
            "audio spice",
            "video virtio",
            "redirdev spicevmc x2",
            "memballoon virtio",
            "rng virtio",
        ),
        nvram=None,
        mac_address="52:54:00:3c:8e:71",
    ),
    "direct-kernel.xml": ImportedDomain(
        name="debian12-kernel",
        memory_bytes=1 * GiB,
        vcpus=2,
        machine_type="q35",
        cpu_model="qemu64",
        firmware="bios",
        kernel=Path("/srv/vm/vmlinuz-6.1.0-18-cloud-amd64"),
        initrd=Path("/srv/vm/initrd.img-6.1.0-18-cloud-amd64"),
        cmdline="root=/dev/vda console=ttyS0",
        disk=ImportedDisk(Path("/srv/vm/debian12-root.raw"), "raw", "virtio-blk"),
        nic=True,
        adjusted=(CPU_PASSTHROUGH,),
        ignored=(
            *Q35_CONTROLLERS,
            "console pty",
            "channel org.qemu.guest_agent.0",
            "memballoon virtio",
            "rng virtio",
        ),
        nvram=None,
        mac_address="52:54:00:6b:a2:19",
    ),
    "uefi.xml": ImportedDomain(
        name="debian12-uefi",
        memory_bytes=4 * GiB,
        vcpus=4,
        machine_type="pc-q35-7.2",
        cpu_model="qemu64",
        firmware="uefi",
        kernel=None,
        initrd=None,
        cmdline=None,
        disk=ImportedDisk(
            Path("/var/lib/libvirt/images/debian12-uefi.qcow2"), "qcow2", "virtio-blk"
        ),
        nic=True,
        adjusted=(
            "the balloon target (<currentMemory> 2048 MiB) is dropped: the guest gets all of "
            "its <memory>, 4096 MiB",
            CPU_HOST_MODEL,
            "the interface on bridge 'br0' becomes QEMU user networking (outbound only)",
        ),
        ignored=(
            *Q35_CONTROLLERS,
            "controller sata",
            "controller virtio-serial",
            "serial pty",
            "console pty",
            "channel org.qemu.guest_agent.0",
            "input tablet",
            "input mouse",
            "input keyboard",
            "graphics vnc",
            "audio none",
            "video virtio",
            "memballoon virtio",
            "rng virtio",
        ),
        nvram=Path("/var/lib/libvirt/qemu/nvram/debian12-uefi_VARS.fd"),
        mac_address="52:54:00:d4:17:5a",
    ),
    "raw-scsi.xml": ImportedDomain(
        name="centos-scsi",
        memory_bytes=3 * GiB,
        vcpus=2,
        machine_type="pc",
        cpu_model="Skylake-Client-noTSX-IBRS",
        firmware="bios",
        kernel=None,
        initrd=None,
        cmdline=None,
        disk=ImportedDisk(Path("/var/lib/libvirt/images/centos-scsi.img"), "raw", "virtio-scsi"),
        nic=False,
        adjusted=(
            "CPU feature flags not kept: require ibpb, require md-clear, require spec-ctrl, "
            "require ssbd",
        ),
        ignored=(
            "controller ich9-ehci1",
            "controller ich9-uhci1",
            "controller ich9-uhci2",
            "controller ich9-uhci3",
            "controller virtio-scsi",
            "console pty",
            "channel org.qemu.guest_agent.0",
            "input tablet",
            "graphics vnc",
            "video vga",
            "memballoon virtio",
            "rng virtio",
            "empty cdrom sdb",
        ),
        nvram=None,
        mac_address=None,
    ),
}

VHOST_USER = (
    "an outside process (e.g. OVS-DPDK) switches its packets through shared guest memory, and "
    "vmferry cannot recreate it"
)
REFUSED: dict[str, tuple[str, ...]] = {
    "hostdev.xml": (
        "host device passthrough <hostdev mode='subsystem' type='pci' managed='yes'> "
        "PCI 0000:06:00.0: the device stays on its host",
        "host device passthrough <hostdev mode='subsystem' type='usb' managed='yes'> "
        "USB 0x046d:0xc52b: the device stays on its host",
    ),
    "vhost-user.xml": (
        "2 network interfaces: a vmferry VM has at most one NIC",
        f"vhost-user interface (type=unix path=/tmp/vhost0.sock mode=server): {VHOST_USER}",
        f"vhost-user interface (type=unix path=/tmp/vhost1.sock mode=client): {VHOST_USER}",
    ),
    "numa-pinning.xml": (
        "host NUMA memory placement (<numatune>): vmferry does not bind guest memory to host "
        "NUMA nodes, and the destination may have other nodes",
        "CPU pinning (<cputune>: vcpupin, emulatorpin): vmferry does not pin vCPUs or QEMU's "
        "threads, and the destination has other CPUs",
        "hugepages (<memoryBacking><hugepages>): the guest's RAM would have to come from "
        "reserved hugepages on every host; vmferry allocates ordinary memory",
        "guest NUMA topology (<cpu><numa>, 2 cells): vmferry builds one node",
    ),
    "two-disks.xml": (f"2 disks (vda, vdb): {ONE_DISK}",),
    "rbd.xml": ("network disk vda (rbd pool/image): vmferry moves image files",),
    "not-xml.txt": ("not an XML document: Start tag expected, '<' not found, line 1, column 1",),
    "not-domain.xml": (
        "the root element is <network>, not <domain> (`virsh dumpxml NAME` writes one)",
    ),
    "win11.xml": (
        "UEFI secure boot (loader secure='yes', enrolled-keys, secure-boot): its keys live in "
        "the variable store and need SMM-protected firmware; vmferry boots plain UEFI",
        "TPM <tpm model='tpm-crb'>: its state (keys, sealed secrets) lives outside the disk image",
        "disk sda is on the sata bus: vmferry attaches disks as virtio-blk or virtio-scsi (the "
        "guest would need other drivers)",
        "cdrom sdb holds /var/lib/libvirt/images/Win11_23H2_English_x64.iso: vmferry moves one "
        "disk image per VM; eject it first (virsh change-media --eject)",
    ),
}


def test_every_example_is_in_a_table() -> None:
    assert sorted(p.name for p in DATA.iterdir() if p.suffix != ".md") == sorted(
        [*ACCEPTED, *REFUSED]
    )


@pytest.mark.parametrize("filename", sorted(ACCEPTED))
def test_accepted_example_maps_exactly(filename: str) -> None:
    assert parse_domain((DATA / filename).read_bytes()) == ACCEPTED[filename]


@pytest.mark.parametrize("filename", sorted(REFUSED))
def test_refused_example_lists_every_reason(filename: str) -> None:
    with pytest.raises(DomainImportError) as caught:
        parse_domain((DATA / filename).read_bytes())
    assert caught.value.reasons == REFUSED[filename]


def test_guest_boot_is_the_spec_form_of_the_boot_fields() -> None:
    imported = parse_domain((DATA / "direct-kernel.xml").read_bytes())
    assert imported.guest_boot() == GuestBoot(
        "bios",
        Path("/srv/vm/vmlinuz-6.1.0-18-cloud-amd64"),
        Path("/srv/vm/initrd.img-6.1.0-18-cloud-amd64"),
        "root=/dev/vda console=ttyS0",
        nic=True,
    )


def test_text_and_bytes_parse_alike() -> None:
    data = (DATA / "debian12-q35-bios.xml").read_bytes()
    assert parse_domain(data.decode()) == parse_domain(data)


def test_error_is_a_config_error_listing_reasons_one_per_line() -> None:
    error = DomainImportError(["first", "second"])
    assert isinstance(error, ConfigError)
    assert str(error) == "cannot import this libvirt domain:\n  - first\n  - second"
    assert pickle.loads(pickle.dumps(error)).reasons == ("first", "second")


DISK = (
    "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
    "<source file='/images/vm.qcow2'/><target dev='vda' bus='virtio'/></disk>"
)


def domain(
    *,
    kind: str = "kvm",
    name: str = "<name>vm</name>",
    memory: str = "<memory unit='MiB'>512</memory>",
    vcpu: str = "<vcpu>1</vcpu>",
    extra: str = "",
    os: str = "<type arch='x86_64' machine='q35'>hvm</type>",
    cpu: str = "",
    devices: str = DISK,
) -> str:
    """A small domain; each keyword replaces one part of it."""
    return (
        f"<domain type='{kind}'>{name}{memory}{vcpu}{extra}<os>{os}</os>{cpu}"
        f"<devices>{devices}</devices></domain>"
    )


def reasons_of(xml_text: str) -> tuple[str, ...]:
    with pytest.raises(DomainImportError) as caught:
        parse_domain(xml_text)
    return caught.value.reasons


@pytest.mark.parametrize(
    ("memory", "memory_bytes"),
    [
        ("<memory>524288</memory>", 512 * MiB),  # KiB without a unit
        ("<memory unit='KiB'>1048576</memory>", 1 * GiB),
        ("<memory unit='k'>1048576</memory>", 1 * GiB),
        ("<memory unit='MiB'>1536</memory>", 1536 * MiB),
        ("<memory unit='M'>768</memory>", 768 * MiB),
        ("<memory unit='GiB'>2</memory>", 2 * GiB),
        ("<memory unit='g'>3</memory>", 3 * GiB),
        ("<memory unit='bytes'>1073741824</memory>", 1 * GiB),
        ("<memory unit='b'>268435456</memory>", 256 * MiB),
    ],
)
def test_memory_units(memory: str, memory_bytes: int) -> None:
    imported = parse_domain(domain(memory=memory))
    assert (imported.memory_bytes, imported.adjusted) == (memory_bytes, ())


def test_decimal_units_round_up_to_whole_mib() -> None:
    imported = parse_domain(domain(memory="<memory unit='GB'>1</memory>"))
    assert imported.memory_bytes == 954 * MiB
    assert imported.adjusted == (
        "memory 1000000512 bytes rounded up to 954 MiB (vmferry counts MiB)",
    )


@pytest.mark.parametrize(
    ("parts", "field", "value", "adjusted"),
    [
        (
            {"vcpu": "<vcpu placement='static' current='2'>4</vcpu>"},
            "vcpus",
            2,
            ("vCPU hotplug dropped: 2 of 4 vCPUs were online, the VM gets 2",),
        ),
        (
            {"vcpu": "<vcpu placement='auto'>2</vcpu>"},
            "vcpus",
            2,
            ("automatic NUMA placement (<vcpu placement='auto'>) not applied",),
        ),
        (
            {"os": "<type arch='x86_64'>hvm</type>"},
            "machine_type",
            "pc",
            ("no machine type given: vmferry uses 'pc', as libvirt does on x86_64",),
        ),
        (
            {"cpu": "<cpu mode='custom' match='exact'><model>qemu64</model></cpu>"},
            "cpu_model",
            "qemu64",
            (),
        ),
        (
            {"cpu": "<cpu><topology sockets='1' cores='2' threads='2'/></cpu>"},
            "cpu_model",
            "qemu64",
            (
                "CPU topology (sockets=1, cores=2, threads=2) not kept: QEMU lays out the "
                "vCPUs itself",
            ),
        ),
        (
            {
                "os": "<type machine='pc'>hvm</type>"
                "<loader type='rom'>/usr/share/OVMF/OVMF.fd</loader>"
            },
            "firmware",
            "uefi",
            (),
        ),
        (
            {"os": "<type machine='pc'>hvm</type><loader>/opt/bios/custom.bin</loader>"},
            "firmware",
            "bios",
            ("custom BIOS /opt/bios/custom.bin not used: vmferry boots QEMU's SeaBIOS",),
        ),
        (
            {
                "os": "<type machine='q35'>hvm</type><loader type='pflash'>/x/OVMF_CODE.fd</loader>"
                "<nvram type='file'><source file='/var/lib/nvram/vm_VARS.fd'/></nvram>"
            },
            "nvram",
            Path("/var/lib/nvram/vm_VARS.fd"),
            (),
        ),
        (
            {"devices": DISK.replace("<driver name='qemu' type='qcow2'/>", "")},
            "disk",
            ImportedDisk(Path("/images/vm.qcow2"), "raw", "virtio-blk"),
            ("disk vda declares no format: raw, as libvirt reads it",),
        ),
        (
            {
                "devices": DISK.replace(" bus='virtio'", "").replace("vda", "sda")
                + "<controller type='scsi' index='0' model='virtio-scsi'/>"
            },
            "disk",
            ImportedDisk(Path("/images/vm.qcow2"), "qcow2", "virtio-scsi"),
            (),
        ),
        (
            {
                "devices": DISK + "<interface type='network'><source network='lab'/>"
                "<model type='e1000'/></interface>"
            },
            "nic",
            True,
            (
                "network card e1000 becomes virtio-net (the guest needs its driver)",
                "the interface on network 'lab' becomes QEMU user networking (outbound only)",
            ),
        ),
        (
            {"os": "<type machine='q35'>hvm</type><cmdline>quiet</cmdline>"},
            "cmdline",
            None,
            ("<cmdline> without <kernel> is not used",),
        ),
        (
            {
                "extra": "<memtune><hard_limit unit='KiB'>1048576</hard_limit></memtune>"
                "<clock offset='localtime'/><features><hyperv><relaxed state='on'/></hyperv>"
                "</features>"
            },
            "name",
            "vm",
            (
                "host memory limits (<memtune>) not applied",
                "hypervisor enlightenments not kept (<features>: hyperv): the guest runs "
                "without them",
                "clock offset 'localtime' not kept: the guest's real-time clock runs in UTC",
            ),
        ),
        (
            {
                "extra": "<memoryBacking><source type='memfd'/><access mode='shared'/>"
                "<nosharepages/></memoryBacking>"
            },
            "name",
            "vm",
            (
                "shared RAM (<memoryBacking><access mode='shared'>) dropped: it serves "
                "vhost-user and virtiofs, which vmferry does not import",
                "host RAM options not applied: <source type='memfd'>, <nosharepages>",
            ),
        ),
    ],
)
def test_mapping_rules(
    parts: dict[str, str], field: str, value: object, adjusted: tuple[str, ...]
) -> None:
    imported = parse_domain(domain(**parts))
    assert (getattr(imported, field), imported.adjusted) == (value, adjusted)


def test_name_override_replaces_a_libvirt_name_vmferry_cannot_use() -> None:
    assert parse_domain(domain(name="<name>web.example.org</name>"), name="web").name == "web"


def test_text_with_an_encoding_declaration_is_read_as_the_text_it_is() -> None:
    text = "<?xml version='1.0' encoding='ISO-8859-1'?>" + domain(
        extra="<description>Grüße</description>"
    )
    assert parse_domain(text).name == "vm"


def test_empty_cdrom_and_no_balloon_are_dropped_quietly() -> None:
    cdrom = "<disk type='file' device='cdrom'><target dev='hdc' bus='ide'/><readonly/></disk>"
    imported = parse_domain(domain(devices=DISK + cdrom + "<memballoon model='none'/>"))
    assert imported.ignored == ("empty cdrom hdc",)


NO_DISK = "the domain has no disk: a vmferry VM runs from one disk image"
NAME_RULE = "use 1-63 letters, digits, '-' or '_', starting with a letter or digit"
NIC_RULE = (
    "a vmferry VM's one NIC is virtio on QEMU user networking (from a network, bridge or user one)"
)


@pytest.mark.parametrize(
    ("xml_text", "reasons"),
    [
        (
            domain(kind="xen"),
            ("domain type 'xen': vmferry runs QEMU guests (type 'kvm' or 'qemu')",),
        ),
        (
            "<!DOCTYPE domain [<!ENTITY e SYSTEM 'file:///etc/passwd'>]>" + domain(name="&e;"),
            ("the document has a DOCTYPE; libvirt domain XML never does",),
        ),
        ("", ("not an XML document: Document is empty, line 1, column 1",)),
        (
            domain(name="<name>web.example.org</name>"),
            (f"invalid libvirt name 'web.example.org': {NAME_RULE}; choose another with --name",),
        ),
        (domain(name=""), ("the domain has no <name>: choose one with --name",)),
        (
            domain(memory="<memory unit='MiB'>64</memory>", vcpu="<vcpu>100</vcpu>"),
            (
                "memory 67108864 bytes out of range (128 MiB .. 64 GiB)",
                "vcpus must be 1..64, got 100",
            ),
        ),
        (
            domain(memory="<memory unit='furlongs'>3</memory>"),
            ("<memory> '3' with unit 'furlongs' is not a size libvirt accepts",),
        ),
        (domain(memory=""), ("the domain has no <memory>",)),
        (
            domain(extra="<maxMemory slots='16' unit='KiB'>16777216</maxMemory>"),
            ("memory hotplug (<maxMemory>): vmferry gives a VM one fixed block of RAM",),
        ),
        (
            domain(vcpu="<vcpu cpuset='0-3'>2</vcpu>"),
            ("vCPU pinning (<vcpu cpuset='0-3'>): vmferry does not pin",),
        ),
        (
            domain(extra="<memoryBacking><source type='file'/></memoryBacking>"),
            (
                "RAM in a host file (<memoryBacking><source type='file'>): vmferry chooses the "
                "RAM backend itself",
            ),
        ),
        (
            domain(
                extra="<qemu:commandline xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>"
                "<qemu:arg value='-no-hpet'/></qemu:commandline>"
            ),
            ("<qemu:commandline> is not something vmferry can express",),
        ),
        (
            domain(os="<type arch='aarch64' machine='virt'>hvm</type>"),
            (
                "architecture aarch64: vmferry runs x86_64 guests",
                "machine type 'virt': vmferry builds 'pc' (i440fx) and 'q35' machines",
            ),
        ),
        (
            domain(os="<type machine='pc,accel=kvm'>hvm</type>"),
            ("machine type 'pc,accel=kvm': vmferry builds 'pc' (i440fx) and 'q35' machines",),
        ),
        (
            domain(cpu="<cpu><model>qemu64,+vmx</model></cpu>"),
            ("CPU model 'qemu64,+vmx' is not a QEMU CPU model name",),
        ),
        (
            domain(os="<type>exe</type>"),
            ("the guest is not a full virtual machine (<os><type>hvm</type>)",),
        ),
        (
            domain(devices="", os="<type machine='q35'>hvm</type><initrd>boot/initrd</initrd>"),
            ("<initrd> 'boot/initrd' is not an absolute path", NO_DISK),
        ),
        (
            domain(os="<type machine='q35'>hvm</type><initrd>/boot/initrd</initrd>"),
            ("<initrd> without <kernel>",),
        ),
        (
            domain(os="<type machine='q35'>hvm</type><kernel>/boot/vmlinuz,if=pflash</kernel>"),
            ("kernel path must not contain ',' or a newline: /boot/vmlinuz,if=pflash",),
        ),
        (
            domain(devices=""),
            (NO_DISK,),
        ),
        (
            domain(
                devices="<disk type='block' device='disk'><source dev='/dev/vg0/vm'/>"
                "<target dev='vda' bus='virtio'/></disk>"
            ),
            ("block device disk vda (/dev/vg0/vm): vmferry moves image files",),
        ),
        (
            domain(
                devices="<disk type='volume' device='disk'><source pool='default' "
                "volume='vm.qcow2'/><target dev='vda' bus='virtio'/></disk>"
            ),
            (
                "storage pool volume vda (pool 'default', volume 'vm.qcow2'): name its image "
                "file instead (<disk type='file'>)",
            ),
        ),
        (
            domain(devices=DISK.replace("qcow2'/>", "vmdk'/>")),
            ("disk vda is vmdk: vmferry runs qcow2 and raw images",),
        ),
        (
            domain(devices=DISK.replace("bus='virtio'", "bus='ide'")),
            (
                "disk vda is on the ide bus: vmferry attaches disks as virtio-blk or "
                "virtio-scsi (the guest would need other drivers)",
            ),
        ),
        (
            domain(
                devices=DISK.replace("bus='virtio'", "bus='scsi'")
                + "<controller type='scsi' index='0' model='lsilogic'/>"
            ),
            (
                "disk vda sits on a SCSI controller of model lsilogic (libvirt's default is "
                "lsilogic): vmferry's SCSI disks are virtio-scsi",
            ),
        ),
        (
            domain(
                devices=DISK.replace(
                    "</disk>",
                    "<shareable/><backingStore type='file'><format type='qcow2'/>"
                    "<source file='/images/base.qcow2'/></backingStore></disk>",
                )
            ),
            (
                "disk vda is shared with other VMs (<shareable/>)",
                "disk vda has a backing chain: vmferry moves one image file (flatten it with "
                "qemu-img convert)",
            ),
        ),
        (
            domain(devices=DISK.replace("/images/vm.qcow2", "vm.qcow2")),
            ("the image of disk vda 'vm.qcow2' is not an absolute path",),
        ),
        (
            domain(
                devices=DISK + "<filesystem type='mount' accessmode='passthrough'>"
                "<driver type='virtiofs'/><source dir='/srv/share'/><target dir='share'/>"
                "</filesystem>"
            ),
            (
                "shared host directory <filesystem type='mount' accessmode='passthrough'> "
                "dir=/srv/share: vmferry moves one disk image, not directories",
            ),
        ),
        (
            domain(devices=DISK + "<memory model='virtio-mem'><target/></memory>"),
            ("hotplugged memory <memory model='virtio-mem'>: vmferry gives a VM one block of RAM",),
        ),
        (
            domain(devices=DISK + "<sound model='ich9'/><panic model='isa'/><shiny/>"),
            ("<shiny> is not something vmferry can express",),
        ),
        (
            domain(
                devices=DISK + "<interface type='direct'><source dev='eth0' mode='bridge'/>"
                "<model type='virtio'/></interface>"
            ),
            (
                "macvtap interface (type='direct') (dev=eth0 mode=bridge): it is bound to a "
                "host NIC",
            ),
        ),
        (
            domain(
                devices=DISK + "<interface type='hostdev' managed='yes'><source>"
                "<address type='pci' domain='0' bus='59' slot='16' function='1'/></source>"
                "</interface>"
            ),
            (
                "passthrough interface (type='hostdev') (PCI 0000:3b:10.1): the SR-IOV "
                "function stays on its host",
            ),
        ),
        (
            domain(devices=DISK + "<interface type='ethernet'><target dev='tap0'/></interface>"),
            (f"ethernet interface: {NIC_RULE}",),
        ),
        (
            domain(devices=DISK + "<serial type='dev'><source path='/dev/ttyS0'/></serial>"),
            ("host serial port <serial type='dev'> path=/dev/ttyS0: it stays on its host",),
        ),
    ],
)
def test_refusal_rules(xml_text: str, reasons: tuple[str, ...]) -> None:
    assert reasons_of(xml_text) == reasons


def test_an_invalid_name_override_is_refused() -> None:
    with pytest.raises(DomainImportError) as caught:
        parse_domain(domain(), name="my vm")
    assert caught.value.reasons == (f"invalid --name 'my vm': {NAME_RULE}",)
