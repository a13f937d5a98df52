"""The simulator: a seeded model cluster, the model of pre-copy, and the comparison."""

from __future__ import annotations

import io
import json
import math
import time
from dataclasses import replace

import pytest

from vmferry.cli.main import main
from vmferry.core._dispatch_state import water_fill
from vmferry.core.cluster_model import Host, HostName, Move, Vm, VmName
from vmferry.core.errors import ConfigError
from vmferry.core.flows import FluidExecutor
from vmferry.core.job import POLICY_NAMES, CostBook, ManualClock, run_job
from vmferry.core.move_cost import Planned
from vmferry.core.placement import place_evacuation
from vmferry.core.precopy_flow import CompressionBudget, PrecopyFlow
from vmferry.core.schedule import Action, Start
from vmferry.core.schedule_baselines import BASELINES
from vmferry.core.simulate import (
    SIM_CALIBRATION,
    _source_s,
    compressed_bound_s,
    lower_bound_s,
    model_cluster,
    simulate,
)

GIB = 1 << 30
# The peers' policies as they run them: plain pre-copy.
PLAIN = tuple(name for name in BASELINES if not name.endswith("+choice"))


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
    assert [r.policy for r in result.results] == ["ours", "ours-plain", *BASELINES]
    assert list(POLICY_NAMES) == [r.policy for r in result.results]
    assert len(result.sources) == 2
    assert result.refused == 0
    assert result.compressed_bound_s < result.lower_bound_s
    for row in result.results:
        assert len(row.run.records) == result.moves
        assert row.makespan_s >= result.compressed_bound_s * 0.999
        assert row.transferred_bytes > 0
        assert sum(row.ran_as.values()) == result.moves
        if row.policy in ("ours-plain", *PLAIN):
            assert row.makespan_s >= result.lower_bound_s * 0.999
            assert "multifd" not in row.ran_as
    best, best_choice = result.best_fixed(), result.best_fixed(choice=True)
    assert best is not None
    assert best.policy in PLAIN
    assert best_choice is not None
    assert best_choice.policy.endswith("+choice")
    data = result.to_json()
    assert data["lower_bound_compressed_s"] > 0
    assert {"makespan_vs_best_fixed", "makespan_vs_best_fixed_choice"} <= set(data["policies"][0])


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
    """A dispatcher of moves all started at once, as they are given."""

    name = "once"
    wake_s = None

    def __init__(self, *starts: Start) -> None:
        self._starts = list(starts)
        self.waiting = len(starts)

    def begin(self, now_s: float) -> list[Action]:
        self.waiting = 0
        return list(self._starts)

    def finished(self, vm: VmName, now_s: float) -> list[Action]:
        return []

    def released(self, vm: VmName, now_s: float) -> list[Action]:
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


# -- multifd in the model, and the bound of compressed pages ------------------------------------


def _run_together(
    guests: list[Vm], strategy: Planned, budget: CompressionBudget | None, link_bps: float = 1.25e9
) -> list[tuple[float, str, int]]:
    """Simulate ``guests`` moving from a to b at once: per guest its end, how it ran and the
    bytes it sent."""
    hosts = [Host(HostName(n), 256 * GIB, 64, int(link_bps)) for n in ("a", "b")]
    truth = {g.name: g for g in guests}
    executor = FluidExecutor(
        {h.name: float(h.link_bps) for h in hosts},
        lambda start, now_s: PrecopyFlow(
            start, now_s, truth[start.move.name], SIM_CALIBRATION, budget
        ),
    )
    starts = [Start(Move(g, HostName("b")), None, strategy) for g in guests]
    schedule = run_job(_Once(*starts), executor, ManualClock())
    by_vm = {r.move.name: r for r in schedule.records}
    return [
        (by_vm[g.name].end_s, by_vm[g.name].ran_as, by_vm[g.name].transferred_bytes) for g in guests
    ]


def _idle(name: str, ratio: float) -> Vm:
    return Vm(
        VmName(name),
        HostName("a"),
        8 * GIB,
        dirty_rate_bps=0,
        zero_fraction=0.5,
        compress_ratio=ratio,
    )


def test_a_multifd_move_sends_its_pages_compressed() -> None:
    ((took_s, ran_as, sent),) = _run_together([_idle("z", 2.0)], "multifd", None)
    setup_s = SIM_CALIBRATION.setup_ms / 1000 + 4 * GIB / SIM_CALIBRATION.zero_scan_bps
    # A stream's 1 GB/s of wire carries 2 GB/s of pages, but zstd compresses 1.4 GB/s.
    assert took_s == pytest.approx(
        setup_s + 4 * GIB / SIM_CALIBRATION.multifd_compress_bps, rel=0.02
    )
    assert ran_as == "multifd"
    assert sent == pytest.approx(4 * GIB / 2.0, rel=0.01)


def test_a_hosts_cpu_is_shared_by_its_multifd_moves() -> None:
    guests = [_idle("y", 3.0), _idle("z", 3.0)]
    alone = _run_together(guests, "multifd", None)
    shared = _run_together(guests, "multifd", CompressionBudget(1e9))
    # 2 x 1.4 GB/s of zstd alone (the link carries 2.8/3); 0.5 GB/s each on 1 GB/s of CPU.
    assert shared[0][0] > alone[0][0] * 2.0
    setup_s = SIM_CALIBRATION.setup_ms / 1000 + 4 * GIB / SIM_CALIBRATION.zero_scan_bps
    assert shared[0][0] == pytest.approx(setup_s + 4 * GIB / 0.5e9, rel=0.02)


def test_the_cpu_budget_is_water_filled() -> None:
    budget = CompressionBudget(1000.0)
    a, b, h = VmName("a"), VmName("b"), HostName("h")
    assert budget.share_bps(h, a) == 1000.0  # not compressing yet: all of it
    budget.join(h, a, 200.0)
    budget.join(h, b, 5000.0)
    assert (budget.share_bps(h, a), budget.share_bps(h, b)) == (200.0, 800.0)
    budget.leave(h, a)
    assert budget.share_bps(h, b) == 1000.0


def test_a_stalled_multifd_move_runs_again_as_hybrid() -> None:
    guest = replace(_hot_guest(), compress_ratio=1.0)  # nothing to gain: it stalls as pre-copy
    ((_, ran_as, _),) = _run_together([guest], "multifd", None, link_bps=250e6)
    assert ran_as == "multifd+hybrid"


def test_the_source_bound_compresses_the_best_ratios_first() -> None:
    pages = [(100.0, 4.0), (100.0, 1.0)]
    assert _source_s(10.0, math.inf, pages) == pytest.approx(12.5)  # 25 + 100 over the link
    assert _source_s(10.0, 1e-9, pages) == pytest.approx(20.0, rel=1e-6)  # nothing compressed
    # CPU 10/s: compressing t of the first, (200 - 0.75 t) / 10 = t / 10, so t = 114 > 100:
    # all of it, then the link (125 / 10) and the CPU (100 / 10): 12.5 s.
    assert _source_s(10.0, 10.0, pages) == pytest.approx(12.5)
    # CPU 5/s: (200 - 0.75 t) / 10 = t / 5, so t = 200 / 2.75 = 72.7: 14.5 s.
    t = 200.0 / (10.0 / 5.0 + 0.75)
    assert _source_s(10.0, 5.0, pages) == pytest.approx(t / 5.0)


def test_the_compressed_bound_is_below_the_raw_one() -> None:
    modelled = model_cluster(12, 150, seed=2)
    moves = list(place_evacuation(modelled.cluster, ["host-3"]).require_all())
    book = CostBook(SIM_CALIBRATION)
    raw = lower_bound_s(modelled.cluster, moves, book)
    zipped = compressed_bound_s(modelled.cluster, moves, modelled.truth, book, 5.6e9)
    assert 0.0 < zipped < raw
    none = {name: replace(vm, compress_ratio=1.0) for name, vm in modelled.truth.items()}
    assert compressed_bound_s(modelled.cluster, moves, none, book, 5.6e9) == pytest.approx(raw)
