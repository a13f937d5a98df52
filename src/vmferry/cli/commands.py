"""The CLI's commands: each turns parsed arguments into controller/lab calls and renders.

Human output and progress go to stderr (``err``); ``--json`` output goes to stdout (``out``).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

from rich.console import Console

from vmferry.cli.exits import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE
from vmferry.cli.guests import vm_create, vm_exec, vm_import
from vmferry.cli.render import (
    ProgressLine,
    format_bytes,
    history_table,
    hosts_table,
    plan_table,
    print_json,
    reconcile_table,
    report_table,
    vm_table,
)
from vmferry.controller.cluster import Cluster
from vmferry.controller.history import History
from vmferry.controller.inventory import Inventory
from vmferry.controller.migrate import MigrationRequest, migrate
from vmferry.controller.plan import DataAge, Plan, make_plan
from vmferry.core.errors import ConfigError
from vmferry.core.eta import EtaHints
from vmferry.core.handoff import VerifyMode
from vmferry.core.model import MigrationReport, VmSpec, validate_name
from vmferry.core.workload import parse_size, parse_workload

__all__ = ["DEMO_WORKLOAD", "EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "run"]

DEMO_WORKLOAD = "dirty:rate=50M,size=256M,pattern=random,mode=paced,disk-rate=4M"


Command = Callable[[argparse.Namespace, Console, Console], Awaitable[int]]


# -- lab ----------------------------------------------------------------------------------------


async def _lab_up(args: argparse.Namespace, err: Console, out: Console) -> int:
    from vmferry.guest.image import build_image
    from vmferry.lab.cluster import lab_up

    memory = None if args.memory_per_host is None else parse_size(args.memory_per_host)
    disk = None if args.disk_per_host is None else parse_size(args.disk_per_host)
    with err.status("preparing the guest image…"):
        await asyncio.to_thread(build_image)
    with err.status(f"starting {args.hosts} host agent(s)…"):
        inventory = await lab_up(
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


async def _lab_status(args: argparse.Namespace, err: Console, out: Console) -> int:
    from vmferry.lab.cluster import lab_status

    statuses = await lab_status()
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


async def _lab_down(args: argparse.Namespace, err: Console, out: Console) -> int:
    from vmferry.lab.cluster import lab_down

    with err.status("stopping the lab…"):
        report = await lab_down()
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


async def _lab_restart(args: argparse.Namespace, err: Console, out: Console) -> int:
    from vmferry.lab.cluster import lab_restart

    name = validate_name(args.host, "host name")
    with err.status(f"starting {name}'s agent…"):
        entry = await lab_restart(name)
    if args.json:
        print_json(out, entry.to_json())
    else:
        err.print(f"{entry.name}: agent running again (pid {entry.pid}, {entry.url})")
    return EXIT_OK


async def _lab_link(args: argparse.Namespace, err: Console, out: Console) -> int:
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


# -- VMs ----------------------------------------------------------------------------------------


async def _vm_list(args: argparse.Namespace, err: Console, out: Console) -> int:
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


async def _vm_show(args: argparse.Namespace, err: Console, out: Console) -> int:
    async with Cluster(Inventory.load()) as cluster:
        info = await cluster.locate(args.name)
    if args.json:
        print_json(out, info.to_json())
    else:
        out.print(vm_table([info]))
    return EXIT_OK


async def _vm_delete(args: argparse.Namespace, err: Console, out: Console) -> int:
    async with Cluster(Inventory.load()) as cluster:
        info = await cluster.locate(args.name)
        await cluster.client(info.host).delete_vm(info.name)
    if args.json:
        print_json(out, {"deleted": info.name, "host": info.host})
    else:
        err.print(f"deleted {info.name} from {info.host}")
    return EXIT_OK


async def _verify(args: argparse.Namespace, err: Console, out: Console) -> int:
    async with Cluster(Inventory.load()) as cluster:
        info = await cluster.locate(args.name)
        with err.status(f"verifying {info.name} on {info.host}…"):
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


# -- migrations ---------------------------------------------------------------------------------


async def _migrate_one(
    cluster: Cluster, history: History, request: MigrationRequest, err: Console
) -> MigrationReport:
    """One move with its progress line (live on a terminal, whole lines in a log)."""
    title = f"{request.vm} → {request.destination}"
    with ProgressLine(err, title) as line:

        def measured(plan: Plan) -> None:
            m = plan.measurement
            line.hint(EtaHints(m.zero_fraction, m.dirty_rate_bps, m.dirty_set_bytes))

        return await migrate(
            cluster, request, history=history, on_progress=line.update, on_plan=measured
        )


def _request(args: argparse.Namespace) -> MigrationRequest:
    """The migration asked for by ``plan``/``migrate`` arguments, validated up front."""
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


async def _plan(args: argparse.Namespace, err: Console, out: Console) -> int:
    request = _request(args)
    inventory = Inventory.load()
    async with Cluster(inventory) as cluster:
        info = await cluster.locate(request.vm)
        cluster.client(request.destination)
        if info.host == request.destination:
            raise ConfigError(f"VM {request.vm!r} already runs on {request.destination}")
        cap = None if request.bandwidth_mbps is None else request.bandwidth_mbps * 125_000
        with err.status(f"planning {info.name}'s move {info.host} → {request.destination}…"):
            plan = await make_plan(
                cluster,
                info,
                request.destination,
                request.goal,
                cap_bps=cap,
                history=History(inventory.history_db),
            )
    if args.json:
        print_json(out, plan.to_json())
    else:
        out.print(plan_table(plan))
        style = "green" if plan.choice.meets_goal else "yellow"
        err.print(f"[{style}]recommended: {plan.choice.strategy}[/] — {plan.choice.reason}")
        err.print(f"[dim]{_data_age(plan.data)}[/]")
    return EXIT_OK


def _data_age(data: DataAge) -> str:
    """How old a plan's inputs are, in words."""
    if data.measured_now:
        return "measured just now"
    guest = "guest measured now" if data.guest_age_s == 0 else f"guest {data.guest_age_s:.0f} s"
    bandwidth = f"bandwidth {data.bandwidth_age_s:.0f} s old ({data.bandwidth_source})"
    return f"from profiles: {guest}, {bandwidth}"


async def _migrate(args: argparse.Namespace, err: Console, out: Console) -> int:
    request = _request(args)
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


async def _reconcile(args: argparse.Namespace, err: Console, out: Console) -> int:
    from vmferry.controller.reconcile import reconcile

    if not 0 < args.wait <= 86_400:
        raise ConfigError("--wait must be in (0, 86400] seconds")
    inventory = Inventory.load()
    async with Cluster(inventory) as cluster:
        with err.status("looking at every host…"):
            results = await reconcile(cluster, wait_s=args.wait)
    if args.json:
        print_json(out, [r.to_json() for r in results])
    else:
        out.print(reconcile_table(results))
    bad = [r for r in results if r.verdict in ("lost", "conflict", "failed", "in-flight")]
    return EXIT_FAILED if bad else EXIT_OK


async def _history(args: argparse.Namespace, err: Console, out: Console) -> int:
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


async def _demo(args: argparse.Namespace, err: Console, out: Console) -> int:
    from vmferry.guest.image import build_image
    from vmferry.lab.cluster import lab_down, lab_up

    spec = VmSpec.build(
        "demo-vm",
        memory=args.memory,
        workload=parse_workload(args.workload),
        disk=None if args.disk == "none" else args.disk,
    )
    destinations = ["host-2"] if args.one_way else ["host-2", "host-1"]
    requests = [
        MigrationRequest(
            vm=spec.name,
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
    lab_dir = Path(tempfile.mkdtemp(prefix="vmferry-demo-"))
    reports: list[MigrationReport] = []
    try:
        with err.status("preparing the guest image…"):
            image = await asyncio.to_thread(build_image)
        with err.status("starting a lab of 2 hosts…"):
            inventory = await lab_up(2, lab_dir=lab_dir)
        err.print(f"lab: 2 hosts, guest kernel {image.kernel_version}, state in {lab_dir}")
        async with Cluster(inventory) as cluster:
            host = await cluster.client("host-1").host_info()
            err.print(f"QEMU {host.qemu_version}, accelerator {host.accel}")
            with err.status(f"booting {spec.name} on host-1 ({spec.workload.describe()})…"):
                await cluster.client("host-1").create_vm(spec)
            history = History(inventory.history_db)
            for request in requests:
                report = await _migrate_one(cluster, history, request, err)
                reports.append(report)
                if not report.is_success:
                    break
    finally:
        with err.status("stopping the lab…"):
            await asyncio.shield(lab_down(lab_dir))
    if args.json:
        print_json(out, [r.to_json() for r in reports])
    else:
        out.print(report_table(reports))
        if reports:
            sent = sum(r.transferred_bytes for r in reports)
            err.print(f"{len(reports)} live migration(s), {format_bytes(sent)} sent in all")
    return EXIT_OK if reports and all(r.is_success for r in reports) else EXIT_FAILED


async def _image_build(args: argparse.Namespace, err: Console, out: Console) -> int:
    from vmferry.guest.image import build_image

    with err.status("building the lab guest image…"):
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


async def _agent(args: argparse.Namespace, err: Console, out: Console) -> int:
    from vmferry.agent.host import AgentConfig
    from vmferry.agent.qemu_user import resolve_qemu_user
    from vmferry.agent.server import run_agent
    from vmferry.agent.tls import server_context
    from vmferry.qemu.tls import check_creds_dir

    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"--listen must be ADDR:PORT, got {args.listen!r}")
    try:
        token = args.token_file.read_text().strip()
    except OSError as error:
        raise ConfigError(f"cannot read the token file: {error}") from error
    if len(token) < 16:
        raise ConfigError("the token must be at least 16 characters")
    if args.insecure_http:
        if args.tls_cert or args.tls_key:
            raise ConfigError("--insecure-http and --tls-cert/--tls-key exclude each other")
        tls = None
    elif args.tls_cert and args.tls_key:
        tls = server_context(args.tls_cert, args.tls_key)
    else:
        raise ConfigError(
            "the agent serves HTTPS: give --tls-cert and --tls-key (or --insecure-http)"
        )
    config = AgentConfig(
        host=validate_name(args.host, "host name"),
        state_dir=args.state_dir,
        memory_bytes=parse_size(args.memory),
        migration_address=args.migration_address,
        shared_dir=args.shared_dir,
        disk_bytes=None if args.disk is None else parse_size(args.disk),
        qemu_tls_dir=None if args.qemu_tls_dir is None else check_creds_dir(args.qemu_tls_dir),
        qemu_user=resolve_qemu_user(args.qemu_user),
        profile_interval_s=args.profile_interval if args.profile_interval > 0 else None,
    )
    await run_agent(config, host, int(port), token, args.ready_file, tls)
    return EXIT_OK


async def _simulate(args: argparse.Namespace, err: Console, out: Console) -> int:
    from vmferry.cli.simulate import run_simulate

    return await run_simulate(args, err, out)


_COMMANDS: dict[tuple[str, str | None], Command] = {
    ("lab", "up"): _lab_up,
    ("lab", "status"): _lab_status,
    ("lab", "down"): _lab_down,
    ("lab", "restart"): _lab_restart,
    ("lab", "link"): _lab_link,
    ("vm", "create"): vm_create,
    ("vm", "import"): vm_import,
    ("vm", "exec"): vm_exec,
    ("vm", "list"): _vm_list,
    ("vm", "show"): _vm_show,
    ("vm", "delete"): _vm_delete,
    ("verify", None): _verify,
    ("plan", None): _plan,
    ("migrate", None): _migrate,
    ("reconcile", None): _reconcile,
    ("history", None): _history,
    ("demo", None): _demo,
    ("image", "build"): _image_build,
    ("agent", None): _agent,
    ("simulate", None): _simulate,
}


async def run(args: argparse.Namespace, err: Console, out: Console) -> int:
    """Run the command ``args`` names."""
    action = getattr(args, f"{args.command}_command", None)
    return await _COMMANDS[(args.command, action)](args, err, out)
