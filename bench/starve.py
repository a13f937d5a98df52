"""Benchmark (issue 13): does multifd starve the guest's vCPU on a 2-core host, and what helps?

One lab guest moves back and forth between two netns hosts under a minimal QMP driver (as
``bench/stalls.py``), with ``TCP_NOTSENT_LOWAT`` set on the source's migration sockets as the
agent sets it. Per move: the guest-felt stall (the largest heartbeat gap), where it began
relative to the completion the driver saw, whether the guest itself stalled (the next heartbeat
is seq + 1: the guest resyncs its period) or the observer was late (a burst of queued
heartbeats), QEMU's downtime and total time, the machine's busy cores, and per thread class on
both sides (vCPU, ``mig/src/send_N``, ``mig/dst/recv_N``, other ``mig/*``, the main loop) the CPU
used and the run-queue wait from ``/proc/PID/task/TID/schedstat``.

Variants: channels (``z1``/``z2``/``z4``), compression (``n*``: none), zstd level (``z2-l3``;
QEMU's default is 1, its fastest), the migration threads (comm ``mig/*``, QEMU >= 9.1 names
them so) reniced (``*-nice``: 19, ``z2-nice10``) or ``SCHED_IDLE`` (``z2-idle``), and plain
pre-copy (``pre``) for reference.

    flock /tmp/vmferry-qemu.lock uv run python bench/starve.py --rate 0 --memory 256M \
        --vcpus 2 --workload dirty:size=64M,pattern=compressible,mode=cpu --goal 300 \
        --variants z2,z2-nice,z1,n2,pre --repeat 3 --out bench/results/starve-h09.json

Results of 30 Nov: ``bench/README.md`` ("Multifd and the guest's CPU").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stalls import HOSTS, Heartbeats, Qemu
from vmferry.core.model import MigrationOptions, VmSpec
from vmferry.core.move_cost import qemu_downtime_limit_ms
from vmferry.core.workload import parse_workload
from vmferry.guest.image import build_image
from vmferry.lab import netns
from vmferry.qemu.argv import BootFiles
from vmferry.qemu.binary import find_qemu
from vmferry.qemu.migration import capabilities_for, source_parameters_for
from vmferry.qemu.sockets import UnsentLimiter

AFTER_S = 0.3
LOWAT = True


def cpu_busy() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


class Beats(Heartbeats):
    """Arrivals with their sequence numbers: a guest stall resumes with seq + 1 (the guest
    resyncs its period), an observer stall with a burst of queued heartbeats."""

    def __init__(self) -> None:
        super().__init__()
        self.seqs: list[int] = []

    def arrived(self, seq: int, at: float) -> None:
        super().arrived(seq, at)
        self.seqs.append(seq)

    def worst(self, start: float, end: float) -> dict[str, float]:
        """The largest gap in [start, end]: its start (s), length (ms), the sequence jump and
        how many heartbeats arrived within 3 ms after it (a burst: the observer was late)."""
        best = {"at": start, "gap_ms": 0.0, "jump": 0, "burst": 0}
        prev_t, prev_s = start, None
        for i, (t, s) in enumerate(zip(self.arrivals, self.seqs, strict=True)):
            if t < start:
                prev_s = s
                continue
            if t > end:
                break
            if (t - prev_t) * 1000 > best["gap_ms"]:
                burst = sum(1 for u in self.arrivals[i + 1 : i + 40] if u - t < 0.003)
                best = {
                    "at": prev_t,
                    "gap_ms": (t - prev_t) * 1000,
                    "jump": s - prev_s if prev_s else 0,
                    "burst": burst,
                }
            prev_t, prev_s = t, s
        return best


@dataclass(frozen=True)
class Variant:
    channels: int = 2
    compression: str = "zstd"
    level: int | None = None
    nice: int | None = None  # renice mig/* threads (both sides)
    idle: bool = False  # SCHED_IDLE for mig/* threads
    precopy: bool = False  # plain pre-copy for reference


VARIANTS = {
    "pre": Variant(precopy=True),
    "z2": Variant(),
    "z1": Variant(channels=1),
    "z4": Variant(channels=4),
    "n2": Variant(compression="none"),
    "n1": Variant(channels=1, compression="none"),
    "n4": Variant(channels=4, compression="none"),
    "z2-l3": Variant(level=3),
    "z2-nice": Variant(nice=19),
    "z2-nice10": Variant(nice=10),
    "z2-idle": Variant(idle=True),
    "z1-nice": Variant(channels=1, nice=19),
    "z4-nice": Variant(channels=4, nice=19),
    "n2-nice": Variant(compression="none", nice=19),
    "pre-nice": Variant(precopy=True, nice=19),
}


async def launch(
    qemu: str,
    spec: VmSpec,
    boot: BootFiles,
    root: Path,
    host: str,
    beats: Heartbeats,
    incoming: bool,
) -> Qemu:
    from qemu.qmp import QMPClient

    from vmferry.qemu.argv import RuntimePaths, build_argv

    paths = RuntimePaths(root / f"{host}-{time.monotonic_ns()}")
    paths.directory.mkdir(parents=True)
    ns = netns.host_for(int(host.removeprefix("host-")), subnet="").netns
    argv = ["ip", "netns", "exec", ns, *build_argv(qemu, spec, boot, paths, incoming=incoming)]
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.DEVNULL)
    client = QMPClient(host)
    for _ in range(400):
        if paths.qmp_socket.exists():
            try:
                await client.connect(str(paths.qmp_socket))
                break
            except Exception:  # not listening yet
                pass
        await asyncio.sleep(0.025)
    reader = asyncio.create_task(beats.follow(paths.channel_socket))
    return Qemu(proc, client, host, reader)


def classify(comm: str) -> str:
    if comm.startswith("CPU "):
        return "vcpu"
    if comm.startswith("mig/src/send") or comm.startswith("multifdsend"):
        return "send"
    if comm.startswith("mig/dst/recv") or comm.startswith("multifdrecv"):
        return "recv"
    if comm.startswith("mig/"):
        return "mig"
    if comm.startswith("qemu-system"):
        return "main"
    return "other"


def threads(pid: int) -> dict[int, tuple[str, int, int]]:
    """tid -> (comm, run_ns, wait_ns)."""
    out: dict[int, tuple[str, int, int]] = {}
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError):
                comm = (task / "comm").read_text().strip()
                run, wait, _ = (task / "schedstat").read_text().split()
                out[int(task.name)] = (comm, int(run), int(wait))
    return out


class Accounting:
    """Per-class CPU and run-queue wait of every thread seen during a move."""

    def __init__(self) -> None:
        self.first: dict[tuple[str, int], tuple[str, int, int]] = {}
        self.last: dict[tuple[str, int], tuple[str, int, int]] = {}

    def sample(self, side: str, pid: int) -> dict[int, tuple[str, int, int]]:
        now = threads(pid)
        for tid, value in now.items():
            self.first.setdefault((side, tid), (value[0], 0, 0) if side == "dst" else value)
            self.last[(side, tid)] = value
        return now

    def totals(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for key, (comm, run, wait) in self.last.items():
            _, run0, wait0 = self.first[key]
            name = f"{key[0]}-{classify(comm)}"
            entry = out.setdefault(name, {"run_ms": 0, "wait_ms": 0})
            entry["run_ms"] += (run - run0) // 1_000_000
            entry["wait_ms"] += (wait - wait0) // 1_000_000
        return dict(sorted(out.items()))


def apply_policy(tids: dict[int, tuple[str, int, int]], variant: Variant, done: set[int]) -> None:
    for tid, (comm, _, _) in tids.items():
        if tid in done or not comm.startswith("mig/"):
            continue
        done.add(tid)
        with contextlib.suppress(OSError):
            if variant.idle:
                os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
            elif variant.nice is not None:
                os.setpriority(os.PRIO_PROCESS, tid, variant.nice)


def settings(variant: Variant, goal_ms: int) -> tuple[dict[str, bool], dict[str, object]]:
    options = MigrationOptions(
        mechanism="precopy" if variant.precopy else "multifd",
        downtime_limit_ms=qemu_downtime_limit_ms(goal_ms),
        multifd_channels=variant.channels,
    )
    caps = capabilities_for(options)
    params = source_parameters_for(options)
    if not variant.precopy:
        params["multifd-compression"] = variant.compression
        if variant.level is not None:
            params["multifd-zstd-level"] = variant.level
    return caps, params


def _caps(caps: dict[str, bool]) -> dict[str, object]:
    return {"capabilities": [{"capability": k, "state": v} for k, v in caps.items()]}


async def move(
    src: Qemu, dst: Qemu, address: str, variant: Variant, goal_ms: int, beats: Beats
) -> dict[str, Any]:
    caps, params = settings(variant, goal_ms)
    shared = {k: v for k, v in params.items() if k.startswith("multifd")}
    await dst.qmp.execute("migrate-set-capabilities", _caps(caps))
    if shared:
        await dst.qmp.execute("migrate-set-parameters", shared)
    await dst.qmp.execute("migrate-incoming", {"uri": f"tcp:{address}:0"})
    reply: Any = await dst.qmp.execute("query-migrate")
    port = reply["socket-address"][0]["port"]
    await src.qmp.execute("migrate-set-capabilities", _caps(caps))
    await src.qmp.execute("migrate-set-parameters", params)
    acct, reniced = Accounting(), set[int]()
    acct.sample("src", src.proc.pid)
    acct.sample("dst", dst.proc.pid)
    started = time.monotonic()
    await src.qmp.execute("migrate", {"uri": f"tcp:{address}:{port}"})
    policy = variant.nice is not None or variant.idle
    limiter = UnsentLimiter(src.proc.pid, address) if LOWAT else None
    busy0 = cpu_busy()
    tick = 0
    while True:
        tick += 1
        if policy or tick % 10 == 0:
            for side, q in (("src", src), ("dst", dst)):
                tids = acct.sample(side, q.proc.pid)
                if policy:
                    apply_policy(tids, variant, reniced)
        if limiter is not None:
            limiter.apply()
        info: Any = await src.qmp.execute("query-migrate")
        if info["status"] in ("completed", "failed", "cancelled"):
            break
        await asyncio.sleep(0.01)
    done = time.monotonic()
    busy1 = cpu_busy()
    seen = beats.last_seq
    for _ in range(200):  # until the guest beats from its new home, at most 10 s
        if beats.last_seq > seen + 5:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(AFTER_S)
    acct.sample("dst", dst.proc.pid)
    end = time.monotonic()
    gaps = beats.gaps_ms(started, end)
    w = beats.worst(started, end)
    ram = info.get("ram", {})
    return {
        "status": info["status"],
        "total_ms": info.get("total-time"),
        "downtime_ms": info.get("downtime"),
        "setup_ms": info.get("setup-time"),
        "felt_ms": round(w["gap_ms"]),
        # where the worst gap began, relative to the completion we saw (negative: before)
        "felt_at_ms": round((w["at"] - done) * 1000),
        "felt_jump": w["jump"],
        "felt_burst": w["burst"],
        "gaps_over_40": [
            [round(at - (done - started) * 1000), round(g)] for at, g in gaps if g > 40
        ],
        "transferred": ram.get("transferred"),
        "syncs": ram.get("dirty-sync-count"),
        "threads": acct.totals(),
        "wall_ms": round((done - started) * 1000),
        "host_busy_cores": round((busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1]) * 2, 2),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"args": vars(args) | {"out": str(args.out)}, "runs": {}}
    network = await netns.setup(2, link_mbps=args.rate or None)
    qemu = (await find_qemu()).path
    image = await asyncio.to_thread(build_image)
    boot = BootFiles(image.kernel_path, image.initrd_path)
    spec = VmSpec.build("starve", memory=args.memory, vcpus=args.vcpus,
                        workload=parse_workload(args.workload))  # fmt: skip
    root = Path(tempfile.mkdtemp(prefix="vmf-starve-"))
    beats = Beats()
    here = await launch(qemu, spec, boot, root, HOSTS[0], beats, incoming=False)
    try:
        for _ in range(600):  # the guest's first heartbeats, at most 30 s
            if beats.last_seq >= 100:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(args.settle)
        order = [v for _ in range(args.repeat) for v in args.variants.split(",")]
        for name in order:
            other = HOSTS[1] if here.host == HOSTS[0] else HOSTS[0]
            there = await launch(qemu, spec, boot, root, other, beats, incoming=True)
            address = netns.host_for(int(other.removeprefix("host-")), network.subnet).address
            try:
                record = await move(here, there, address, VARIANTS[name], args.goal, beats)
            finally:
                await here.stop()
            here = there
            results["runs"].setdefault(name, []).append(record)
            short = {k: v for k, v in record.items() if k not in ("threads", "gaps_over_40")}
            print(name, short, flush=True)
            print("   gaps>40:", record["gaps_over_40"][:8], flush=True)
            print("   threads:", record["threads"], flush=True)
            args.out.write_text(json.dumps(results, indent=1) + "\n")
            await asyncio.sleep(args.settle)
    finally:
        await here.stop()
        shutil.rmtree(root, ignore_errors=True)
        await netns.teardown()
    return results


def summary(results: dict[str, Any]) -> None:
    print(f"{'variant':<12} {'n':>2} {'felt med':>9} {'felt max':>9} {'qemu med':>9} "
          f"{'total med':>10} {'vcpu wait':>10}")  # fmt: skip
    for name, runs in results["runs"].items():
        ok = [r for r in runs if r["status"] == "completed"]
        if not ok:
            print(name, "no completed run")
            continue
        felt = [r["felt_ms"] for r in ok]
        wait = [r["threads"].get("src-vcpu", {}).get("wait_ms", 0) for r in ok]
        print(f"{name:<12} {len(ok):>2} {statistics.median(felt):>9.0f} {max(felt):>9} "
              f"{statistics.median(r['downtime_ms'] for r in ok):>9.0f} "
              f"{statistics.median(r['total_ms'] for r in ok):>10.0f} "
              f"{statistics.median(wait):>10.0f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=int, default=200, help="link Mbit/s, 0 = unshaped")
    parser.add_argument("--memory", default="4G")
    parser.add_argument("--vcpus", type=int, default=1)
    parser.add_argument(
        "--workload", default="dirty:rate=6250000,size=190M,pattern=zero,mode=paced"
    )
    parser.add_argument("--goal", type=int, default=100)
    parser.add_argument("--variants", default="z2,z2-nice")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--settle", type=float, default=3.0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/starve.json"))
    parser.add_argument("--observer-nice", type=int, default=0)
    args = parser.parse_args()
    if args.observer_nice:
        os.nice(args.observer_nice)
    results = asyncio.run(run(args))
    summary(results)


if __name__ == "__main__":
    main()
