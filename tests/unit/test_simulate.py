"""The simulator: a seeded model cluster, the model of pre-copy, and the comparison."""

from __future__ import annotations

import io
import json
import time

import pytest

from vmferry.cli.main import main
from vmferry.core._dispatch_state import water_fill
from vmferry.core.cluster_model import Host, HostName, Move, Vm, VmName
from vmferry.core.errors import ConfigError
from vmferry.core.flows import FluidExecutor
from vmferry.core.job import ManualClock, run_job
from vmferry.core.move_cost import Planned
from vmferry.core.precopy_flow import PrecopyFlow
from vmferry.core.schedule import Action, Start
from vmferry.core.schedule_baselines import BASELINES
from vmferry.core.simulate import SIM_CALIBRATION, model_cluster, simulate

GIB = 1 << 30


def test_the_model_cluster_is_seeded() -> None:
    one, two = model_cluster(20, 300, seed=7), model_cluster(20, 300, seed=7)
    assert one.cluster.vms == two.cluster.vms
    assert one.truth == two.truth
    assert model_cluster(20, 300, seed=8).cluster.vms != one.cluster.vms
    assert {v.name for v in one.cluster.vms} == set(one.truth)


def test_a_simulation_is_deterministic_with_a_seed() -> None:
    def run(seed: int) -> dict[str, object]:
        data = simulate(12, 150, seed=seed, timer=lambda: 0.0).to_json()
        return data

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_simulation_reports_every_policy() -> None:
    result = simulate(12, 150, seed=2, timer=time.perf_counter, evacuate=2)
    assert [r.policy for r in result.results] == ["ours", *BASELINES]
    assert len(result.sources) == 2
    assert result.refused == 0
    for row in result.results:
        assert len(row.run.records) == result.moves
        assert row.makespan_s >= result.lower_bound_s * 0.999
        assert row.transferred_bytes > 0
    assert result.best_fixed() is not None
    assert "makespan_vs_best_fixed" in result.to_json()["policies"][0]


def test_bad_simulations_are_refused() -> None:
    with pytest.raises(ConfigError):
        simulate(1, 10, seed=1, timer=time.perf_counter)
    with pytest.raises(ConfigError):
        simulate(10, 10, seed=1, timer=time.perf_counter, policies=["fifo"])
    with pytest.raises(ConfigError):
        simulate(10, 10, seed=1, timer=time.perf_counter, evacuate=10)


def test_balance_scenario() -> None:
    result = simulate(12, 200, seed=1, timer=time.perf_counter, scenario="balance")
    assert result.moves > 0
    assert not result.sources
    assert result.spread[1] < result.spread[0]


class _Once:
    """A dispatcher of one move, started as ``strategy``, uncapped."""

    name = "once"
    wake_s = None

    def __init__(self, start: Start) -> None:
        self._start = start
        self.waiting = 1

    def begin(self, now_s: float) -> list[Action]:
        self.waiting = 0
        return [self._start]

    def finished(self, vm: VmName, now_s: float) -> list[Action]:
        return []

    def tick(self, now_s: float) -> list[Action]:
        return []

    def progress(
        self, vm: VmName, now_s: float, left_s: float | None, rate_bps: float | None = None
    ) -> list[Action]:
        return []


def one_move(
    truth: Vm, *, strategy: Planned = "precopy", link_bps: float = 1.25e9
) -> tuple[float, str, int]:
    """Simulate ``truth`` alone from a to b: its duration, how it ran, its felt downtime."""
    hosts = [Host(HostName(n), 256 * GIB, 64, int(link_bps)) for n in ("a", "b")]
    executor = FluidExecutor(
        {h.name: float(h.link_bps) for h in hosts},
        lambda start, now_s: PrecopyFlow(start, now_s, truth, SIM_CALIBRATION),
    )
    start = Start(Move(truth, HostName("b")), None, strategy)
    schedule = run_job(_Once(start), executor, ManualClock())
    (record,) = schedule.records
    return record.end_s, record.ran_as, record.felt_ms


def test_an_idle_guest_takes_one_pass() -> None:
    guest = Vm(VmName("idle"), HostName("a"), 8 * GIB, dirty_rate_bps=0, zero_fraction=0.5)
    took_s, ran_as, felt_ms = one_move(guest)
    setup_s = SIM_CALIBRATION.setup_ms / 1000 + 4 * GIB / SIM_CALIBRATION.zero_scan_bps
    assert took_s == pytest.approx(setup_s + 4 * GIB / 1e9, rel=0.02)
    assert ran_as == "precopy"
    assert felt_ms < 100


def _hot_guest() -> Vm:
    """8 GiB, dirtying 400 MB/s over half of it: faster than a 250 MB/s link."""
    return Vm(
        VmName("hot"),
        HostName("a"),
        8 * GIB,
        dirty_rate_bps=400_000_000,
        dirty_set_bytes=4 * GIB,
        zero_fraction=0.2,
    )


def test_a_guest_dirtying_faster_than_its_link_is_rescued_by_post_copy() -> None:
    guest = _hot_guest()
    _, ran_as, felt_ms = one_move(guest, link_bps=250e6)
    assert ran_as == "precopy+postcopy"
    assert felt_ms > 0
    _, ran_fast, _ = one_move(guest)
    assert ran_fast == "precopy"


def test_hybrid_switches_after_its_pass() -> None:
    guest = _hot_guest()
    _, ran_as, _ = one_move(guest, strategy="hybrid", link_bps=250e6)
    assert ran_as == "hybrid"


def test_water_fill_gives_what_is_unused_to_the_others() -> None:
    a, b, c = VmName("a"), VmName("b"), VmName("c")
    shares = water_fill([(a, 100.0), (b, 1000.0), (c, 1000.0)], 1000.0)
    assert shares == {a: 100.0, b: 450.0, c: 450.0}
    assert water_fill([], 10.0) == {}
    assert sum(water_fill([(a, 1.0), (b, 2.0)], 10.0).values()) == 3.0


def test_cli_simulate_json() -> None:
    out, err = io.StringIO(), io.StringIO()
    status = main(
        ["simulate", "--hosts", "10", "--vms", "80", "--policy", "ours", "--json"],
        stdout=out,
        stderr=err,
    )
    assert status == 0
    data = json.loads(out.getvalue())
    assert data["hosts"] == 10
    assert [p["policy"] for p in data["policies"]] == ["ours"]


def test_cli_simulate_table_and_bad_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # a terminal as wide as the table
    out, err = io.StringIO(), io.StringIO()
    assert main(["simulate", "--hosts", "10", "--vms", "80"], stdout=out, stderr=err) == 0
    assert "fixed-4" in out.getvalue()
    assert "makespan" in out.getvalue()
    assert main(["simulate", "--policy", "nova"], stdout=out, stderr=err) != 0
