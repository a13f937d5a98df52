"""API latency of ``vmferry serve`` under concurrent event-stream watchers (no QEMU needed).

A service on an empty lab (no hosts), plain HTTP on loopback, ``--watchers`` clients on
``GET /api/v1/events`` (one of them never reads: drop-oldest must keep it from slowing anyone),
progress events published at ``--rate`` per second, while one client times sequential
``GET /api/v1/jobs`` for ``--duration`` seconds, then ``GET /openapi.json`` for a fifth of
it. Prints p50/p99 and writes JSON.

    uv run python bench/serve_latency.py --watchers 50 --out bench/results/serve_latency.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from vmferry.controller.inventory import Inventory
from vmferry.service.app import ServiceState, build_app
from vmferry.service.auth import Principal, Role, TokenBook
from vmferry.service.events import EventBus
from vmferry.service.metrics import ServiceMetrics
from vmferry.service.store import SqliteStore
from vmferry.service.supervisor import Supervisor

TOKEN = "bench-token-0123456789abcdef"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}


async def _watch(url: str, counts: list[int], index: int, reads: bool) -> None:
    async with (
        aiohttp.ClientSession(headers=HEADERS) as session,
        session.get(f"{url}/api/v1/events", timeout=aiohttp.ClientTimeout(total=None)) as r,
    ):
        if not reads:
            await asyncio.sleep(3600)  # never reads: its socket fills, its queue drops
        async for line in r.content:
            if line.startswith(b"event: progress"):
                counts[index] += 1


async def _publish(bus: EventBus, rate: float, stop: asyncio.Event) -> None:
    n = 0
    while not stop.is_set():
        n += 1
        bus.publish("progress", {"job": 1, "vm": "bench", "phase": "active", "stats": {"n": n}})
        await asyncio.sleep(1 / rate)


def _percentiles(samples_s: list[float]) -> dict[str, float]:
    ordered = sorted(samples_s)
    return {
        "p50_ms": round(statistics.median(ordered) * 1000, 2),
        "p99_ms": round(ordered[int(len(ordered) * 0.99) - 1] * 1000, 2),
        "max_ms": round(ordered[-1] * 1000, 2),
    }


async def _time(url: str, path: str, duration_s: float) -> list[float]:
    """Sequential requests for ``duration_s`` (10 ms apart: a dashboard's polling, not a flood)."""
    took = []
    end = time.perf_counter() + duration_s
    async with aiohttp.ClientSession(headers=HEADERS) as session:
        while time.perf_counter() < end:
            await asyncio.sleep(0.01)
            began = time.perf_counter()
            async with session.get(url + path) as r:
                await r.read()
                assert r.status == 200, r.status
            took.append(time.perf_counter() - began)
    return took


async def main(args: argparse.Namespace) -> dict[str, Any]:
    lab = Path(tempfile.mkdtemp(prefix="vmf-bench-serve-"))
    Inventory(lab, "t" * 32, ()).save()
    bus, metrics = EventBus(), ServiceMetrics()
    store = SqliteStore(lab / "history.db")
    tokens = TokenBook({TOKEN: Principal("bench", Role.OPERATOR)})
    async with asyncio.TaskGroup() as group:
        state = ServiceState(
            tokens, store, bus, metrics, Supervisor(store, bus, metrics, group), lab
        )
        runner = web.AppRunner(build_app(state), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        url = f"http://127.0.0.1:{port}"
        counts = [0] * args.watchers
        watchers = [
            group.create_task(_watch(url, counts, i, reads=i > 0)) for i in range(args.watchers)
        ]
        while bus.watchers < args.watchers:  # noqa: ASYNC110 (the bus signals no subscription)
            await asyncio.sleep(0.05)
        stop = asyncio.Event()
        publisher = group.create_task(_publish(bus, args.rate, stop))
        jobs = await _time(url, "/api/v1/jobs", args.duration)
        document = await _time(url, "/openapi.json", args.duration / 5)
        stop.set()
        await publisher
        published = bus.seq
        for task in watchers:
            task.cancel()
        state.closing.set()
        bus.wake_all()
        await runner.cleanup()
    readers = counts[1:]
    return {
        "watchers": args.watchers,
        "events_per_s": args.rate,
        "events_published": published,
        "events_read_min_per_reader": min(readers),
        "events_dropped_total": bus.dropped_total,
        "get_jobs": {"requests": len(jobs), **_percentiles(jobs)},
        "get_openapi": {"requests": len(document), **_percentiles(document)},
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--watchers", type=int, default=50)
    parser.add_argument("--rate", type=float, default=50.0, help="progress events per second")
    parser.add_argument("--duration", type=float, default=10.0, metavar="S")
    parser.add_argument("--out", type=Path, default=None)
    result = asyncio.run(main(parser.parse_args()))
    print(json.dumps(result, indent=2))
    out = parser.parse_args().out
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
