"""The CLI's lab commands: ``lab up|status|down|restart|link`` (a cluster of hosts on this
machine) and ``image build`` (the lab guest).

The lab's own modules (aiohttp, network namespaces, the image builder) are imported by the
commands that use them.

Human output goes to stderr (``err``); tables and ``--json`` output to stdout (``out``).
"""

from __future__ import annotations

import argparse
import asyncio
from typing import TYPE_CHECKING

from vmferry.cli.exits import EXIT_FAILED, EXIT_OK
from vmferry.cli.render import hosts_table, print_json, status
from vmferry.controller.inventory import Inventory
from vmferry.core.errors import ConfigError
from vmferry.core.model import validate_name
from vmferry.core.workload import parse_size

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["image_build", "lab_down", "lab_link", "lab_restart", "lab_status", "lab_up"]


async def lab_up(args: argparse.Namespace, err: Console, out: Console) -> int:
    """``lab up``: build (or reuse) the guest image, start host-1..host-N."""
    from vmferry.guest.image import build_image
    from vmferry.lab import cluster as lab

    memory = None if args.memory_per_host is None else parse_size(args.memory_per_host)
    disk = None if args.disk_per_host is None else parse_size(args.disk_per_host)
    with status(err, "preparing the guest image…"):
        await asyncio.to_thread(build_image)
    with status(err, f"starting {args.hosts} host agent(s)…"):
        inventory = await lab.lab_up(
            args.hosts,
            netns=args.netns,
            link_mbps=args.link_mbps,
            memory_per_host_bytes=memory,
            disk_per_host_bytes=disk,
        )
    if args.json:
        print_json(out, {**inventory.to_json(), "directory": str(inventory.directory)})
    else:
        for host in inventory.hosts:
            err.print(f"{host.name}  {host.url}  migration address {host.address}")
        err.print(f"lab up in {inventory.directory}")
    return EXIT_OK


async def lab_status(args: argparse.Namespace, err: Console, out: Console) -> int:
    """``lab status``: is every host's agent up? (1 if one is not)"""
    from vmferry.lab import cluster as lab

    statuses = await lab.lab_status()
    if args.json:
        print_json(
            out,
            [
                {
                    "name": s.name,
                    "url": s.url,
                    "reachable": s.reachable,
                    "pid_alive": s.pid_alive,
                    "info": s.info,
                    "error": s.error,
                }
                for s in statuses
            ],
        )
    else:
        out.print(hosts_table(statuses))
    return EXIT_OK if all(s.reachable for s in statuses) else EXIT_FAILED


async def lab_down(args: argparse.Namespace, err: Console, out: Console) -> int:
    """``lab down``: stop everything the lab started."""
    from vmferry.lab import cluster as lab

    with status(err, "stopping the lab…"):
        report = await lab.lab_down()
    data = {
        "agents_stopped": report.agents_stopped,
        "qemus_stopped": report.qemus_stopped,
        "namespaces_removed": report.namespaces_removed,
    }
    if args.json:
        print_json(out, data)
    elif report.nothing_to_do:
        err.print("no lab running: nothing to do")
    else:
        err.print(
            f"stopped {report.agents_stopped} agent(s) and {report.qemus_stopped} VM(s); "
            f"removed {report.namespaces_removed} namespace(s)"
        )
    return EXIT_OK


async def lab_restart(args: argparse.Namespace, err: Console, out: Console) -> int:
    """``lab restart HOST``: start a host's agent again (it adopts its VMs)."""
    from vmferry.lab import cluster as lab

    name = validate_name(args.host, "host name")
    with status(err, f"starting {name}'s agent…"):
        entry = await lab.lab_restart(name)
    if args.json:
        print_json(out, entry.to_json())
    else:
        err.print(f"{entry.name}: agent running again (pid {entry.pid}, {entry.url})")
    return EXIT_OK


async def lab_link(args: argparse.Namespace, err: Console, out: Console) -> int:
    """``lab link HOST down|up|throttle|unthrottle``: a --netns host's link (faults)."""
    from vmferry.lab.netns import set_link, set_link_rate

    name = validate_name(args.host, "host name")
    rate_kbit: int | None = None
    if args.state in ("down", "up"):
        if args.kbps is not None:
            raise ConfigError(f"`lab link HOST {args.state}` takes no rate")
        host = await set_link(name, args.state == "up")
        state = args.state
    elif args.state == "throttle":
        if args.kbps is None:
            raise ConfigError("`lab link HOST throttle KBPS` needs a rate in kbit/s")
        rate_kbit = args.kbps
        host = await set_link_rate(name, rate_kbit)
        state = f"throttled to {rate_kbit} kbit/s"
    else:
        link_mbps = Inventory.load().link_mbps
        rate_kbit = None if link_mbps is None else link_mbps * 1000
        host = await set_link_rate(name, rate_kbit)
        state = "unshaped" if rate_kbit is None else f"shaped to {link_mbps} Mbit/s again"
    if args.json:
        print_json(
            out, {"host": host.name, "veth": host.veth, "link": args.state, "rate_kbit": rate_kbit}
        )
    else:
        err.print(f"{host.name}: link {state} ({host.veth})")
    return EXIT_OK


async def image_build(args: argparse.Namespace, err: Console, out: Console) -> int:
    """``image build``: build (or reuse) the cached lab guest image."""
    from vmferry.guest.image import build_image

    with status(err, "building the lab guest image…"):
        image = await asyncio.to_thread(build_image, force=args.force)
    if args.json:
        print_json(
            out,
            {
                "kernel": str(image.kernel_path),
                "initrd": str(image.initrd_path),
                "kernel_version": image.kernel_version,
                "key": image.key,
            },
        )
    else:
        out.print(f"kernel  {image.kernel_path}\ninitrd  {image.initrd_path}")
    return EXIT_OK
