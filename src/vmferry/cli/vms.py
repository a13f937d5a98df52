"""The CLI's views of VMs and of their past: ``vm list|show|delete``, ``verify`` and
``history``.

Human output goes to stderr (``err``); tables and ``--json`` output to stdout (``out``).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from vmferry.cli.exits import EXIT_FAILED, EXIT_OK
from vmferry.cli.render import history_table, print_json, status, vm_table
from vmferry.controller.cluster import Cluster
from vmferry.controller.history import History
from vmferry.controller.inventory import Inventory
from vmferry.core.errors import ConfigError
from vmferry.core.model import validate_name

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["history", "verify", "vm_delete", "vm_list", "vm_show"]


async def vm_list(args: argparse.Namespace, err: Console, out: Console) -> int:
    """``vm list``: every VM of the cluster (1 if a host did not answer)."""
    async with Cluster(Inventory.load()) as cluster:
        listing = await cluster.list_vms()
    if args.json:
        print_json(
            out,
            {"vms": [v.to_json() for v in listing.vms], "unreachable": list(listing.unreachable)},
        )
    else:
        out.print(vm_table(listing.vms))
        for host in listing.unreachable:
            err.print(f"[yellow]warning:[/] {host} did not answer")
    return EXIT_OK if not listing.unreachable else EXIT_FAILED


async def vm_show(args: argparse.Namespace, err: Console, out: Console) -> int:
    """``vm show NAME``."""
    async with Cluster(Inventory.load()) as cluster:
        info = await cluster.locate(args.name)
    if args.json:
        print_json(out, info.to_json())
    else:
        out.print(vm_table([info]))
    return EXIT_OK


async def vm_delete(args: argparse.Namespace, err: Console, out: Console) -> int:
    """``vm delete NAME``: stop it and remove it from its host."""
    async with Cluster(Inventory.load()) as cluster:
        info = await cluster.locate(args.name)
        await cluster.client(info.host).delete_vm(info.name)
    if args.json:
        print_json(out, {"deleted": info.name, "host": info.host})
    else:
        err.print(f"deleted {info.name} from {info.host}")
    return EXIT_OK


async def verify(args: argparse.Namespace, err: Console, out: Console) -> int:
    """``verify NAME``: the guest checks every page of its memory (1 if one is bad)."""
    async with Cluster(Inventory.load()) as cluster:
        info = await cluster.locate(args.name)
        with status(err, f"verifying {info.name} on {info.host}…"):
            integrity = await cluster.client(info.host).verify(info.name)
    if args.json:
        print_json(out, {"vm": info.name, "host": info.host, **integrity.to_json()})
    else:
        verdict = "intact" if integrity.ok else "DAMAGED"
        err.print(
            f"{info.name} on {info.host}: {verdict} — {integrity.pages_checked} pages checked, "
            f"{integrity.bad_pages} bad"
        )
    return EXIT_OK if integrity.ok else EXIT_FAILED


async def history(args: argparse.Namespace, err: Console, out: Console) -> int:
    """``history``: past migrations, oldest first."""
    if args.vm is not None:
        validate_name(args.vm)
    if not 1 <= args.limit <= 100_000:
        raise ConfigError("--limit must be 1..100000")
    inventory = Inventory.load()
    entries = History(inventory.history_db).entries(vm=args.vm, limit=args.limit)
    if args.json:
        print_json(out, [e.to_json() for e in entries])
    else:
        out.print(history_table(entries))
    return EXIT_OK
