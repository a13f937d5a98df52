"""VM specs, names and the report schema."""

from __future__ import annotations

import dataclasses

import pytest

from vmferry.core.errors import ConfigError
from vmferry.core.model import (
    IntegrityReport,
    MigrationReport,
    MigrationStats,
    VmSpec,
    validate_name,
)
from vmferry.core.status import MigrationStatus, Stage
from vmferry.core.workload import parse_workload


@pytest.mark.parametrize("name", ["vm1", "web-01", "a", "A_b-9"])
def test_good_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "../x", "a/b", ".hidden", "-x", "x" * 64, "a b", "vm;rm", "é", "a\n"]
)
def test_bad_names(name: str) -> None:
    with pytest.raises(ConfigError):
        validate_name(name)


@pytest.mark.parametrize(
    ("memory", "workload"),
    [
        ("64M", "idle"),  # too small
        ("1T", "idle"),  # absurd
        ("512M", "dirty:rate=50M,size=480M,pattern=random,mode=paced"),  # ws does not fit
    ],
)
def test_bad_specs(memory: str, workload: str) -> None:
    with pytest.raises(ConfigError):
        VmSpec.build("vm1", memory=memory, workload=parse_workload(workload))


def test_spec_vcpus_range() -> None:
    with pytest.raises(ConfigError):
        VmSpec.build("vm1", vcpus=0)


def _stats(**overrides: object) -> MigrationStats:
    values: dict[str, object] = {
        "status": MigrationStatus.ACTIVE,
        "total_ms": 1000,
        "transferred_bytes": 100 << 20,
        "remaining_bytes": 100 << 20,
        "total_bytes": 512 << 20,
        "dirty_pages_rate": 0,
        "page_size": 4096,
        "iterations": 1,
        "throughput_bps": 100 << 20,
        "expected_downtime_ms": None,
        "downtime_ms": None,
    }
    values.update(overrides)
    return MigrationStats(**values)  # type: ignore[arg-type]


def test_disk_left_is_total_less_copied() -> None:
    copying = _stats(
        status=MigrationStatus.NONE,
        stage=Stage.DISK_COPY,
        disk_copied_bytes=700 << 20,
        disk_total_bytes=1 << 30,
    )
    assert copying.disk_remaining_bytes == 324 << 20


def test_report_schema_v1_keys() -> None:
    report = MigrationReport(
        vm="vm1",
        source="host-1",
        destination="host-2",
        running_on="host-2",
        strategy="precopy",
        status="completed",
        error=None,
        total_ms=1200,
        downtime_ms=15,
        guest_downtime_ms=40,
        transferred_bytes=1 << 30,
        iterations=3,
        predicted=None,
        integrity=IntegrityReport(ok=True, pages_checked=65536, bad_pages=0),
        guest_alive=True,
    )
    data = report.to_json()
    assert list(data) == [
        "schema",
        "vm",
        "source",
        "destination",
        "running_on",
        "strategy",
        "status",
        "error",
        "total_ms",
        "downtime_ms",
        "guest_downtime_ms",
        "transferred_bytes",
        "iterations",
        "predicted",
        "integrity",
        "guest_alive",
        "recoveries",  # schema 1 extended: post-copy recoveries, 0 when none were needed
        "tls",  # schema 1 extended: the stream ran over TLS (migrate --tls)
        "guest_agent",  # schema 1 extended: a user's guest's agent after the move
        "handoff",  # schema 1 extended: both stopped copies compared (migrate --verify)
        "retried_from",  # schema 1 extended: the attempt auto cancelled before retrying
        "guest_stall_copy_ms",  # schema 1 extended: where guest_downtime_ms came from
        "guest_stall_switch_ms",
        "resent_zero_bps",  # schema 1 extended: pages rewritten unchanged (core.blind)
    ]
    assert data["schema"] == 1
    assert data["recoveries"] == 0
    assert data["tls"] is False
    # Schema 1 extended (keys added, none renamed): disk blocks, 0 for a VM without a disk.
    assert data["integrity"] == {
        "ok": True,
        "pages_checked": 65536,
        "bad_pages": 0,
        "blocks_checked": 0,
        "bad_blocks": 0,
    }
    assert report.is_success
    bad = dataclasses.replace(report, integrity=IntegrityReport(False, 10, 1))
    assert not bad.is_success
