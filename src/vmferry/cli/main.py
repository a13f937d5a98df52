"""The ``vmferry`` command: parse arguments, call the lab/controller, render the result."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict

from rich.console import Console

from vmferry import __version__
from vmferry.core.errors import ConfigError, FerryError
from vmferry.core.model import MigrationReport, VmSpec
from vmferry.core.workload import parse_workload
from vmferry.guest.image import build_image
from vmferry.lab.local import LocalLab
from vmferry.qemu.migration import MigrationOptions

__all__ = ["main"]

DEMO_WORKLOAD = "dirty:rate=50M,size=256M,pattern=random,mode=paced"

# Exit statuses scripts can rely on.
EXIT_OK = 0
EXIT_FAILED = 1  # the operation ran and failed (e.g. migration failed or not verified)
EXIT_USAGE = 2  # bad input, nothing changed
EXIT_INTERRUPTED = 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmferry", description="Live migration of QEMU virtual machines."
    )
    parser.add_argument("--version", action="version", version=f"vmferry {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", required=True)

    image = sub.add_parser("image", help="the lab guest image")
    image_sub = image.add_subparsers(dest="image_command", required=True)
    build = image_sub.add_parser("build", help="build (or reuse) the cached lab guest image")
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    build.add_argument("--json", action="store_true", help="machine-readable output")

    demo = sub.add_parser(
        "demo", help="boot a lab guest, migrate it live host-1 → host-2 and back, verify"
    )
    demo.add_argument("--memory", default="1G", help="guest memory (default 1G)")
    demo.add_argument(
        "--workload", default=DEMO_WORKLOAD, help=f"guest workload (default {DEMO_WORKLOAD})"
    )
    demo.add_argument("--max-downtime", type=int, default=300, metavar="MS")
    demo.add_argument(
        "--bandwidth",
        type=int,
        default=None,
        metavar="MBPS",
        help="cap the migration at MBPS megabits/s (default: no cap)",
    )
    demo.add_argument("--one-way", action="store_true", help="do not migrate back")
    demo.add_argument("--json", action="store_true", help="print the reports as JSON")
    return parser


def _configure_logging(verbosity: int) -> None:
    level = logging.WARNING - 10 * min(verbosity, 2)
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


async def _demo(args: argparse.Namespace, err: Console, out: Console) -> int:
    from vmferry.cli.render import ProgressLine, report_table

    spec = VmSpec.build("demo-vm", memory=args.memory, workload=parse_workload(args.workload))
    if args.max_downtime <= 0:
        raise ConfigError("--max-downtime must be positive")
    options = MigrationOptions(
        downtime_limit_ms=args.max_downtime,
        max_bandwidth_bps=None if args.bandwidth is None else args.bandwidth * 125_000,
    )
    reports: list[MigrationReport] = []
    with err.status("preparing the lab (QEMU check, guest image)…"):
        lab = await LocalLab.open()
    async with lab:
        err.print(
            f"QEMU {lab.qemu.version_text}, accelerator {lab.accel}, "
            f"kernel {lab.image.kernel_version}"
        )
        with err.status(f"booting {spec.name} on host-1 ({spec.workload.describe()})…"):
            await lab.boot(spec, "host-1")
        route = [("host-1", "host-2")] + ([] if args.one_way else [("host-2", "host-1")])
        for source, destination in route:
            with ProgressLine(err, f"{spec.name} {source} → {destination}") as line:
                report = await lab.migrate(
                    spec.name, destination, options=options, on_progress=line.update
                )
            reports.append(report)
            if not report.is_success:
                break
    if args.json:
        out.print_json(json.dumps([report.to_json() for report in reports]))
    else:
        out.print(report_table(reports))
    return EXIT_OK if reports and all(r.is_success for r in reports) else EXIT_FAILED


async def _image_build(args: argparse.Namespace, err: Console, out: Console) -> int:
    with err.status("building the lab guest image…"):
        image = await asyncio.to_thread(build_image, force=args.force, log=err.log)
    if args.json:
        out.print_json(json.dumps({k: str(v) for k, v in asdict(image).items()}))
    else:
        out.print(f"kernel  {image.kernel_path}\ninitrd  {image.initrd_path}")
    return EXIT_OK


async def _run(args: argparse.Namespace) -> int:
    err = Console(stderr=True)
    out = Console(soft_wrap=True)
    if args.command == "demo":
        return await _demo(args, err, out)
    if args.command == "image":
        return await _image_build(args, err, out)
    raise AssertionError(args.command)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vmferry`` console script."""
    args = _parser().parse_args(argv)
    _configure_logging(args.verbose)
    try:
        return asyncio.run(_run(args))
    except FerryError as error:
        Console(stderr=True).print(f"[bold red]error:[/] {error}", highlight=False)
        return EXIT_USAGE if _is_usage(error) else EXIT_FAILED
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted; the lab stopped the VMs it had started")
        return EXIT_INTERRUPTED


def _is_usage(error: FerryError) -> bool:
    return isinstance(error, ConfigError)


if __name__ == "__main__":
    sys.exit(main())
