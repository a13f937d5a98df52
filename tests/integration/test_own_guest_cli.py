"""What a user does with a VM of their own, through the CLI against a real lab (agents as
processes): import a libvirt domain whose disk is a Debian 12 image (on shared storage, booted
through SeaBIOS), run commands in it through its guest agent, move it with `auto` (planned from
what QEMU measured of a guest it knows nothing about), and get a report whose handoff was
verified by digests and whose guest agent answered on the destination with the clock set."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from labcli import Lab
from lxml import etree

from vmferry.guest.debian import debian_image

# One worker runs both Debian tests, one after the other (see test_debian_guest.py).
pytestmark = [pytest.mark.qemu, pytest.mark.xdist_group("debian")]

DATA = Path(__file__).resolve().parents[1] / "data" / "libvirt"
AGENT_TIMEOUT_S = 150.0


def _domain_xml(image: Path, out: Path) -> Path:
    """virt-install's Debian 12 domain, its disk pointed at ``image``, 512 MiB and one vCPU."""
    tree = etree.parse(str(DATA / "debian12-q35-bios.xml"))
    source = tree.find("devices/disk/source")
    assert source is not None
    source.set("file", str(image))
    for tag in ("memory", "currentMemory"):
        element = tree.find(tag)
        assert element is not None
        element.text = str(512 << 10)  # KiB
    vcpu = tree.find("vcpu")
    assert vcpu is not None
    vcpu.text = "1"  # leaves the other test worker a core (TCG runs one thread per vCPU)
    tree.write(str(out))
    return out


def _wait_for_agent(lab: Lab, name: str) -> float:
    started = time.monotonic()
    while time.monotonic() - started < AGENT_TIMEOUT_S:
        if lab.run("vm", "exec", name, "--timeout", "3", "--", "true").returncode == 0:
            return time.monotonic() - started
    raise AssertionError(f"{name}'s guest agent did not answer within {AGENT_TIMEOUT_S} s")


def test_imported_debian_domain_runs_commands_and_moves_verified(
    lab_dir: Path, tmp_path: Path
) -> None:
    image = debian_image()
    lab = Lab(lab_dir)
    lab.ok("lab", "up", "--hosts", "2")
    xml = _domain_xml(image.disk, tmp_path / "debian12.xml")
    imported = lab.run(
        "vm", "import", "--libvirt-xml", str(xml), "--host", "host-1", "--storage", "shared",
        "--json",
    )  # fmt: skip
    assert imported.returncode == 0, imported.stderr
    created = json.loads(imported.stdout)
    assert (created["name"], created["host"], created["state"]) == ("debian12", "host-1", "running")
    assert created["cpu_model"] == "qemu64"  # host-passthrough, adjusted (and said so)
    assert "host-passthrough" in imported.stderr
    _wait_for_agent(lab, "debian12")

    release = lab.run("vm", "exec", "debian12", "--", "cat", "/etc/os-release")
    assert release.returncode == 0, release.stderr
    assert 'VERSION_ID="12"' in release.stdout
    assert lab.run("vm", "exec", "debian12", "--", "sh", "-c", "exit 3").returncode == 3
    both = lab.run("vm", "exec", "debian12", "--json", "--", "sh", "-c", "echo out; echo err >&2")
    shown = json.loads(both.stdout)
    assert (shown["exit_code"], shown["stdout"], shown["stderr"]) == (0, "out\n", "err\n")

    report = lab.ok("migrate", "debian12", "--to", "host-2")
    assert report["status"] == "completed", report["error"]
    assert report["predicted"] is not None
    assert report["running_on"] == "host-2"
    assert report["integrity"] is None  # vmferry cannot look inside a guest of your own...
    handoff = report["handoff"]  # ...it compares both stopped copies instead
    assert handoff["status"] == "verified", handoff
    assert handoff["mode"] == "sample"
    assert handoff["ram"]["chunks_compared"] == 256
    assert handoff["disk"] is None  # one image on shared storage: only RAM moved
    agent = report["guest_agent"]
    assert agent["answered"] is True
    assert agent["clock_synced"] is True
    assert abs(agent["clock_offset_ms"]) < 1000
    assert [(v["name"], v["host"]) for v in lab.vms()] == [("debian12", "host-2")]
    after = lab.run("vm", "exec", "debian12", "--", "systemctl", "is-system-running")
    assert after.stdout.strip() in ("running", "degraded"), after
