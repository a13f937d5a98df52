"""Your own guest through the CLI: every bad image, boot option or domain XML is refused with
a clear error, exit 2, and nothing is created (no VM, no copy of the image, no QEMU left)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from labcli import Lab

pytestmark = pytest.mark.qemu

DATA = Path(__file__).resolve().parents[1] / "data" / "libvirt"


def _image(path: Path, fmt: str, size: str = "64M") -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), size], check=True)
    return path


@pytest.fixture
def held_image(tmp_path: Path) -> Iterator[Path]:
    """A qcow2 image another QEMU holds open (QEMU's image lock), as a running VM would."""
    image = _image(tmp_path / "busy.qcow2", "qcow2")
    qemu = subprocess.Popen(
        [
            "qemu-system-x86_64", "-S", "-nodefaults", "-display", "none", "-accel", "tcg",
            "-drive", f"file={image},format=qcow2,if=virtio",
        ],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # until QEMU holds the lock
            probe = subprocess.run(["qemu-img", "info", str(image)], capture_output=True)
            if probe.returncode != 0:
                break
            time.sleep(0.1)
        yield image
    finally:
        qemu.kill()
        qemu.wait()


def test_bad_images_and_domains_are_refused_and_create_nothing(
    lab_dir: Path, tmp_path: Path, held_image: Path
) -> None:
    lab = Lab(lab_dir)
    lab.ok("lab", "up", "--hosts", "2")
    text = tmp_path / "notes.txt"
    text.write_text("not a disk\n" * 100)
    vmdk = _image(tmp_path / "disk.vmdk", "vmdk")
    raw_blank = _image(tmp_path / "blank.img", "raw")  # raw, but no boot sector or filesystem
    qcow2 = _image(tmp_path / "ok.qcow2", "qcow2")
    create = ("vm", "create", "mine", "--host", "host-1")

    lab.refused(*create, "--image", str(tmp_path / "missing.qcow2"), message="no image file")
    lab.refused(*create, "--image", str(text), message="not a disk image")
    lab.refused(*create, "--image", str(raw_blank), message="not a disk image")
    lab.refused(*create, "--image", str(vmdk), message="vmdk: vmferry runs qcow2 and raw")
    lab.refused(*create, "--image", str(held_image), message="in use by another QEMU")
    lab.refused(*create, "--image", str(qcow2), "--initrd", str(text), message="needs --kernel")
    lab.refused(*create, "--image", str(qcow2), "--append", "quiet", message="needs --kernel")
    lab.refused(*create, "--image", str(qcow2), "--kernel", "/nope", message="no kernel file")
    lab.refused(*create, "--image", str(qcow2), "--disk", "1G", message="--disk")
    lab.refused(*create, "--image", str(qcow2), "--workload", "idle:x", message="--workload")
    lab.refused(*create, "--kernel", str(text), message="need(s) --image")
    lab.refused(*create, "--image", str(qcow2), "--host", "host-9", message="unknown host")
    lab.refused("vm", "create", "../x", "--host", "host-1", "--image", str(qcow2),
                message="invalid VM name")  # fmt: skip

    imported = ("vm", "import", "--host", "host-1", "--libvirt-xml")
    lab.refused(*imported, str(DATA / "not-xml.txt"), message="not an XML document")
    lab.refused(*imported, str(DATA / "not-domain.xml"), message="<domain>")
    lab.refused(*imported, str(DATA / "hostdev.xml"), message="host device")
    lab.refused(*imported, str(tmp_path / "missing.xml"), message="no domain XML file")

    assert lab.vms() == []
    for host in ("host-1", "host-2"):
        disks = lab_dir / "hosts" / host / "disks"
        assert not disks.exists() or list(disks.iterdir()) == []


def test_a_uefi_guest_without_an_os_moves_with_its_copies_compared(
    lab_dir: Path, tmp_path: Path
) -> None:
    # OVMF finds nothing to boot on a blank disk and waits in its shell: a guest vmferry knows
    # nothing about, with no guest agent. Its move is still verified, by its copies' digests.
    lab = Lab(lab_dir)
    lab.ok("lab", "up", "--hosts", "2")
    blank = _image(tmp_path / "blank.qcow2", "qcow2")
    created = lab.ok(
        "vm", "create", "efi", "--host", "host-1", "--image", str(blank), "--firmware", "uefi"
    )
    assert created["boot"]["firmware"] == "uefi"
    assert created["disk"]["size_bytes"] == 64 << 20  # the image's size

    report = lab.ok("migrate", "efi", "--to", "host-2", "--strategy", "precopy", "--no-plan")
    assert report["status"] == "completed", report["error"]
    assert report["handoff"]["status"] == "verified"
    assert report["handoff"]["disk"]["bytes_compared"] > 0
    assert report["guest_agent"] == {
        "answered": False,
        "clock_synced": False,
        "clock_offset_ms": None,
    }
    assert [(v["name"], v["host"]) for v in lab.vms()] == [("efi", "host-2")]
    lab.ok("vm", "delete", "efi")
    assert lab.vms() == []
