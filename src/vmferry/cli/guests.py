"""The CLI's VM commands for guests of every kind: ``vm create`` (the lab guest, or your own
image), ``vm import`` (a libvirt domain XML) and ``vm exec`` (a command through the guest
agent).

Human output goes to stderr (``err``); ``--json`` output and a command's own output go to
stdout (``out``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from vmferry.cli.exits import EXIT_OK
from vmferry.cli.render import print_json, status
from vmferry.controller.cluster import Cluster
from vmferry.controller.inventory import Inventory
from vmferry.controller.jobs import JobStore
from vmferry.controller.placing import VmPlacement, live_cluster, place_vm
from vmferry.core.boot import GuestBoot
from vmferry.core.cluster_model import PlacementError
from vmferry.core.errors import ConfigError
from vmferry.core.model import DiskSpec, VmName, VmSpec, validate_name
from vmferry.core.workload import parse_size, parse_workload

if TYPE_CHECKING:  # the XML parser (lxml) is loaded by `vm import` alone
    from rich.console import Console

    from vmferry.agent.api import VmInfo
    from vmferry.controller.libvirt_xml import ImportedDomain

__all__ = ["vm_create", "vm_exec", "vm_import"]

# The agent sizes an image VM's disk from the image itself; the spec carries a stand-in.
_IMAGE_DISK_STANDIN_BYTES = 1 << 30
_OWN_GUEST_ONLY = ("kernel", "initrd", "append", "nic", "heartbeat")


def _existing_file(path: str | None, what: str) -> Path | None:
    """An absolute path to a file that exists here (the lab's hosts share this machine).

    Raises:
        ConfigError: no such file.
    """
    if path is None:
        return None
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_file():
        raise ConfigError(f"no {what} file at {resolved}")
    return resolved


def _own_spec(args: argparse.Namespace) -> tuple[VmSpec, Path]:
    """The spec of ``vm create --image``, and the image's path.

    Raises:
        ConfigError: options that do not go together, a missing file.
    """
    if args.disk is not None:
        raise ConfigError("--disk sizes a new empty disk: with --image the disk is your image")
    if args.workload != "idle":
        raise ConfigError("--workload runs in the lab guest only, not in your image")
    image = _existing_file(args.image, "image")
    assert image is not None
    boot = GuestBoot(
        firmware=args.firmware,
        kernel=_existing_file(args.kernel, "kernel"),
        initrd=_existing_file(args.initrd, "initrd"),
        append=args.append,
        nic=args.nic,
        heartbeat=args.heartbeat,
    )
    disk = DiskSpec(_IMAGE_DISK_STANDIN_BYTES, bus=args.disk_bus, storage=args.storage)
    spec = VmSpec(
        name=VmName(validate_name(args.name)),
        memory_bytes=parse_size(args.memory),
        vcpus=args.vcpus,
        disk=disk,
        boot=boot,
    )
    return spec, image


def _lab_spec(args: argparse.Namespace) -> VmSpec:
    """Raises: ConfigError: options of an own guest without --image, bad values."""
    given = [f"--{o}" for o in _OWN_GUEST_ONLY if getattr(args, o) not in (None, False)]
    if given or args.firmware != "bios":
        raise ConfigError(f"{', '.join(given) or '--firmware'} need(s) --image (your own guest)")
    return VmSpec.build(
        args.name,
        memory=args.memory,
        vcpus=args.vcpus,
        workload=parse_workload(args.workload),
        disk=args.disk,
        disk_bus=args.disk_bus,
        storage=args.storage,
    )


def _disk_need(spec: VmSpec, image: Path | None) -> int:
    """Local disk space the VM takes on its host (an image: at least its file's size)."""
    if spec.disk is None or spec.disk.storage != "local":
        return 0
    return image.stat().st_size if image is not None else spec.disk.size_bytes


async def _where(
    cluster: Cluster, store: JobStore, spec: VmSpec, image: Path | None, args: argparse.Namespace
) -> VmPlacement:
    """The host ``args.host`` names (checked against maintenance and the group), or the one
    placement chooses.

    Raises:
        ConfigError: the host named is in maintenance or holds a VM of the group.
        PlacementError: no host has room.
    """
    group = None if args.group is None else validate_name(args.group, "group name")
    if args.host is None:
        live = await live_cluster(cluster, store)
        return place_vm(live, spec, group=group, disk_bytes=_disk_need(spec, image))
    host = validate_name(args.host, "host name")
    cluster.inventory.host(host)
    mark = store.marks().get(host)
    if mark is not None:
        raise ConfigError(f"{host} is {mark.describe}: no new VM goes there")
    if group is not None:
        groups = store.groups()
        listing = await cluster.list_vms()
        mates = [v.name for v in listing.vms if v.host == host and groups.get(v.name) == group]
        if mates:
            raise PlacementError(f"{host} already runs {', '.join(mates)} of group {group!r}")
    return VmPlacement(host, "given with --host", ())


async def _create(
    spec: VmSpec, args: argparse.Namespace, image: Path | None, err: Console, out: Console
) -> int:
    inventory = Inventory.load()
    store = JobStore(inventory.history_db)
    async with Cluster(inventory) as cluster:
        await cluster.check_new_name(spec.name)
        placed = await _where(cluster, store, spec, image, args)
        host = placed.host
        if args.dry_run:
            _would_place(spec, placed, err, out, args.json)
            return EXIT_OK
        client = cluster.client(host)
        offered = await client.host_info()
        if spec.machine_type not in offered.machine_types:
            raise ConfigError(f"{host}'s QEMU cannot build machine type {spec.machine_type}")
        if spec.cpu_model not in offered.cpu_models:
            raise ConfigError(f"{host}'s QEMU has no CPU model {spec.cpu_model}")
        what = spec.workload.describe() if image is None else f"copying {image}"
        if args.host is None:
            err.print(f"placing {spec.name} on {host}: {placed.reason}")
        with status(err, f"creating {spec.name} on {host} ({what})…"):
            info = await client.create_vm(spec, image)
        store.set_group(spec.name, args.group)
    _created(info, err, out, args.json)
    return EXIT_OK


def _would_place(
    spec: VmSpec, placed: VmPlacement, err: Console, out: Console, as_json: bool
) -> None:
    if as_json:
        print_json(out, {"dry_run": True, "vm": spec.name, **placed.to_json()})
        return
    err.print(
        f"{spec.name} would go to {placed.host}: {placed.reason} (--dry-run: nothing created)"
    )
    for verdict in placed.verdicts[1:]:
        if verdict.why_not is not None:
            err.print(f"  not {verdict.host}: {verdict.why_not}")
        else:
            err.print(
                f"  {verdict.host} fits too ({verdict.free_memory_bytes >> 20} MiB, "
                f"{verdict.free_vcpus} vCPUs free)"
            )


def _created(info: VmInfo, err: Console, out: Console, as_json: bool) -> None:
    if as_json:
        print_json(out, info.to_json())
    elif info.boot is None:
        err.print(f"{info.name} running on {info.host} (pid {info.pid})")
    else:
        err.print(
            f"{info.name} started on {info.host} (pid {info.pid}); its OS boots on "
            f"(`vmferry vm exec {info.name} -- uname -a` once its guest agent runs)"
        )


async def vm_create(args: argparse.Namespace, err: Console, out: Console) -> int:
    """``vm create NAME [--host H]``: the lab guest, or with ``--image`` your own; without
    ``--host`` on the host placement chooses (``--dry-run``: show it and why)."""
    if args.image is None:
        return await _create(_lab_spec(args), args, None, err, out)
    spec, image = _own_spec(args)
    return await _create(spec, args, image, err, out)


def _imported_spec(domain: ImportedDomain, storage: str) -> tuple[VmSpec, Path]:
    """Raises: ConfigError: the domain has no disk, or values out of range."""
    if domain.disk is None:
        raise ConfigError(f"domain {domain.name} has no disk: vmferry runs a guest from its disk")
    boot = domain.guest_boot()
    spec = VmSpec(
        name=VmName(validate_name(domain.name)),
        memory_bytes=domain.memory_bytes,
        vcpus=domain.vcpus,
        machine_type=domain.machine_type,
        cpu_model=domain.cpu_model,
        disk=DiskSpec(_IMAGE_DISK_STANDIN_BYTES, bus=domain.disk.bus, storage=storage),  # type: ignore[arg-type]
        boot=boot,
    )
    return spec, domain.disk.path


async def vm_import(args: argparse.Namespace, err: Console, out: Console) -> int:
    """``vm import --libvirt-xml FILE --host H``: a libvirt domain as a vmferry VM (a copy of
    its disk image), or a refusal listing everything vmferry cannot express."""
    path = _existing_file(args.libvirt_xml, "domain XML")
    assert path is not None
    try:
        text = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"cannot read {path}: {error.strerror}") from error
    from vmferry.controller.libvirt_xml import parse_domain

    domain = parse_domain(text, name=args.name)
    spec, image = _imported_spec(domain, args.storage)
    _existing_file(str(image), "disk image")
    for line in (*domain.adjusted, *domain.ignored):
        err.print(f"[yellow]note:[/] {line}")
    return await _create(spec, args, image, err, out)


async def vm_exec(args: argparse.Namespace, err: Console, out: Console) -> int:
    """``vm exec NAME -- CMD...``: run a command in the guest through its guest agent; exit
    with its exit status (128 + signal when a signal ended it)."""
    argv = list(args.argv)
    if not argv:
        raise ConfigError("give the command after `--`, e.g. `vmferry vm exec vm1 -- uname -a`")
    if not 0 < args.timeout <= 3600:
        raise ConfigError("--timeout must be in (0, 3600] seconds")
    async with Cluster(Inventory.load()) as cluster:
        info = await cluster.locate(validate_name(args.name))
        result = await cluster.client(info.host).guest_exec(info.name, argv, args.timeout)
    exit_status = result.exit_code if result.exit_code is not None else 128 + (result.signal or 0)
    if args.json:
        print_json(
            out,
            {
                "vm": info.name,
                "host": info.host,
                "exit_code": result.exit_code,
                "signal": result.signal,
                "stdout": result.stdout.decode(errors="replace"),
                "stderr": result.stderr.decode(errors="replace"),
                "truncated": result.truncated,
            },
        )
        return exit_status
    out.file.write(result.stdout.decode(errors="replace"))
    err.file.write(result.stderr.decode(errors="replace"))
    if result.truncated:
        err.print("[yellow]note:[/] the guest agent kept only the first part of the output")
    return exit_status
