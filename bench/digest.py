"""Benchmark: how fast the agent digests guest RAM and a disk image (verified handoff).

* **RAM**: a 1 GiB memfd named as QEMU names it, shaped like a booted guest's RAM (the top 40 %
  never touched; below it scattered never-touched, zero-filled, random and repeated pages),
  found through ``/proc/self/fd`` as the agent finds QEMU's, digested with
  ``digest_ram``: full plans over a range of chunk sizes and 1..N threads, sample plans over a
  range of chunk sizes and byte budgets, and the defaults of ``vmferry.core.handoff``. The memfd's
  allocation is checked before and after (a digest must not allocate guest pages). Last, every
  page is written and the default full plan timed again (``ram-dense``: nothing to skip).
* **Disk**: a sparse raw image of 2 GiB with ~30 % written in runs of 64 KiB..8 MiB, converted to
  qcow2 (``qemu-img convert``), digested with ``digest_image`` (full and sample); the raw and
  qcow2 digests must be equal.

Numbers are warm (guest RAM is always in memory; a just-mirrored image is in the page cache).
Each cell is timed ``--repeat`` times; the table shows the median and the best.

    uv run python bench/digest.py [--ram 1G] [--disk 2G] [--repeat 5] [--workers 1,2,4]
        [--out bench/results/digest.json]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import xxhash

from vmferry.agent.digest import (
    DEFAULT_WORKERS,
    QEMU_MEMFD_NAME,
    digest_image,
    digest_ram,
    find_ram_fd,
)
from vmferry.core.handoff import ChunkPlan, Digests, VerifyMode, compare, plan_chunks

PAGE = 4096
KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
TIMEOUT_S = 120.0


def parse_size(text: str) -> int:
    units = {"K": KIB, "M": MIB, "G": GIB}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def fill_guest_ram(fd: int, size: int, seed: int) -> dict[str, int]:
    """Write a booted guest's kind of RAM into the memfd ``fd``; return the page counts."""
    rnd = random.Random(seed)
    repeated = [rnd.randbytes(PAGE) for _ in range(8)]
    counts = {"untouched": 0, "zero": 0, "random": 0, "repeated": 0}
    used_pages = int(size * 0.6) // PAGE
    counts["untouched"] += size // PAGE - used_pages
    run: list[bytes] = []
    run_start = 0
    for page in range(used_pages):
        r = rnd.random()
        if r < 0.10:  # never touched: a hole in the memfd
            counts["untouched"] += 1
            if run:
                os.pwrite(fd, b"".join(run), run_start * PAGE)
            run = []
            run_start = page + 1
            continue
        if r < 0.35:
            counts["zero"] += 1
            run.append(bytes(PAGE))
        elif r < 0.75:
            counts["random"] += 1
            run.append(rnd.randbytes(PAGE))
        else:
            counts["repeated"] += 1
            run.append(repeated[page % len(repeated)])
        if len(run) >= 256:
            os.pwrite(fd, b"".join(run), run_start * PAGE)
            run = []
            run_start = page + 1
    if run:
        os.pwrite(fd, b"".join(run), run_start * PAGE)
    return counts


def make_disk(directory: Path, size: int, share: float, seed: int) -> tuple[Path, Path, int]:
    """A sparse raw image with ``share`` of it written in random runs, and its qcow2 copy."""
    rnd = random.Random(seed)
    raw = directory / "disk.raw"
    written = 0
    with raw.open("wb") as f:
        f.truncate(size)
        while written < share * size:
            length = rnd.choice([64 * KIB, 256 * KIB, MIB, 4 * MIB, 8 * MIB])
            offset = rnd.randrange(0, size - length, 64 * KIB)
            f.seek(offset)
            f.write(rnd.randbytes(length))
            written += length
    qcow2 = directory / "disk.qcow2"
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)], check=True
    )
    allocated = os.stat(raw).st_blocks * 512
    return raw, qcow2, allocated


async def timed(digest: Any, repeat: int) -> tuple[list[float], Digests]:
    """Run ``digest()`` ``repeat`` times; the wall times (ms) and the last result."""
    times: list[float] = []
    result: Digests | None = None
    for _ in range(repeat):
        started = time.perf_counter()
        result = await digest()
        times.append((time.perf_counter() - started) * 1000)
    assert result is not None
    return times, result


def row(region: str, plan: ChunkPlan, workers: int, times: list[float]) -> dict[str, Any]:
    median, best = statistics.median(times), min(times)
    return {
        "region": region,
        "mode": str(plan.mode),
        "chunk_bytes": plan.chunk_bytes,
        "chunks": len(plan.indexes),
        "hashed_bytes": plan.planned_bytes,
        "workers": workers,
        "ms": [round(t, 2) for t in times],
        "median_ms": round(median, 2),
        "best_ms": round(best, 2),
        # throughput over the region's whole size (what a full digest covers)
        "region_gbps_median": round(plan.size_bytes / median / 1e6, 2),
    }


async def bench_ram(size: int, repeat: int, worker_counts: list[int]) -> dict[str, Any]:
    fd = os.memfd_create(QEMU_MEMFD_NAME, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        counts = fill_guest_ram(fd, size, seed=1)
        path = find_ram_fd(os.getpid(), size)
        allocated_before = os.fstat(fd).st_blocks * 512
        rows: list[dict[str, Any]] = []

        async def cell(plan: ChunkPlan, workers: int) -> None:
            times, _ = await timed(
                lambda: digest_ram(path, plan, timeout_s=TIMEOUT_S, workers=workers), repeat
            )
            rows.append(row("ram", plan, workers, times))
            print_row(rows[-1])

        for chunk in (MIB, 2 * MIB, 4 * MIB, 8 * MIB, 16 * MIB):
            for workers in worker_counts:
                await cell(plan_chunks(VerifyMode.FULL, size, 0, chunk_bytes=chunk), workers)
        for chunk in (16 * KIB, 32 * KIB, 64 * KIB, 256 * KIB):
            for budget in (4 * MIB, 16 * MIB, 64 * MIB):
                plan = plan_chunks(
                    VerifyMode.SAMPLE, size, 7, chunk_bytes=chunk, budget_bytes=budget
                )
                await cell(plan, DEFAULT_WORKERS)  # small plans run on one thread anyway
        defaults = {}
        for mode in (VerifyMode.FULL, VerifyMode.SAMPLE):
            await cell(plan_chunks(mode, size, 7), DEFAULT_WORKERS)
            defaults[str(mode)] = rows[-1]
        allocated_after = os.fstat(fd).st_blocks * 512
        # The worst case: a guest that has written every page (nothing to skip).
        for offset in range(0, size, 64 * MIB):
            os.pwrite(fd, os.urandom(min(64 * MIB, size - offset)), offset)
        await cell(plan_chunks(VerifyMode.FULL, size, 7), DEFAULT_WORKERS)
        rows[-1]["region"] = "ram-dense"
        defaults["full-dense"] = rows[-1]
        return {
            "size_bytes": size,
            "pages": counts,
            "allocated_bytes_before": allocated_before,
            "allocated_bytes_after": allocated_after,
            "rows": rows,
            "defaults": defaults,
        }
    finally:
        os.close(fd)


def gil_probe() -> list[dict[str, Any]]:
    """Does a call release the GIL? Two threads hashing in-cache buffers against one.

    sha256 (hashlib releases the GIL above 2 KiB) is the control: if it does not scale either,
    the second core was busy and the run says nothing about the GIL.
    """
    cases: list[tuple[str, Any, int]] = [
        ("xxh3_128 1 MiB", xxhash.xxh3_128_digest, MIB),
        ("xxh3_128 64 KiB", xxhash.xxh3_128_digest, 64 * KIB),
        ("sha256 1 MiB (control)", lambda b: hashlib.sha256(b).digest(), MIB),
    ]
    rows = []
    for name, fn, size in cases:
        buffer = os.urandom(size)
        calls = max(1, (4 * GIB if "xxh3" in name else 256 * MIB) // size)
        rates = []
        for threads in (1, 2):

            def loop(fn: Any = fn, buffer: bytes = buffer, calls: int = calls) -> None:
                for _ in range(calls):
                    fn(buffer)

            workers = [threading.Thread(target=loop) for _ in range(threads)]
            started = time.perf_counter()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            rates.append(threads * calls * size / (time.perf_counter() - started) / 1e9)
        rows.append(
            {
                "case": name,
                "gbps_1_thread": round(rates[0], 2),
                "gbps_2_threads": round(rates[1], 2),
                "scaling": round(rates[1] / rates[0], 2),
            }
        )
        print(
            f"gil {name:24} 1 thread {rates[0]:6.2f} GB/s  2 threads {rates[1]:6.2f} GB/s  "
            f"x{rates[1] / rates[0]:.2f}",
            flush=True,
        )
    return rows


async def bench_disk(size: int, share: float, repeat: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="vmferry-digest-") as tmp:
        raw, qcow2, allocated = make_disk(Path(tmp), size, share, seed=2)
        rows: list[dict[str, Any]] = []
        equal: dict[str, bool] = {}
        defaults = {}
        for mode in (VerifyMode.FULL, VerifyMode.SAMPLE):
            plan = plan_chunks(mode, size, 7)
            results = {}
            for fmt, path in (("qcow2", qcow2), ("raw", raw)):
                times, results[fmt] = await timed(
                    lambda p=path, f=fmt, plan=plan: digest_image(
                        p, plan, fmt=f, timeout_s=TIMEOUT_S
                    ),
                    repeat,
                )
                rows.append(row(f"disk-{fmt}", plan, DEFAULT_WORKERS, times))
                print_row(rows[-1])
            defaults[str(mode)] = rows[-2]
            equal[str(mode)] = compare(results["raw"], results["qcow2"]).is_equal
        return {
            "size_bytes": size,
            "allocated_bytes": allocated,
            "raw_equals_qcow2": equal,
            "rows": rows,
            "defaults": defaults,
        }


def print_row(r: dict[str, Any]) -> None:
    print(
        f"{r['region']:10} {r['mode']:6} chunk {r['chunk_bytes'] // KIB:>6} KiB "
        f"x{r['chunks']:>5}  hashed {r['hashed_bytes'] / MIB:>7.1f} MiB  "
        f"threads {r['workers']}  median {r['median_ms']:>8.2f} ms  best {r['best_ms']:>8.2f} ms  "
        f"{r['region_gbps_median']:>6.2f} GB/s",
        flush=True,
    )


def summary(ram: dict[str, Any], disk: dict[str, Any]) -> dict[str, Any]:
    full, sample = ram["defaults"]["full"], ram["defaults"]["sample"]
    dense = ram["defaults"]["full-dense"]
    return {
        "ram_full_gbps": full["region_gbps_median"],
        "ram_full_ms": full["median_ms"],
        "ram_dense_full_gbps": dense["region_gbps_median"],
        "ram_dense_full_ms": dense["median_ms"],
        "ram_sample_ms": sample["median_ms"],
        "disk_full_gbps": disk["defaults"]["full"]["region_gbps_median"],
        "disk_full_ms": disk["defaults"]["full"]["median_ms"],
        "disk_sample_ms": disk["defaults"]["sample"]["median_ms"],
        "raw_equals_qcow2": disk["raw_equals_qcow2"],
        "ram_allocation_unchanged": ram["allocated_bytes_before"] == ram["allocated_bytes_after"],
        "defaults": {
            "full_chunk_bytes": full["chunk_bytes"],
            "sample_chunk_bytes": sample["chunk_bytes"],
            "sample_chunks": sample["chunks"],
            "workers": DEFAULT_WORKERS,
        },
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ram", type=parse_size, default=GIB)
    parser.add_argument("--disk", type=parse_size, default=2 * GIB)
    parser.add_argument("--allocated", type=float, default=0.3, help="disk share written")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--workers", default="1,2,4", help="thread counts to compare")
    parser.add_argument("--out", type=Path, default=Path("bench/results/digest.json"))
    args = parser.parse_args()
    load_before = os.getloadavg()
    worker_counts = [int(w) for w in args.workers.split(",")]
    gil = gil_probe()
    ram = await bench_ram(args.ram, args.repeat, worker_counts)
    disk = await bench_disk(args.disk, args.allocated, args.repeat)
    results = {
        "config": {**vars(args), "out": str(args.out), "cpus": os.cpu_count()},
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "gil": gil,
        "ram": ram,
        "disk": disk,
        "summary": summary(ram, disk),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["summary"], indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    asyncio.run(main())
