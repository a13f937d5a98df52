"""Balancing's pure part: host load from memory and measured CPU, predicted loads after each
move, the spread, the cool-down (no flapping), hosts left out, and the request's checks."""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmferry.controller.balancing import BalanceRequest, cooling_from
from vmferry.controller.evacuation import JobRequest
from vmferry.controller.history import History
from vmferry.core.balance import (
    HostLoad,
    LoadBook,
    RecentMove,
    cooling,
    plan_moves,
    spread,
)
from vmferry.core.cluster_model import Cluster, Host, HostName, Move, Vm, VmName
from vmferry.core.errors import ConfigError
from vmferry.core.job import plan_job
from vmferry.core.model import IntegrityReport, MigrationReport
from vmferry.core.move_cost import Calibration, CostBook
from vmferry.core.placement import Room

MIB = 1 << 20


def host(name: str, mib: int = 1024, vcpus: int = 16) -> Host:
    return Host(HostName(name), mib * MIB, vcpus, 100_000_000)


def vm(name: str, on: str, mib: int = 128, vcpus: int = 1) -> Vm:
    return Vm(VmName(name), HostName(on), mib * MIB, vcpus=vcpus)


def flat(v: Vm, h: Host) -> float:
    return 1.0


def test_load_is_the_larger_of_memory_and_measured_cpu() -> None:
    cluster = Cluster.build([host("a"), host("b")], [vm("x", "a", 256, vcpus=2), vm("y", "b")])
    book = LoadBook(cluster, ["a", "b"], {"x": 1.5, "y": 0.1}, {"a": 2, "b": 2})
    a, b = book.loads()
    assert (a.memory, a.cpu, a.load) == (0.25, 0.75, 0.75)
    assert (b.memory, b.cpu, b.load) == (0.125, 0.05, 0.125)
    # Not measured: all its vCPUs count as busy; no CPU count: a share of the vCPUs offered.
    unmeasured = LoadBook(cluster, ["a"], {}, {}).load(HostName("a"))
    assert unmeasured.cpu == 2 / 16
    assert spread([a, b]) == pytest.approx(0.625)
    assert spread([a]) == 0.0


def test_a_cpu_bound_vm_moves_although_memory_is_even() -> None:
    # Memory is even; a's CPUs are full with two CPU-bound VMs, b's idle.
    cluster = Cluster.build(
        [host("a"), host("b")],
        [vm("hot1", "a"), vm("hot2", "a"), vm("idle1", "b"), vm("idle2", "b")],
    )
    busy = {"hot1": 1.0, "hot2": 1.0, "idle1": 0.0, "idle2": 0.0}
    plan = plan_moves(cluster, cpu_busy=busy, cpus={"a": 2, "b": 2}, cost_s=flat, max_moves=4)
    assert [(m.name, m.destination) for m in plan.moves] == [("hot1", "b")]
    assert plan.spread_before == 1.0 - 0.25
    assert plan.steps[0].loads == (
        HostLoad(HostName("a"), 0.125, 0.5),
        HostLoad(HostName("b"), 0.375, 0.5),
    )
    assert plan.spread_after == 0.0
    assert plan.stopped == "balanced"


def test_every_step_predicts_every_hosts_load_and_narrows_the_spread() -> None:
    cluster = Cluster.build(
        [host("a"), host("b"), host("c")],
        [vm(f"v{i}", "a", 64) for i in range(10)] + [vm("w", "b", 64)],
    )
    plan = plan_moves(cluster, cpu_busy={}, cpus={}, cost_s=flat, max_moves=20)
    assert plan.stopped == "balanced"
    assert plan.spread_after <= 0.10 < plan.spread_before
    spreads = [plan.spread_before, *(s.spread for s in plan.steps)]
    assert spreads == sorted(spreads, reverse=True)
    # The last step's loads are those of the cluster after every move.
    after = cluster.after(plan.moves)
    expected = LoadBook(after, ["a", "b", "c"], {}, {}).loads()
    assert plan.after == expected
    assert len({m.name for m in plan.moves}) == len(plan.moves)


def test_max_moves_stops_the_plan() -> None:
    cluster = Cluster.build([host("a"), host("b")], [vm(f"v{i}", "a") for i in range(6)])
    plan = plan_moves(cluster, cpu_busy={}, cpus={}, cost_s=flat, max_moves=1)
    assert len(plan.moves) == 1
    assert plan.stopped == "max-moves"
    assert "move limit" in plan.reason()


def test_the_cheaper_move_is_chosen_and_a_move_that_never_ends_never() -> None:
    cluster = Cluster.build([host("a"), host("b")], [vm("busy", "a"), vm("idle", "a")])

    def cost_s(v: Vm, h: Host) -> float:
        return 100.0 if v.name == "busy" else 1.0

    plan = plan_moves(cluster, cpu_busy={}, cpus={}, cost_s=cost_s, max_moves=1)
    assert [m.name for m in plan.moves] == ["idle"]
    assert plan.steps[0].cost_s == 1.0

    def never(v: Vm, h: Host) -> float:
        return math.inf if v.name == "idle" else 5.0

    plan = plan_moves(cluster, cpu_busy={}, cpus={}, cost_s=never, max_moves=1)
    assert [m.name for m in plan.moves] == ["busy"]
    stuck = plan_moves(cluster, cpu_busy={}, cpus={}, cost_s=lambda v, h: math.inf, max_moves=1)
    assert stuck.moves == ()
    assert stuck.stopped == "no-move-helps"


def test_a_lone_vm_is_not_moved_from_host_to_host() -> None:
    cluster = Cluster.build([host("a"), host("b")], [vm("x", "a", 512)])
    plan = plan_moves(cluster, cpu_busy={}, cpus={}, cost_s=flat, max_moves=5)
    assert plan.moves == ()  # b would be as loaded as a was: the next plan would move it back
    assert plan.stopped == "no-move-helps"


def test_the_cool_down_keeps_a_vm_that_just_moved_where_it_is() -> None:
    # x moved a → b a minute ago; since then y was started on b: moving x back would even
    # the hosts out, but x is in its cool-down, and y's move would not help.
    cluster = Cluster.build([host("a"), host("b")], [vm("x", "b", 128), vm("y", "b", 384)])
    recent = cooling([RecentMove("x", 1000.0)], now_s=1060.0, cool_down_s=1800.0)
    assert recent == {"x": 1740.0}
    held = plan_moves(cluster, cpu_busy={}, cpus={}, cost_s=flat, max_moves=5, cooldown=recent)
    assert held.moves == ()
    assert held.stopped == "cool-down"
    assert held.held_back == ("x",)
    assert "x" in held.reason()
    assert "29 more min" in held.reason()
    assert held.to_json()["cooling"] == [{"vm": "x", "left_s": 1740.0}]
    # Without the cool-down the same cluster moves x straight back.
    free = plan_moves(cluster, cpu_busy={}, cpus={}, cost_s=flat, max_moves=5)
    assert [m.name for m in free.moves] == ["x"]
    # Once it is over, x may move again.
    assert cooling([RecentMove("x", 1000.0)], now_s=2900.0, cool_down_s=1800.0) == {}


def _report(vm: str, status: str, total_ms: int) -> MigrationReport:
    return MigrationReport(
        vm=vm, source="host-1", destination="host-2", running_on="host-2", strategy="precopy",
        status=status, error=None, total_ms=total_ms, downtime_ms=20,  # type: ignore[arg-type]
        guest_downtime_ms=30, transferred_bytes=1 << 20, iterations=2, predicted=None,
        integrity=IntegrityReport(True, 10, 0), guest_alive=True,
    )  # fmt: skip


def test_the_cool_down_comes_from_the_moves_the_history_recorded(tmp_path: Path) -> None:
    history = History(tmp_path / "history.db")
    now = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
    history.record(_report("old", "completed", 1000), now - timedelta(minutes=45))
    # Started 40 min ago but ran for 20 min: ended 20 min ago, still cooling.
    history.record(_report("long", "completed", 20 * 60_000), now - timedelta(minutes=40))
    history.record(_report("recent", "completed", 2000), now - timedelta(minutes=10))
    history.record(_report("failed", "failed", 2000), now - timedelta(minutes=5))  # did not move
    left = cooling_from(history, 30.0, now)
    assert set(left) == {"long", "recent"}
    assert left[VmName("recent")] == pytest.approx(20 * 60 + 2)
    assert left[VmName("long")] == pytest.approx(10 * 60)
    assert cooling_from(history, 0.0, now) == {}
    assert cooling_from(None, 30.0, now) == {}


def test_no_flapping_when_the_measured_cpu_load_swings() -> None:
    # The CPU load of two VMs swaps between plans (a phase of a batch job): without the
    # cool-down each plan would send the hot VM across; with it, the VM moved stays.
    hosts = [host("a"), host("b")]
    vms = [vm("p", "a"), vm("q", "a"), vm("r", "b"), vm("s", "b")]
    cpus = {"a": 2, "b": 2}
    first = plan_moves(
        Cluster.build(hosts, vms),
        cpu_busy={"p": 1.0, "q": 1.0, "r": 0.0, "s": 0.0},
        cpus=cpus,
        cost_s=flat,
        max_moves=4,
    )
    assert [(m.name, m.destination) for m in first.moves] == [("p", "b")]
    now = Cluster.build(hosts, [vm("p", "b"), vm("q", "a"), vm("r", "b"), vm("s", "b")])
    swung = {"p": 1.0, "q": 0.0, "r": 1.0, "s": 0.0}  # b is hot now: p and r busy there
    again = plan_moves(now, cpu_busy=swung, cpus=cpus, cost_s=flat, max_moves=4, cooldown=["p"])
    assert "p" not in {m.name for m in again.moves}
    assert [m.name for m in again.moves] == ["r"]


def test_hosts_left_out_are_neither_sources_nor_destinations() -> None:
    cluster = Cluster.build(
        [host("a"), host("b"), host("m")], [vm(f"v{i}", "a") for i in range(4)] + [vm("z", "m")]
    )
    plan = plan_moves(cluster, cpu_busy={}, cpus={}, cost_s=flat, max_moves=5, hosts=["a", "b"])
    assert {m.destination for m in plan.moves} == {"b"}
    assert [h.host for h in plan.before] == ["a", "b"]
    assert all(set(s.to_json()["loads_after"]) == {"a", "b"} for s in plan.steps)


def test_vms_in_flight_stay_put_and_no_destination_is_overcommitted() -> None:
    cluster = Cluster.build([host("a"), host("b")], [vm("x", "a"), vm("y", "a")])
    plan = plan_moves(cluster, cpu_busy={}, cpus={}, cost_s=flat, max_moves=5, fixed=["x", "y"])
    assert plan.moves == ()
    # b has one CPU, busy already: a CPU-bound VM would overcommit it.
    busy = Cluster.build([host("a"), host("b")], [vm("x", "a"), vm("y", "a"), vm("z", "b")])
    plan = plan_moves(
        busy,
        cpu_busy={"x": 1.0, "y": 1.0, "z": 0.9},
        cpus={"a": 2, "b": 1},
        cost_s=flat,
        max_moves=5,
    )
    assert plan.moves == ()


def test_bad_numbers_are_refused() -> None:
    cluster = Cluster.build([host("a")], [])
    with pytest.raises(ConfigError, match="max_moves"):
        plan_moves(cluster, cpu_busy={}, cpus={}, cost_s=flat, max_moves=0)
    with pytest.raises(ConfigError, match="target"):
        plan_moves(cluster, cpu_busy={}, cpus={}, cost_s=flat, max_moves=1, target=1.5)
    with pytest.raises(ConfigError, match="cool-down"):
        cooling([], 0.0, -1.0)
    one = plan_moves(cluster, cpu_busy={}, cpus={}, cost_s=flat, max_moves=1)
    assert one.moves == ()
    assert one.stopped == "balanced"
    assert one.reason().startswith("nothing to do")


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (BalanceRequest(max_moves=0), "--max-moves must be a positive integer"),
        (BalanceRequest(max_moves=-3), "--max-moves must be a positive integer"),
        (BalanceRequest(cool_down_min=-1), "--cool-down must be"),
        (BalanceRequest(max_outbound=0), "--max-outbound must be a positive integer"),
        (BalanceRequest(max_inbound=-2), "--max-inbound must be a positive integer"),
        (BalanceRequest(bandwidth_mbps=0), "--bandwidth"),
    ],
)
def test_a_balance_request_out_of_range_is_refused(request_: BalanceRequest, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        request_.check()


def test_per_host_limits_reach_the_schedulers_hosts() -> None:
    request = JobRequest(host="h", max_outbound=2, max_inbound=3)
    request.check()
    limited = request.limits(host("h"))
    assert (limited.max_outbound, limited.max_inbound) == (2, 3)
    default = JobRequest(host="h").limits(host("h"))
    assert (default.max_outbound, default.max_inbound) == (8, 8)
    with pytest.raises(ConfigError, match="--max-outbound must be a positive integer"):
        JobRequest(host="h", max_outbound=0).check()


@pytest.mark.parametrize(("outbound", "inbound"), [(1, 8), (8, 1), (2, 2), (None, None)])
def test_the_schedule_keeps_the_per_host_limits_asked_for(
    outbound: int | None, inbound: int | None
) -> None:
    request = JobRequest(host="a", max_outbound=outbound, max_inbound=inbound)
    hosts = [request.limits(Host(HostName(n), 64 << 30, 64, 1_250_000_000)) for n in "abc"]
    vms = [Vm(VmName(f"v{i}"), HostName("a"), 1 << 30) for i in range(6)]
    cluster = Cluster.build(hosts, vms)
    moves = [Move(v, HostName("b" if i % 2 else "c")) for i, v in enumerate(vms)]
    schedule = plan_job(cluster, moves, book=CostBook(Calibration.default()))

    def most_at_once(key: Callable[[Move], str]) -> int:
        ends = [(r.start_s, 1, key(r.move)) for r in schedule.records]
        ends += [(r.end_s, -1, key(r.move)) for r in schedule.records]
        busy: dict[str, int] = {}
        most = 0
        for _, step, host_name in sorted(ends, key=lambda e: (e[0], e[1])):
            busy[host_name] = busy.get(host_name, 0) + step
            most = max(most, busy[host_name])
        return most

    if outbound is None or inbound is None:  # without limits the link is shared more widely
        assert most_at_once(lambda m: m.source) > 2
        return
    assert most_at_once(lambda m: m.source) <= outbound
    assert most_at_once(lambda m: m.destination) <= inbound


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(16, 256), min_size=1, max_size=12),
    spots=st.lists(st.integers(0, 2), min_size=12, max_size=12),
    busy=st.lists(st.floats(0.0, 1.0), min_size=12, max_size=12),
)
def test_a_plan_never_overfills_a_host_nor_widens_the_spread(
    sizes: list[int], spots: list[int], busy: list[float]
) -> None:
    names = (HostName("a"), HostName("b"), HostName("c"))
    hosts = [host(n) for n in names]
    vms = [vm(f"v{i}", names[spots[i]], size) for i, size in enumerate(sizes)]
    by_host = {n: sum(v.memory_bytes for v in vms if v.host == n) for n in names}
    if any(used > 1024 * MIB for used in by_host.values()):
        return  # not a cluster that can exist
    cluster = Cluster.build(hosts, vms)
    cpu = {str(v.name): busy[i] for i, v in enumerate(vms)}
    plan = plan_moves(cluster, cpu_busy=cpu, cpus={n: 2 for n in names}, cost_s=flat, max_moves=8)
    after = cluster.after(plan.moves)
    room = Room(after, names)
    assert all(room.memory[n] >= 0 and room.vcpus[n] >= 0 for n in names)
    assert plan.spread_after <= plan.spread_before + 1e-9
    assert len({m.name for m in plan.moves}) == len(plan.moves)
