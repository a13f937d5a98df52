"""``vmferry plan``: what each strategy would cost for a move, from the agents' rolling
profiles when they are fresh (changes nothing).

Its imports are what a plan needs and no more (no migration machinery, no lab), so that it
answers in a fraction of a second as a whole process. Also home of :func:`request_from`, the
move ``plan`` and ``migrate`` arguments ask for.

Human output goes to stderr (``err``), the table and ``--json`` output to stdout (``out``).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from vmferry.cli.exits import EXIT_OK
from vmferry.cli.render import plan_table, print_json, status
from vmferry.controller.cluster import Cluster
from vmferry.controller.history import History
from vmferry.controller.inventory import Inventory
from vmferry.controller.plan import make_plan
from vmferry.controller.request import MigrationRequest
from vmferry.core.errors import ConfigError
from vmferry.core.handoff import VerifyMode
from vmferry.core.model import validate_name

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["plan", "request_from", "show_plan"]


def request_from(args: argparse.Namespace) -> MigrationRequest:
    """The migration asked for by ``plan``/``migrate`` arguments, validated up front.

    Raises:
        ConfigError: a bad name or option.
    """
    request = MigrationRequest(
        vm=validate_name(args.name),
        destination=validate_name(args.to, "host name"),
        strategy=getattr(args, "strategy", "auto"),
        max_downtime_ms=args.max_downtime,
        deadline_s=args.deadline,
        bandwidth_mbps=args.bandwidth,
        force=getattr(args, "force", False),
        allow_postcopy=not args.no_postcopy,
        recovery_limit_s=getattr(args, "recovery_limit", 600.0),
        tls=getattr(args, "tls", False),
        plan=not getattr(args, "no_plan", False),
        verify=VerifyMode(getattr(args, "verify", "sample")),
    )
    request.resolve()  # refuse bad options before touching anything
    return request


async def plan(args: argparse.Namespace, err: Console, out: Console) -> int:
    """``plan NAME --to HOST``: predictions per strategy and the one recommended."""
    request = request_from(args)
    inventory = Inventory.load()
    async with Cluster(inventory) as cluster:
        info = await cluster.locate(request.vm)
        cluster.client(request.destination)
        if info.host == request.destination:
            raise ConfigError(f"VM {request.vm!r} already runs on {request.destination}")
        cap = None if request.bandwidth_mbps is None else request.bandwidth_mbps * 125_000
        with status(err, f"planning {info.name}'s move {info.host} → {request.destination}…"):
            made = await make_plan(
                cluster,
                info,
                request.destination,
                request.goal,
                cap_bps=cap,
                history=History(inventory.history_db),
            )
    return show_plan(made.to_json(), args, err, out)


def show_plan(plan: Mapping[str, Any], args: argparse.Namespace, err: Console, out: Console) -> int:
    """``plan``'s output from the plan's JSON (in-process and in client mode alike)."""
    if args.json:
        print_json(out, plan)
        return EXIT_OK
    out.print(plan_table(plan))
    style = "green" if plan["meets_goal"] else "yellow"
    err.print(f"[{style}]recommended: {plan['recommended']}[/] — {plan['reason']}")
    err.print(f"[dim]{_data_age(plan['profile'])}[/]")
    return EXIT_OK


def _data_age(data: Mapping[str, Any]) -> str:
    """How old a plan's inputs are, in words (``DataAge``'s JSON)."""
    if data["measured_now"]:
        return "measured just now"
    guest_s = data["guest_age_s"]
    guest = "guest measured now" if guest_s == 0 else f"guest {guest_s:.0f} s"
    bandwidth = f"bandwidth {data['bandwidth_age_s']:.0f} s old ({data['bandwidth_source']})"
    return f"from profiles: {guest}, {bandwidth}"
