"""The bandwidth probe over loopback: a sink, a sender, and the ways a probe can fail."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from vmferry.agent.bandwidth import BandwidthProbeError, BandwidthSink, send_probe

pytestmark = pytest.mark.asyncio


async def test_loopback_probe_reports_plausible_bandwidth() -> None:
    sink = BandwidthSink("127.0.0.1", timeout_s=10)
    try:
        port = await sink.start()
        sent = await send_probe("127.0.0.1", port, duration_ms=300)
        received = await sink.result(timeout_s=5)
    finally:
        await sink.close()

    assert received.received_bytes == sent.sent_bytes
    assert 250 <= received.elapsed_ms <= sent.elapsed_ms
    assert received.bandwidth_bps > 50e6
    # The sender waits for the sink to hang up, so its figure is close to the sink's.
    assert sent.bandwidth_bps == pytest.approx(received.bandwidth_bps, rel=0.5)


async def test_probe_to_a_closed_port_fails_fast() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()

    with pytest.raises(BandwidthProbeError, match="cannot connect"):
        await send_probe("127.0.0.1", port, duration_ms=200)

    assert time.monotonic() - started < 1.0


async def test_sink_serves_one_probe_only() -> None:
    sink = BandwidthSink("127.0.0.1", timeout_s=10)
    try:
        port = await sink.start()
        first = asyncio.create_task(send_probe("127.0.0.1", port, duration_ms=300))
        await asyncio.sleep(0.1)
        with pytest.raises(BandwidthProbeError):
            await send_probe("127.0.0.1", port, duration_ms=100)
        sent = await first
        received = await sink.result(timeout_s=5)
    finally:
        await sink.close()

    assert received.received_bytes == sent.sent_bytes


async def test_sink_without_a_sender_gives_up() -> None:
    sink = BandwidthSink("127.0.0.1", timeout_s=0.2)
    try:
        await sink.start()
        with pytest.raises(BandwidthProbeError, match="no complete probe"):
            await sink.result(timeout_s=5)
    finally:
        await sink.close()
