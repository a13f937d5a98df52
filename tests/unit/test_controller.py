"""Controller pieces that need no agent: requests, specs on the wire, history, inventory."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmferry.agent.api import STATUS_BY_ERROR, CapacityError, HostInfo, NotFound
from vmferry.agent.server import options_from_json
from vmferry.controller.history import History
from vmferry.controller.inventory import HostEntry, Inventory
from vmferry.controller.migrate import MigrationRequest
from vmferry.controller.plan import calibration_from
from vmferry.core.calibration import Calibration
from vmferry.core.errors import ConfigError, FerryError, StateError
from vmferry.core.model import (
    GuestAgentCheck,
    IntegrityReport,
    MigrationReport,
    Prediction,
    VmSpec,
    spec_from_json,
    spec_to_json,
)
from vmferry.core.workload import parse_workload


def test_request_resolves_to_options() -> None:
    strategy, options = MigrationRequest(
        "vm1", "host-2", "auto", max_downtime_ms=50, deadline_s=30, bandwidth_mbps=200
    ).resolve()
    assert strategy == "precopy"
    assert options.max_bandwidth_bps == 25_000_000
    # The goal is what the guest feels: the resume (30 ms) off, then 70 % of the rest for QEMU.
    assert options.downtime_limit_ms == 14
    assert options.timeout_s == 30
    assert MigrationRequest("vm1", "host-2", "cold").resolve()[0] == "cold"


@pytest.mark.parametrize(
    "strategy", ["precopy", "multifd", "xbzrle", "auto-converge", "postcopy", "hybrid", "cold"]
)
def test_explicit_strategies_are_their_own_mechanism(strategy: str) -> None:
    mechanism, options = MigrationRequest("vm1", "host-2", strategy).resolve("postcopy")
    assert mechanism == strategy
    assert options.mechanism == strategy
    assert options.uses_postcopy == (strategy in ("postcopy", "hybrid"))


def test_auto_takes_the_chosen_mechanism_and_keeps_postcopy_ready() -> None:
    mechanism, options = MigrationRequest("vm1", "host-2", "auto").resolve("xbzrle")
    assert mechanism == "xbzrle"
    assert options.postcopy_ready


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"strategy": "teleport"}, "unknown strategy"),
        ({"max_downtime_ms": 0}, "max-downtime"),
        ({"deadline_s": -1.0}, "deadline"),
        ({"bandwidth_mbps": 0}, "bandwidth"),
    ],
)
def test_bad_requests(fields: dict[str, object], message: str) -> None:
    request = MigrationRequest("vm1", "host-2", **fields)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=message):
        request.resolve()


@given(
    memory_mib=st.integers(min_value=512, max_value=4096),
    vcpus=st.integers(min_value=1, max_value=8),
    workload=st.sampled_from(
        ["idle", "idle:size=16M", "dirty:rate=5M,size=128M,pattern=compressible", "dirty:mode=cpu"]
    ),
)
def test_spec_json_round_trip(memory_mib: int, vcpus: int, workload: str) -> None:
    spec = VmSpec(
        name=VmSpec.build("vm-x").name,
        memory_bytes=memory_mib << 20,
        vcpus=vcpus,
        workload=parse_workload(workload),
    )
    assert spec_from_json(spec_to_json(spec)) == spec


@pytest.mark.parametrize(
    "data",
    [
        None,
        [],
        {"name": "../x", "memory_bytes": 1 << 29},
        {"name": "vm1"},
        {"name": "vm1", "memory_bytes": "512M"},
        {"name": "vm1", "memory_bytes": 1 << 29, "vcpus": True},
        {"name": "vm1", "memory_bytes": 1 << 29, "machine_type": "pc;rm -rf"},
        {"name": "vm1", "memory_bytes": 1 << 29, "workload": "nonsense"},
    ],
)
def test_bad_specs_on_the_wire(data: object) -> None:
    with pytest.raises(ConfigError):
        spec_from_json(data)


@pytest.mark.parametrize(
    "data",
    [
        [],
        {"max_bandwidth_bps": -1},
        {"max_bandwidth_bps": "fast"},
        {"downtime_limit_ms": 0},
        {"timeout_s": 0},
        {"timeout_s": "soon"},
    ],
)
def test_bad_migration_options(data: object) -> None:
    with pytest.raises(ConfigError):
        options_from_json(data)


def test_error_status_table_is_most_specific_first() -> None:
    def status(error: FerryError) -> int:
        return next(code for cls, code in STATUS_BY_ERROR if isinstance(error, cls))

    assert status(NotFound("x")) == 404
    assert status(CapacityError("x")) == 507
    assert status(ConfigError("x")) == 400
    assert status(StateError("vm", "migrating", "running")) == 409
    assert status(FerryError("x")) == 500


def test_host_info_round_trip() -> None:
    info = HostInfo("host-1", 8 << 30, 1 << 30, 1, "10.0.2", ("pc-q35-10.0",), ("qemu64",),
                    "tcg", "127.0.0.1")  # fmt: skip
    assert HostInfo.from_json(info.to_json()) == info
    assert info.memory_free_bytes == 7 << 30


def _report(vm: str, status: str = "completed") -> MigrationReport:
    return MigrationReport(
        vm=vm, source="host-1", destination="host-2", running_on="host-2", strategy="precopy",
        status=status, error=None, total_ms=1000, downtime_ms=20, guest_downtime_ms=30,  # type: ignore[arg-type]
        transferred_bytes=1 << 20, iterations=2, predicted=None,
        integrity=IntegrityReport(True, 10, 0), guest_alive=True,
    )  # fmt: skip


def test_history_records_and_filters(tmp_path: Path) -> None:
    history = History(tmp_path / "h" / "history.db")
    assert history.entries() == []
    first = history.record(_report("vm1"))
    history.record(_report("vm2", "failed"))
    history.record(_report("vm1"))
    entries = history.entries()
    assert [e.report["vm"] for e in entries] == ["vm1", "vm2", "vm1"]
    assert entries[0].id == first
    assert entries[1].report["status"] == "failed"
    assert [e.id for e in history.entries(vm="vm1", limit=1)] == [entries[2].id]
    assert entries[0].to_json()["schema"] == 1


def test_inventory_round_trip_and_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="lab up"):
        Inventory.load(tmp_path / "none")
    inventory = Inventory(
        tmp_path / "lab",
        "t" * 32,
        (HostEntry("host-1", "http://127.0.0.1:1", 10, "/s/1", "127.0.0.1"),),
    )
    inventory.save()
    assert (inventory.token_file.stat().st_mode & 0o777) == 0o600
    loaded = Inventory.load(tmp_path / "lab")
    assert loaded == inventory
    with pytest.raises(ConfigError, match="unknown host 'host-2'"):
        loaded.host("host-2")
    inventory.path.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read"):
        Inventory.load(tmp_path / "lab")


def test_calibration_learns_felt_stalls_per_kind_of_guest(tmp_path: Path) -> None:
    history = History(tmp_path / "history.db")
    predicted = Prediction(1000, 1, 1 << 20, 301)  # post-copy: 1 ms QEMU, 300 ms of faults
    for felt_ms, agent in ((150, None), (1200, GuestAgentCheck(True))):  # lab, then own
        report = dataclasses.replace(
            _report("vm"), strategy="postcopy", downtime_ms=1, guest_downtime_ms=felt_ms,
            predicted=predicted, guest_agent=agent,
        )  # fmt: skip
        for _ in range(4):
            history.record(report)
    lab = calibration_from(history, "lab")
    own = calibration_from(history, "own")
    assert lab.fault_chain < Calibration.default().fault_chain < own.fault_chain
