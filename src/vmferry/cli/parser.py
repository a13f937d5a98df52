"""The ``vmferry`` command line: every command and option (parsing only)."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

from vmferry import __version__
from vmferry.core.model import STRATEGIES

__all__ = ["DEMO_WORKLOAD", "build_parser"]

DEMO_WORKLOAD = "dirty:rate=50M,size=256M,pattern=random,mode=paced,disk-rate=4M"


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or, given the ``argv`` it will parse, of the command
    ``argv`` names: the others are then listed by name and help only (argparse builds each
    option of each command up front, a few ms of every start).
    """
    parser = argparse.ArgumentParser(
        prog="vmferry", description="Live migration of QEMU virtual machines."
    )
    parser.add_argument("--version", action="version", version=f"vmferry {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    parser.add_argument(
        "--server",
        default=None,
        metavar="URL",
        help="talk to a `vmferry serve` at URL (as $VMFERRY_URL does; the token from "
        "$VMFERRY_TOKEN): vm list, host list, history, migrate, host evacuate, balance, reconcile",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # The top-level options take no value but --server (its URL is skipped): the first other
    # word that is not an option is the command.
    named = None if argv is None else _command_word(argv)
    every = named not in _COMMANDS
    for name, (help_text, add_options) in _COMMANDS.items():
        command = sub.add_parser(name, help=help_text)
        if every or name == named:
            add_options(command)
    return parser


def _command_word(argv: Sequence[str]) -> str | None:
    words = iter(argv)
    for word in words:
        if word == "--server":
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")


def _lab(lab: argparse.ArgumentParser) -> None:
    """lab up|status|down|restart|link"""
    lab_sub = lab.add_subparsers(dest="lab_command", required=True, metavar="ACTION")
    up = lab_sub.add_parser("up", help="start host-1..host-N (one agent each)")
    up.add_argument("--hosts", type=int, default=2)
    up.add_argument("--netns", action="store_true", help="each host in its own network namespace")
    up.add_argument("--link-mbps", type=int, default=None, help="shape each host link (--netns)")
    up.add_argument("--memory-per-host", default=None, help="memory each host offers (e.g. 4G)")
    up.add_argument(
        "--disk-per-host", default=None, help="space for local disk images per host (e.g. 8G)"
    )
    json_flag(up)
    json_flag(lab_sub.add_parser("status", help="is every host's agent up?"))
    json_flag(lab_sub.add_parser("down", help="stop everything the lab started"))
    restart = lab_sub.add_parser(
        "restart", help="start a host's agent again after it died (it adopts its VMs)"
    )
    restart.add_argument("host", metavar="HOST")
    json_flag(restart)
    link = lab_sub.add_parser(
        "link", help="cut, restore or throttle a --netns host's link (fault tests)"
    )
    link.add_argument("host", metavar="HOST")
    link.add_argument(
        "state",
        choices=("down", "up", "throttle", "unthrottle"),
        help="down/up: cut/restore; throttle KBPS: shape to KBPS kbit/s both ways; "
        "unthrottle: back to the lab's --link-mbps (or unshaped)",
    )
    link.add_argument("kbps", nargs="?", type=int, default=None, metavar="KBPS")
    json_flag(link)


def _vm(vm: argparse.ArgumentParser) -> None:
    """vm create|import|exec|list|show|delete"""
    vm_sub = vm.add_subparsers(dest="vm_command", required=True, metavar="ACTION")
    create = vm_sub.add_parser(
        "create", help="boot a new VM on a host: the lab guest, or your own --image"
    )
    create.add_argument("name")
    _placement_options(create)
    create.add_argument("--memory", default="512M")
    create.add_argument("--vcpus", type=int, default=1)
    create.add_argument("--disk", default=None, metavar="SIZE", help="a qcow2 disk, e.g. 1G")
    _disk_options(create)
    create.add_argument("--workload", default="idle", help="e.g. " + DEMO_WORKLOAD)
    own = create.add_argument_group("your own guest")
    own.add_argument(
        "--image",
        default=None,
        metavar="FILE",
        help="boot this qcow2 or raw image (format probed; vmferry runs a copy of it)",
    )
    own.add_argument("--kernel", default=None, metavar="FILE", help="direct kernel boot")
    own.add_argument("--initrd", default=None, metavar="FILE", help="with --kernel")
    own.add_argument("--append", default=None, metavar="ARGS", help="kernel command line")
    own.add_argument("--firmware", default="bios", choices=("bios", "uefi"))
    own.add_argument("--nic", action="store_true", help="a virtio NIC (user networking)")
    own.add_argument(
        "--heartbeat",
        action="store_true",
        help="a second serial port for vmferry's workload program in the guest, whose "
        "heartbeats measure the downtime the guest feels (the Debian image runs it given "
        "vmferry.mode=… in --append)",
    )
    json_flag(create)
    imported = vm_sub.add_parser("import", help="run a libvirt domain (its XML) as a vmferry VM")
    imported.add_argument("--libvirt-xml", required=True, metavar="FILE")
    _placement_options(imported)
    imported.add_argument("--name", default=None, help="another name than the domain's")
    imported.add_argument(
        "--storage", default="local", choices=("local", "shared"), help="as for create"
    )
    json_flag(imported)
    run = vm_sub.add_parser(
        "exec", help="run a command in the guest through qemu-guest-agent (exits with its status)"
    )
    run.add_argument("name")
    run.add_argument("--timeout", type=float, default=30.0, metavar="S")
    run.add_argument("argv", nargs="*", metavar="-- CMD ...")
    json_flag(run)
    json_flag(vm_sub.add_parser("list", help="every VM of the cluster"))
    show = vm_sub.add_parser("show", help="one VM")
    show.add_argument("name")
    json_flag(show)
    delete = vm_sub.add_parser("delete", help="stop and remove a VM")
    delete.add_argument("name")
    json_flag(delete)


def _placement_options(create: argparse.ArgumentParser) -> None:
    create.add_argument(
        "--host", default=None, help="where to run it (default: placed where it fits best)"
    )
    create.add_argument(
        "--group",
        default=None,
        metavar="NAME",
        help="anti-affinity group: never on a host with another VM of NAME (made on first use)",
    )
    create.add_argument(
        "--dry-run",
        action="store_true",
        help="show the host it would go to and why; create nothing",
    )


def _job_options(job: argparse.ArgumentParser, *, destinations: bool) -> None:
    if destinations:
        job.add_argument(
            "--to",
            nargs="+",
            action="extend",
            default=None,
            metavar="HOST",
            help="move only to these hosts (default: every host that takes VMs)",
        )
        job.add_argument(
            "--deadline",
            type=float,
            default=None,
            metavar="S",
            help="refuse (nothing moved) unless the whole job is predicted to end within S s",
        )
    job.add_argument(
        "--bandwidth",
        type=int,
        default=None,
        metavar="MBPS",
        help="cap each move's stream (megabits/s)",
    )
    job.add_argument("--max-downtime", type=int, default=300, metavar="MS", help="per VM")
    job.add_argument(
        "--max-outbound",
        type=int,
        default=None,
        metavar="N",
        help="moves each host sends at once, at most (default 8)",
    )
    job.add_argument(
        "--max-inbound",
        type=int,
        default=None,
        metavar="N",
        help="moves each host receives at once, at most (default 8)",
    )
    job.add_argument("--dry-run", action="store_true", help="plan and show; move nothing")
    json_flag(job)


def _host(host: argparse.ArgumentParser) -> None:
    """host list|maintenance|evacuate"""
    host_sub = host.add_subparsers(dest="host_command", required=True, metavar="ACTION")
    json_flag(host_sub.add_parser("list", help="every host: room, VMs, maintenance state"))
    maintenance = host_sub.add_parser(
        "maintenance",
        help="enter: empty the host (marked in maintenance once empty); exit: take VMs again",
    )
    maintenance.add_argument("action", choices=("enter", "exit"))
    maintenance.add_argument("host", metavar="HOST")
    maintenance.add_argument(
        "--bring-back", action="store_true", help="exit: move the VMs enter moved off back"
    )
    _job_options(maintenance, destinations=True)
    evacuate = host_sub.add_parser(
        "evacuate", help="move every VM of a host elsewhere, as one scheduled job"
    )
    evacuate.add_argument("host", metavar="HOST")
    _job_options(evacuate, destinations=True)
    # Bench-only (bench/evacuation_lab.py): the same job runner under a fixed-concurrency
    # baseline's dispatcher instead of vmferry's; hidden from --help.
    evacuate.add_argument("--policy", default="ours", help=argparse.SUPPRESS)


def _job(job: argparse.ArgumentParser) -> None:
    """job list|show|resume"""
    job_sub = job.add_subparsers(dest="job_command", required=True, metavar="ACTION")
    listing = job_sub.add_parser("list", help="recorded jobs, newest first")
    listing.add_argument("--host", default=None, help="only the jobs about HOST")
    listing.add_argument(
        "--state",
        default=None,
        choices=("running", "completed", "failed", "interrupted"),
        help="only the jobs in this state",
    )
    json_flag(listing)
    show = job_sub.add_parser("show", help="one job and each of its moves")
    show.add_argument("id", type=int, metavar="ID")
    json_flag(show)
    resume = job_sub.add_parser(
        "resume",
        help="go on with a job whose controller died: settle its moves in flight (as "
        "reconcile does), then move what is left",
    )
    resume.add_argument("id", type=int, metavar="ID")
    resume.add_argument(
        "--wait",
        type=float,
        default=300.0,
        metavar="S",
        help="how long to wait for a migration still in flight (default 300)",
    )
    json_flag(resume)


def _balance(balance: argparse.ArgumentParser) -> None:
    balance.add_argument(
        "--max-moves",
        type=int,
        default=10,
        metavar="N",
        help="move at most N VMs (default 10)",
    )
    balance.add_argument(
        "--cool-down",
        type=float,
        default=30.0,
        metavar="MIN",
        help="leave VMs that moved in the last MIN minutes where they are (default 30)",
    )
    _job_options(balance, destinations=False)


def _disk_options(create: argparse.ArgumentParser) -> None:
    create.add_argument(
        "--disk-bus", default="virtio-blk", choices=("virtio-blk", "virtio-scsi"), help="disk bus"
    )
    create.add_argument(
        "--storage",
        default="local",
        choices=("local", "shared"),
        help="local: the image lives on the VM's host and moves with it; "
        "shared: on storage every host sees (only RAM moves)",
    )


def _verify(verify: argparse.ArgumentParser) -> None:
    verify.add_argument("name")
    json_flag(verify)


def _plan(plan: argparse.ArgumentParser) -> None:
    plan.add_argument("name")
    plan.add_argument("--to", required=True, metavar="HOST")
    plan.add_argument("--max-downtime", type=int, default=300, metavar="MS")
    plan.add_argument("--deadline", type=float, default=None, metavar="S")
    plan.add_argument("--bandwidth", type=int, default=None, metavar="MBPS")
    plan.add_argument("--no-postcopy", action="store_true", help="never choose post-copy")
    json_flag(plan)


def _migrate(migrate: argparse.ArgumentParser) -> None:
    migrate.add_argument("name")
    migrate.add_argument("--to", required=True, metavar="HOST")
    migrate.add_argument("--strategy", default="auto", choices=STRATEGIES)
    migrate.add_argument("--max-downtime", type=int, default=300, metavar="MS")
    migrate.add_argument("--deadline", type=float, default=None, metavar="S")
    migrate.add_argument(
        "--bandwidth",
        type=int,
        default=None,
        metavar="MBPS",
        help="cap the migration stream (megabits/s)",
    )
    migrate.add_argument(
        "--force",
        action="store_true",
        help="with auto: go ahead with the best effort if the goal cannot be met",
    )
    migrate.add_argument(
        "--no-postcopy",
        action="store_true",
        help="never use post-copy (auto will not switch over mid-flight either)",
    )
    migrate.add_argument(
        "--recovery-limit",
        type=float,
        default=600.0,
        metavar="S",
        help="keep recovering a post-copy broken by a network fault this long (default 600)",
    )
    migrate.add_argument(
        "--no-plan",
        action="store_true",
        help="skip the pre-flight measurement (an explicit --strategy only; the report then "
        "has no prediction)",
    )
    migrate.add_argument(
        "--tls",
        action="store_true",
        help="encrypt and authenticate the migration stream and disk mirror (mutual TLS; "
        "both agents need --qemu-tls-dir)",
    )
    migrate.add_argument(
        "--verify",
        default="sample",
        choices=("full", "sample", "off"),
        help="compare both stopped copies before the destination runs: every byte of RAM "
        "and local disk (full), a seeded sample (sample, default: a few ms), or not at all",
    )
    json_flag(migrate)


def _reconcile(reconcile: argparse.ArgumentParser) -> None:
    reconcile.add_argument(
        "--wait",
        type=float,
        default=300.0,
        metavar="S",
        help="how long to wait for a migration still in flight (default 300)",
    )
    json_flag(reconcile)


def _history(history: argparse.ArgumentParser) -> None:
    history.add_argument("--vm", default=None)
    history.add_argument("--limit", type=int, default=50)
    json_flag(history)


def _demo(demo: argparse.ArgumentParser) -> None:
    demo.add_argument("--memory", default="1G", help="guest memory (default 1G)")
    demo.add_argument("--workload", default=DEMO_WORKLOAD, help=f"default {DEMO_WORKLOAD}")
    demo.add_argument(
        "--disk", default="512M", help="the guest's disk on local storage, or 'none' (512M)"
    )
    demo.add_argument("--max-downtime", type=int, default=300, metavar="MS")
    demo.add_argument("--bandwidth", type=int, default=None, metavar="MBPS")
    demo.add_argument("--one-way", action="store_true", help="do not migrate back")
    json_flag(demo)


def _image(image: argparse.ArgumentParser) -> None:
    """image build"""
    image_sub = image.add_subparsers(dest="image_command", required=True, metavar="ACTION")
    build = image_sub.add_parser("build", help="build (or reuse) the cached lab guest image")
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    json_flag(build)


def _agent(agent: argparse.ArgumentParser) -> None:
    agent.add_argument("--host", required=True, help="this host's name, e.g. host-1")
    agent.add_argument("--listen", default="127.0.0.1:0", metavar="ADDR:PORT")
    agent.add_argument("--state-dir", required=True, type=Path)
    agent.add_argument("--token-file", required=True, type=Path)
    agent.add_argument("--tls-cert", type=Path, default=None, help="HTTPS certificate (PEM)")
    agent.add_argument("--tls-key", type=Path, default=None, help="its private key (PEM)")
    agent.add_argument(
        "--insecure-http",
        action="store_true",
        help="serve plain HTTP instead of HTTPS (debugging only: the token travels in clear)",
    )
    agent.add_argument("--memory", required=True, help="memory available to VMs (e.g. 8G)")
    agent.add_argument(
        "--migration-address", default="127.0.0.1", help="address incoming migrations listen on"
    )
    agent.add_argument(
        "--shared-dir", type=Path, default=None, help="shared storage (same path on every host)"
    )
    agent.add_argument(
        "--disk", default=None, help="space for local disk images (default: free space)"
    )
    agent.add_argument(
        "--ready-file", type=Path, default=None, help="write {url, pid} here once listening"
    )
    agent.add_argument(
        "--qemu-tls-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="QEMU's TLS credentials (ca-cert.pem, server-cert.pem, server-key.pem, "
        "client-cert.pem, client-key.pem) for `migrate --tls`; without it --tls is refused",
    )
    agent.add_argument(
        "--qemu-user",
        default="auto",
        metavar="NAME",
        help="user QEMU drops to after start-up: a name, 'none' (run as the agent), or "
        "'auto' (default: vmferry-qemu if it exists and the agent runs as root)",
    )
    agent.add_argument(
        "--profile-interval",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds between background measurements of each running VM, which let `plan` "
        "answer without measuring (default 10; 0: off)",
    )


def _serve(serve: argparse.ArgumentParser) -> None:
    serve.add_argument("--listen", default="127.0.0.1:7780", metavar="ADDR:PORT")
    serve.add_argument(
        "--state-dir", type=Path, default=None, help="its tokens (default: <lab dir>/serve)"
    )
    serve.add_argument("--tls-cert", type=Path, default=None, help="HTTPS certificate (PEM)")
    serve.add_argument("--tls-key", type=Path, default=None, help="its private key (PEM)")
    serve.add_argument(
        "--insecure-http",
        action="store_true",
        help="serve plain HTTP (a lab on loopback only: the tokens travel in clear)",
    )
    serve.add_argument(
        "--grace",
        type=float,
        default=10.0,
        metavar="S",
        help="on SIGTERM, let running jobs go on this long before winding them down (10)",
    )
    serve.add_argument(
        "--ready-file", type=Path, default=None, help="write {url, pid, tokens} once listening"
    )
    serve.add_argument(
        "--store",
        default=None,
        metavar="URL",
        help="keep the state in PostgreSQL (postgresql://…; default $VMFERRY_STORE, else the "
        "lab's SQLite history.db): several `vmferry serve` share it, one leads",
    )
    serve.add_argument(
        "--lease",
        type=float,
        default=10.0,
        metavar="S",
        help="with --store: the leader lease's length; a follower takes over within it (10)",
    )


def _simulate(sim: argparse.ArgumentParser) -> None:
    sim.add_argument("--hosts", type=int, default=100)
    sim.add_argument("--vms", type=int, default=2000)
    sim.add_argument("--seed", type=int, default=1)
    sim.add_argument(
        "--policy",
        default="all",
        help="all, ours, ours-plain, fixed-1, fixed-2, fixed-4, kubevirt, fixed-N+choice",
    )
    sim.add_argument("--scenario", default="evacuate", choices=("evacuate", "balance"))
    sim.add_argument("--evacuate", type=int, default=None, metavar="K", help="hosts to empty")
    sim.add_argument("--max-moves", type=int, default=None, metavar="N", help="for balance")
    json_flag(sim)


# Every command, in the order ``vmferry --help`` lists them: its help, and what adds its options
# (and actions) to its parser.
_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "lab": ("a cluster of hosts on this machine", _lab),
    "vm": ("create, list, show, delete VMs", _vm),
    "host": ("hosts: maintenance, evacuation", _host),
    "job": ("jobs of many moves: list, show, resume one whose controller died", _job),
    "balance": ("even out the hosts' load (memory and measured CPU) by moving VMs", _balance),
    "verify": ("ask the guest to check every page of its memory", _verify),
    "plan": ("predict what each strategy would cost (changes nothing)", _plan),
    "migrate": ("move a VM to another host", _migrate),
    "reconcile": (
        "after a crash: finish or undo half-done migrations (one running copy per VM)",
        _reconcile,
    ),
    "history": ("past migrations", _history),
    "demo": ("lab of 2 hosts; a busy guest migrated host-1 → host-2 and back, verified", _demo),
    "image": ("the lab guest image", _image),
    "agent": ("run a host agent (normally started by `lab up`)", _agent),
    "serve": ("run the controller as a service: REST API, events, metrics", _serve),
    "simulate": ("compare scheduling policies on a modelled cluster", _simulate),
}
