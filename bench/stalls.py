"""Benchmark: why a post-copy page fault stalls the guest for hundreds of milliseconds, and what
shortens it. Side by side in one run, on a netns link shaped like the lab's: the guest-felt stall
(the largest heartbeat gap the host sees during the move), QEMU's downtime and total time, the
number of pages the destination asked for (source ``postcopy-requests``) and how long its vCPUs
were blocked on them (destination ``postcopy-blocktime``/``postcopy-vcpu-blocktime``), for
post-copy and hybrid moves of 1 GiB lab guests.

Variants (each one change from the baseline):

* ``baseline`` — vmferry's settings before this bench: ``postcopy-preempt`` on, post-copy bulk
  unpaced, the lab's link queue (``tbf ... latency 50ms``: one FIFO queue of 50 ms);
* ``no-preempt`` — ``postcopy-preempt`` off;
* ``pace70``/``pace85``/``pace95`` — ``max-postcopy-bandwidth`` at that share of the link;
* ``shallow`` — tbf ``latency 5ms`` (a shallow switch-port buffer);
* ``unshaped`` — no qdisc at all (the floor: what the link's queue costs).
  (A fair queue under the tbf was planned: this kernel has no fq_codel/sfq/fq/prio, only
  tbf, htb and pfifo/bfifo/pfifo_fast.)
* ``vcpu2`` — the guest has 2 vCPUs;
* ``gso16k`` — the veth ends send GSO packets of at most 16 KiB (TCP keeps two of them queued
  per flow whatever the queue's limit: with 64 KiB ones that is ~5 ms of 200 Mbit/s);
* ``late3``/``late4`` — hybrid switches after the 3rd/4th dirty sync instead of the 2nd (fewer
  pages missing at the switch when pre-copy still shrinks them);
* ``engine`` — what vmferry does now: the engine's own capabilities and parameters
  (``capabilities_for``/``source_parameters_for``, no ``--bandwidth``) over the lab's
  own link queue (``vmferry.lab.netns``).

QEMUs run in the lab's namespaces (``ip netns exec``), driven by a minimal QMP script; the guest
goes back and forth between ``host-1`` and ``host-2`` so one boot serves many moves. Results are
merged into ``--out`` keyed by link rate, workload, variant and strategy, so the bench can run in
short slices (each under the shared QEMU lock):

    uv run python bench/stalls.py [--rates 200,50] [--workloads idle,paced,cpu]
        [--variants baseline,no-preempt,...] [--strategies postcopy,hybrid] [--repeat 3]
        [--out bench/results/stalls.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from vmferry.controller.plan import qemu_downtime_limit_ms
from vmferry.core.model import MigrationOptions, VmSpec
from vmferry.core.workload import parse_workload
from vmferry.guest.image import build_image
from vmferry.lab import netns
from vmferry.qemu.argv import BootFiles, RuntimePaths, build_argv
from vmferry.qemu.binary import find_qemu
from vmferry.qemu.migration import UNLIMITED_BPS, capabilities_for, source_parameters_for

WORKLOADS = {
    "idle": "idle",
    "paced": "dirty:rate=8M,size=256M,pattern=random,mode=paced",
    "cpu": "dirty:rate=1M,size=256M,pattern=random,mode=cpu",
}
HOSTS = ("host-1", "host-2")
HYBRID_SWITCH_SYNC = 2  # as the engine: after the first full pass
SETTLE_S = 3.0
GOAL_MS = 100  # the goal: QEMU's downtime-limit as the engine derives it
AFTER_MS = 300  # heartbeats watched after completion (the last faults' stalls)


@dataclass(frozen=True, slots=True)
class Variant:
    preempt: bool = True
    pace_share: float | None = None  # of the link's bytes/s; None: unpaced
    queue: str = "fifo50"  # fifo50 | fifo5 | none | lab (whatever vmferry.lab.netns sets)
    vcpus: int = 1
    engine: bool = False
    gso_max_bytes: int = 65536  # the veth ends' gso_max_size (the kernel default)
    switch_sync: int = HYBRID_SWITCH_SYNC  # hybrid: switch after this many dirty syncs


VARIANTS = {
    "baseline": Variant(),
    "no-preempt": Variant(preempt=False),
    "pace70": Variant(pace_share=0.70),
    "pace85": Variant(pace_share=0.85),
    "pace95": Variant(pace_share=0.95),
    "shallow": Variant(queue="fifo5"),
    "unshaped": Variant(queue="none"),
    "gso16k": Variant(gso_max_bytes=16384),
    "late3": Variant(switch_sync=3),
    "late4": Variant(switch_sync=4),
    "vcpu2": Variant(vcpus=2),
    "engine": Variant(queue="lab", engine=True),
    "engine-vcpu2": Variant(queue="lab", engine=True, vcpus=2),
}


# -- the link ------------------------------------------------------------------------------------


def _tbf(rate_mbps: int, latency: str) -> list[str]:
    burst = netns.tbf_burst_bytes(rate_mbps)
    return ["tbf", "rate", f"{rate_mbps}mbit", "burst", str(burst), "latency", latency]


async def _tc(ns: str | None, *args: str) -> None:
    argv = ["tc", *(["-n", ns] if ns else []), *args]
    proc = await asyncio.create_subprocess_exec(*argv, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {err.decode().strip()}")


async def _exec(argv: list[str]) -> None:
    proc = await asyncio.create_subprocess_exec(*argv, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {err.decode().strip()}")


async def set_queue(queue: str, rate_mbps: int, gso_max_bytes: int = 65536) -> None:
    """Shape every lab host's link (both ends) with ``queue`` at ``rate_mbps``."""
    for host in HOSTS:
        if queue == "lab":
            await netns.set_link_rate(host, rate_mbps * 1000)
            continue
        target = netns.host_for(int(host.removeprefix("host-")), subnet="")
        for ns, dev in ((None, target.veth), (target.netns, "eth0")):
            ip = ["ip", *(["-n", ns] if ns else []), "link", "set", "dev", dev]
            await _exec([*ip, "gso_max_size", str(gso_max_bytes)])
            with contextlib.suppress(RuntimeError):
                await _tc(ns, "qdisc", "del", "dev", dev, "root")
            if queue == "none":
                continue
            latency = "5ms" if queue == "fifo5" else "50ms"
            await _tc(ns, "qdisc", "add", "dev", dev, "root", "handle", "1:",
                      *_tbf(rate_mbps, latency))  # fmt: skip


async def queued_bytes(host: str) -> int:
    """Bytes waiting in the qdisc of ``host``'s outgoing link now."""
    ns = netns.host_for(int(host.removeprefix("host-")), subnet="").netns
    proc = await asyncio.create_subprocess_exec(
        "tc", "-n", ns, "-s", "-j", "qdisc", "show", "dev", "eth0", stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    return sum(int(q.get("backlog", 0)) for q in json.loads(out or b"[]"))


# -- one QEMU --------------------------------------------------------------------------------------


class Heartbeats:
    """Every heartbeat's arrival (monotonic s), newest sequence numbers only."""

    def __init__(self) -> None:
        self.last_seq = 0
        self.arrivals: list[float] = []

    async def follow(self, path: Path) -> None:
        for _ in range(400):
            try:
                reader, _writer = await asyncio.open_unix_connection(str(path))
                break
            except OSError:
                await asyncio.sleep(0.025)
        else:
            raise RuntimeError(f"no channel at {path}")
        while line := await reader.readline():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == b"HB" and parts[1].isdigit():
                seq = int(parts[1])
                if seq > self.last_seq:
                    self.last_seq = seq
                    self.arrived(seq, time.monotonic())

    def arrived(self, seq: int, at: float) -> None:
        """Record heartbeat ``seq``, newer than every one before, arriving at ``at``."""
        del seq
        self.arrivals.append(at)

    def gaps_ms(self, start: float, end: float) -> list[tuple[float, float]]:
        """(offset from ``start`` in ms, gap in ms) of every gap ending in [start, end]."""
        out, previous = [], start
        for at in self.arrivals:
            if at < start:
                continue
            if at > end:
                break
            out.append(((previous - start) * 1000, (at - previous) * 1000))
            previous = at
        return out


@dataclass
class Qemu:
    proc: asyncio.subprocess.Process
    qmp: QMPClient
    host: str
    reader: asyncio.Task[None]

    async def stop(self) -> None:
        self.reader.cancel()
        with contextlib.suppress(Exception):
            await self.qmp.disconnect()
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


async def launch(
    qemu: str, spec: VmSpec, boot: BootFiles, root: Path, host: str, beats: Heartbeats,
    incoming: bool,
) -> Qemu:  # fmt: skip
    paths = RuntimePaths(root / f"{host}-{time.monotonic_ns()}")
    paths.directory.mkdir(parents=True)
    ns = netns.host_for(int(host.removeprefix("host-")), subnet="").netns
    argv = ["ip", "netns", "exec", ns, *build_argv(qemu, spec, boot, paths, incoming=incoming)]
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.DEVNULL)
    client = QMPClient(host)
    for _ in range(400):
        if paths.qmp_socket.exists():
            break
        await asyncio.sleep(0.025)
    await client.connect(str(paths.qmp_socket))
    reader = asyncio.create_task(beats.follow(paths.channel_socket))
    return Qemu(proc, client, host, reader)


# -- one move --------------------------------------------------------------------------------------


def _settings(
    variant: Variant, strategy: str, link_bps: int
) -> tuple[dict[str, bool], dict[str, object]]:
    options = MigrationOptions(
        mechanism="postcopy" if strategy == "postcopy" else "hybrid",
        max_bandwidth_bps=None,  # the engine's default: no --bandwidth given
        downtime_limit_ms=qemu_downtime_limit_ms(GOAL_MS),
    )
    caps = capabilities_for(options)
    params = source_parameters_for(options)
    if not variant.engine:
        caps["postcopy-preempt"] = variant.preempt
        params["max-bandwidth"] = UNLIMITED_BPS
        share = variant.pace_share
        params["max-postcopy-bandwidth"] = round(link_bps * share) if share else 0
    caps["postcopy-blocktime"] = True
    return caps, params


def _caps(caps: dict[str, bool]) -> dict[str, object]:
    return {"capabilities": [{"capability": k, "state": v} for k, v in caps.items()]}


async def move(
    src: Qemu, dst: Qemu, dst_address: str, strategy: str, variant: Variant, link_bps: int,
    beats: Heartbeats,
) -> dict[str, Any]:  # fmt: skip
    caps, params = _settings(variant, strategy, link_bps)
    await dst.qmp.execute("migrate-set-capabilities", _caps(caps))
    await dst.qmp.execute("migrate-incoming", {"uri": f"tcp:{dst_address}:0"})
    reply: Any = await dst.qmp.execute("query-migrate")
    port = reply["socket-address"][0]["port"]
    await src.qmp.execute("migrate-set-capabilities", _caps(caps))
    await src.qmp.execute("migrate-set-parameters", params)
    started = time.monotonic()
    await src.qmp.execute("migrate", {"uri": f"tcp:{dst_address}:{port}"})
    switched: float | None = None
    backlog: list[int] = []
    if strategy == "postcopy":
        await src.qmp.execute("migrate-start-postcopy")
        switched = time.monotonic()
    while True:
        info: Any = await src.qmp.execute("query-migrate")
        ram = info.get("ram", {})
        if switched is None and ram.get("dirty-sync-count", 0) >= variant.switch_sync:
            await src.qmp.execute("migrate-start-postcopy")
            switched = time.monotonic()
        if info["status"] in ("completed", "failed", "cancelled"):
            break
        if switched is not None:
            backlog.append(await queued_bytes(src.host))
        await asyncio.sleep(0.02)
    done = time.monotonic()
    await asyncio.sleep(AFTER_MS / 1000)
    dinfo: Any = await dst.qmp.execute("query-migrate")
    gaps = beats.gaps_ms(started, done + AFTER_MS / 1000)
    base = switched or started
    return {
        "status": info["status"],
        "total_ms": info.get("total-time"),
        "downtime_ms": info.get("downtime"),
        "guest_stall_ms": round(max((g for _, g in gaps), default=0.0)),
        "switch_at_ms": round((base - started) * 1000),
        "postcopy_ms": round((done - base) * 1000),
        "stalls_over_50ms": [
            [round(at - (base - started) * 1000), round(g)] for at, g in gaps if g > 50
        ],
        "postcopy_requests": ram.get("postcopy-requests"),
        "postcopy_bytes": ram.get("postcopy-bytes"),
        "transferred_bytes": ram.get("transferred"),
        "blocktime_ms": dinfo.get("postcopy-blocktime"),
        "queue_median_bytes": round(statistics.median(backlog)) if backlog else None,
        "queue_max_bytes": max(backlog, default=None),
        "vcpu_blocktime_ms": dinfo.get("postcopy-vcpu-blocktime"),
    }


# -- the run --------------------------------------------------------------------------------------


def _key(rate: int, workload: str, variant: str, strategy: str) -> str:
    return f"{rate}M/{workload}/{variant}/{strategy}"


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if r["status"] == "completed"]

    def med(key: str) -> float | None:
        values = [r[key] for r in ok if r.get(key) is not None]
        return round(statistics.median(values), 1) if values else None

    keys = ("guest_stall_ms", "downtime_ms", "total_ms", "postcopy_ms", "postcopy_requests",
            "blocktime_ms", "queue_median_bytes")  # fmt: skip
    out: dict[str, Any] = {"runs": len(runs), "completed": len(ok)}
    out.update({f"median_{k}": med(k) for k in keys})
    req, block = med("postcopy_requests"), med("blocktime_ms")
    out["blocktime_per_request_ms"] = round(block / req, 2) if req and block is not None else None
    return out


async def run_guest(
    args: argparse.Namespace, rate: int, workload: str, vcpus: int, variants: list[str],
    results: dict[str, Any],
) -> None:  # fmt: skip
    qemu = (await find_qemu()).path
    image = await asyncio.to_thread(build_image)
    boot = BootFiles(image.kernel_path, image.initrd_path)
    spec = VmSpec.build("stalls", memory="1G", vcpus=vcpus,
                        workload=parse_workload(WORKLOADS[workload]))  # fmt: skip
    root = Path(tempfile.mkdtemp(prefix="vmf-stalls-"))
    beats = Heartbeats()
    link_bps = rate * 1_000_000 // 8
    here = await launch(qemu, spec, boot, root, HOSTS[0], beats, incoming=False)
    try:
        for _ in range(600):
            if beats.last_seq > 100:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(SETTLE_S)
        for name in variants:
            variant = VARIANTS[name]
            await set_queue(variant.queue, rate, variant.gso_max_bytes)
            for strategy in args.strategies:
                key = _key(rate, workload, name, strategy)
                runs = results["cells"].setdefault(key, {"runs": []})["runs"]
                for _ in range(args.repeat):
                    other = HOSTS[1] if here.host == HOSTS[0] else HOSTS[0]
                    there = await launch(qemu, spec, boot, root, other, beats, incoming=True)
                    address = netns.host_for(int(other.removeprefix("host-")), args.subnet).address
                    try:
                        record = await move(
                            here, there, address, strategy, variant, link_bps, beats
                        )
                    finally:
                        await here.stop()
                    here = there
                    runs.append(record)
                    print(key, {k: v for k, v in record.items() if k != "stalls_over_50ms"},
                          flush=True)  # fmt: skip
                    await asyncio.sleep(1.0)
                results["cells"][key]["summary"] = summarize(runs)
                write(args.out, results)
    finally:
        await here.stop()
        shutil.rmtree(root, ignore_errors=True)


def write(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="200,50")
    parser.add_argument("--workloads", default="idle,paced,cpu")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--strategies", default="postcopy,hybrid")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--fresh", action="store_true", help="replace the cells run again")
    parser.add_argument("--out", type=Path, default=Path("bench/results/stalls.json"))
    args = parser.parse_args()
    args.strategies = args.strategies.split(",")
    return args


async def main() -> None:
    args = _parse()
    results: dict[str, Any] = {"benchmark": "stalls", "workloads": WORKLOADS, "cells": {}}
    if args.out.exists():
        results = json.loads(args.out.read_text())
    results["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    variants = args.variants.split(",")
    for rate in map(int, args.rates.split(",")):
        network = await netns.setup(2, link_mbps=rate)
        args.subnet = network.subnet
        try:
            for workload in args.workloads.split(","):
                if args.fresh:
                    for name in variants:
                        for strategy in args.strategies:
                            results["cells"].pop(_key(rate, workload, name, strategy), None)
                for vcpus in sorted({VARIANTS[v].vcpus for v in variants}):
                    chosen = [v for v in variants if VARIANTS[v].vcpus == vcpus]
                    await run_guest(args, rate, workload, vcpus, chosen, results)
        finally:
            await netns.teardown()
    for key, cell in sorted(results["cells"].items()):
        print(f"{key:<40} {cell.get('summary')}")


if __name__ == "__main__":
    asyncio.run(main())
