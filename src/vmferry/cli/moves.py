"""The CLI's moves: ``migrate``, ``demo`` (a lab, a busy guest moved there and back) and
``reconcile`` (finishing or undoing moves a crash left half done).

Human output and progress go to stderr (``err``); tables and ``--json`` output to stdout
(``out``).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from vmferry.cli.exits import EXIT_FAILED, EXIT_OK
from vmferry.cli.plan import request_from
from vmferry.cli.progress import ProgressLine
from vmferry.cli.render import format_bytes, print_json, reconcile_table, report_table, status
from vmferry.controller.cluster import Cluster
from vmferry.controller.history import History
from vmferry.controller.inventory import Inventory
from vmferry.controller.migrate import MigrationRequest
from vmferry.controller.migrate import migrate as run_migration
from vmferry.core.errors import ConfigError
from vmferry.core.eta import EtaHints
from vmferry.core.model import MigrationReport, VmSpec
from vmferry.core.workload import parse_workload

if TYPE_CHECKING:
    from rich.console import Console

    from vmferry.controller.plan import Plan

__all__ = ["demo", "migrate", "reconcile"]


async def _migrate_one(
    cluster: Cluster, history: History, request: MigrationRequest, err: Console
) -> MigrationReport:
    """One move with its progress line (live on a terminal, whole lines in a log)."""
    title = f"{request.vm} → {request.destination}"
    with ProgressLine(err, title) as line:

        def measured(plan: Plan) -> None:
            m = plan.measurement
            line.hint(EtaHints.planned(m, plan.choice.strategy, plan.calibration))

        return await run_migration(
            cluster, request, history=history, on_progress=line.update, on_plan=measured
        )


async def migrate(args: argparse.Namespace, err: Console, out: Console) -> int:
    """``migrate NAME --to HOST``: one move, its report; 0 only if it completed verified."""
    request = request_from(args)
    inventory = Inventory.load()
    async with Cluster(inventory) as cluster:
        if request.plan:
            err.print(f"planning {request.vm}'s move to {request.destination}…")
        report = await _migrate_one(cluster, History(inventory.history_db), request, err)
    if args.json:
        print_json(out, report.to_json())
    else:
        out.print(report_table([report]))
    return EXIT_OK if report.is_success else EXIT_FAILED


async def reconcile(args: argparse.Namespace, err: Console, out: Console) -> int:
    """``reconcile``: one running copy per VM again, after a crash."""
    from vmferry.controller.reconcile import reconcile as reconcile_cluster

    if not 0 < args.wait <= 86_400:
        raise ConfigError("--wait must be in (0, 86400] seconds")
    inventory = Inventory.load()
    async with Cluster(inventory) as cluster:
        with status(err, "looking at every host…"):
            results = await reconcile_cluster(cluster, wait_s=args.wait)
    if args.json:
        print_json(out, [r.to_json() for r in results])
    else:
        out.print(reconcile_table(results))
    bad = [r for r in results if r.verdict in ("lost", "conflict", "failed", "in-flight")]
    return EXIT_FAILED if bad else EXIT_OK


def _demo_requests(args: argparse.Namespace, vm: str) -> list[MigrationRequest]:
    """host-1 → host-2 (and back unless ``--one-way``), validated up front."""
    destinations = ["host-2"] if args.one_way else ["host-2", "host-1"]
    requests = [
        MigrationRequest(
            vm=vm,
            destination=d,
            strategy="auto",
            force=True,
            max_downtime_ms=args.max_downtime,
            bandwidth_mbps=args.bandwidth,
        )
        for d in destinations
    ]
    for request in requests:
        request.resolve()
    return requests


async def demo(args: argparse.Namespace, err: Console, out: Console) -> int:
    """``demo``: a lab of 2 hosts, a busy guest moved host-1 → host-2 and back, verified."""
    from vmferry.guest.image import build_image
    from vmferry.lab.cluster import lab_down, lab_up

    spec = VmSpec.build(
        "demo-vm",
        memory=args.memory,
        workload=parse_workload(args.workload),
        disk=None if args.disk == "none" else args.disk,
    )
    requests = _demo_requests(args, spec.name)
    lab_dir = Path(tempfile.mkdtemp(prefix="vmferry-demo-"))
    reports: list[MigrationReport] = []
    try:
        with status(err, "preparing the guest image…"):
            image = await asyncio.to_thread(build_image)
        with status(err, "starting a lab of 2 hosts…"):
            inventory = await lab_up(2, lab_dir=lab_dir)
        err.print(f"lab: 2 hosts, guest kernel {image.kernel_version}, state in {lab_dir}")
        async with Cluster(inventory) as cluster:
            host = await cluster.client("host-1").host_info()
            err.print(f"QEMU {host.qemu_version}, accelerator {host.accel}")
            with status(err, f"booting {spec.name} on host-1 ({spec.workload.describe()})…"):
                await cluster.client("host-1").create_vm(spec)
            history = History(inventory.history_db)
            for request in requests:
                report = await _migrate_one(cluster, history, request, err)
                reports.append(report)
                if not report.is_success:
                    break
    finally:
        with status(err, "stopping the lab…"):
            await asyncio.shield(lab_down(lab_dir))
    if args.json:
        print_json(out, [r.to_json() for r in reports])
    else:
        out.print(report_table(reports))
        if reports:
            sent = sum(r.transferred_bytes for r in reports)
            err.print(f"{len(reports)} live migration(s), {format_bytes(sent)} sent in all")
    return EXIT_OK if reports and all(r.is_success for r in reports) else EXIT_FAILED
