"""``lab up`` input checks and the lab's small pure rules (no processes, no network)."""

from __future__ import annotations

import os

import pytest

from vmferry.core.errors import ConfigError
from vmferry.lab.cluster import (
    GIB,
    DownReport,
    default_memory_per_host_bytes,
    validate_lab_request,
)
from vmferry.lab.netns import require_root, tbf_burst_bytes, tbf_burst_bytes_kbit

VALID = [
    {"hosts": 1},
    {"hosts": 16},
    {"hosts": 3, "netns": True},
    {"hosts": 2, "netns": True, "link_mbps": 1},
    {"hosts": 2, "netns": True, "link_mbps": 100_000},
    {"hosts": 2, "memory_per_host_bytes": 512 * 2**20},
]

INVALID = [
    ({"hosts": 0}, "--hosts must be 1..16"),
    ({"hosts": 17}, "--hosts must be 1..16"),
    ({"hosts": -1}, "--hosts must be 1..16"),
    ({"hosts": True}, "--hosts must be 1..16"),
    ({"hosts": 2, "link_mbps": 100}, "add --netns"),
    ({"hosts": 2, "netns": True, "link_mbps": 0}, "--link-mbps must be 1..100000"),
    ({"hosts": 2, "netns": True, "link_mbps": 100_001}, "--link-mbps must be 1..100000"),
    ({"hosts": 2, "memory_per_host_bytes": 0}, "memory per host must be positive"),
]


@pytest.mark.parametrize("kwargs", VALID)
def test_valid_requests_pass(kwargs: dict[str, object]) -> None:
    validate_lab_request(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("kwargs", "message"), INVALID)
def test_invalid_requests_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        validate_lab_request(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("hosts", "mem_total", "expected"),
    [
        (1, 24 * GIB, 8 * GIB),  # capped at 8 GiB
        (4, 24 * GIB, 5 * GIB + GIB // 2),  # (24 - 2) / 4
        (16, 24 * GIB, 22 * GIB // 16),
        (3, 2 * GIB + 3, 1),
    ],
)
def test_default_memory_share(hosts: int, mem_total: int, expected: int) -> None:
    assert default_memory_per_host_bytes(hosts, mem_total) == expected


def test_default_memory_refuses_a_tiny_machine() -> None:
    with pytest.raises(ConfigError, match="too little"):
        default_memory_per_host_bytes(2, 2 * GIB)


@pytest.mark.parametrize(
    ("mbps", "burst"),
    [(1, 4096), (8, 4096), (100, 50_000), (200, 100_000), (10_000, 5_000_000)],
)
def test_tbf_burst_covers_a_timer_tick(mbps: int, burst: int) -> None:
    assert tbf_burst_bytes(mbps) == burst


@pytest.mark.parametrize(
    ("kbit", "burst"),
    [(8, 4096), (1000, 4096), (100_000, 50_000), (200_000, 100_000)],
)
def test_throttled_links_keep_a_few_frames_of_burst(kbit: int, burst: int) -> None:
    # A link throttled to 8 kbit/s still passes whole frames; Mbit rates agree with kbit ones.
    assert tbf_burst_bytes_kbit(kbit) == burst
    if kbit % 1000 == 0:
        assert tbf_burst_bytes(kbit // 1000) == burst


def test_netns_refused_clearly_when_not_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(ConfigError, match="--netns needs root"):
        require_root()


def test_down_report_knows_when_there_was_nothing_to_do() -> None:
    assert DownReport(0, 0, 0).nothing_to_do
    assert not DownReport(0, 1, 0).nothing_to_do
    assert not DownReport(0, 0, 0, lab_dir_removed=True).nothing_to_do
