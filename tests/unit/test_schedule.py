"""The scheduler of many moves: order, link shares, limits at every instant, the plan's
errors, and the discrete-event loop."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

from vmferry.core.cluster_model import (
    Cluster,
    DeadlineUnreachable,
    Host,
    HostName,
    Move,
    PlacementError,
    UnknownHost,
    Vm,
    VmName,
)
from vmferry.core.errors import ConfigError, FerryError
from vmferry.core.job import (
    POLICY_NAMES,
    Calibration,
    CostBook,
    ManualClock,
    Schedule,
    make_dispatcher,
    plan_job,
)
from vmferry.core.move_cost import PLANNED_PLAIN, share_bps, share_index
from vmferry.core.placement import place_evacuation
from vmferry.core.schedule import BandwidthDispatcher, SetCap, Start
from vmferry.core.schedule_baselines import BASELINES
from vmferry.core.simulate import SIM_CALIBRATION, model_cluster

GIB = 1 << 30
TEN_GBE = 1_250_000_000


def host(name: str, *, link_bps: int = TEN_GBE, out: int = 8, inn: int = 8) -> Host:
    return Host(HostName(name), 256 * GIB, 128, link_bps, max_outbound=out, max_inbound=inn)


def vm(name: str, on: str, gib: int, *, rate: int = 2_000_000, dirty_gib: float = 0.25) -> Vm:
    return Vm(
        VmName(name),
        HostName(on),
        gib * GIB,
        vcpus=1,
        dirty_rate_bps=rate,
        dirty_set_bytes=min(gib * GIB, int(dirty_gib * GIB)),
        zero_fraction=0.3,
    )


def book() -> CostBook:
    return CostBook(SIM_CALIBRATION)


def evacuation(cluster: Cluster, source: str) -> list[Move]:
    return list(place_evacuation(cluster, [source]).require_all())


def small_cluster(seed: int = 3) -> tuple[Cluster, list[Move]]:
    cluster = model_cluster(12, 160, seed=seed).cluster
    moves = list(place_evacuation(cluster, ["host-2", "host-5", "host-9"]).require_all())
    return cluster, moves


# -- order and shares ---------------------------------------------------------------------------


def test_longest_first_when_one_move_at_a_time() -> None:
    hosts = [host("a", out=1), host("b"), host("c")]
    vms = [vm("small", "a", 1), vm("big", "a", 16), vm("mid", "a", 4)]
    cluster = Cluster.build(hosts, vms)
    schedule = plan_job(cluster, evacuation(cluster, "a"), book=book())
    assert [r.move.name for r in schedule.records] == ["big", "mid", "small"]


def test_fifo_baseline_keeps_the_order_asked() -> None:
    hosts = [host("a", out=1), host("b"), host("c")]
    vms = [vm("small", "a", 1), vm("big", "a", 16), vm("mid", "a", 4)]
    cluster = Cluster.build(hosts, vms)
    schedule = plan_job(cluster, evacuation(cluster, "a"), book=book(), policy="fixed-1")
    assert [r.move.name for r in schedule.records] == ["small", "big", "mid"]


def busy_pair() -> tuple[Cluster, list[Move], CostBook]:
    """Two guests that each need more than half of a 10 GbE link to converge safely."""
    hosts = [host("a"), host("b"), host("c")]
    vms = [vm(f"db{i}", "a", 8, rate=500_000_000, dirty_gib=4.0) for i in (1, 2)]
    cluster = Cluster.build(hosts, vms)
    return cluster, evacuation(cluster, "a"), book()


def test_busy_guests_do_not_share_a_link_they_cannot_converge_on() -> None:
    cluster, moves, costs = busy_pair()
    needs = [costs.need(m.vm, SIM_CALIBRATION.qemu_throughput_bps, TEN_GBE / 16) for m in moves]
    assert all(n.strategy == "precopy" and n.need_bps > TEN_GBE / 2 for n in needs)
    assert not costs.cost(moves[0].vm, TEN_GBE / 2).safe
    first, second = plan_job(cluster, moves, book=costs).records
    assert second.start_s + costs.setup_s(second.move.vm) >= first.end_s - 1e-6
    assert first.felt_ms <= 300
    assert second.felt_ms <= 300
    # An even split of the link runs both at once, below what each needs.
    both = plan_job(cluster, moves, book=costs, policy="fixed-2").records
    assert both[0].start_s == both[1].start_s == 0.0


def _first_of_busy_pair() -> tuple[BandwidthDispatcher, VmName, float]:
    """The busy pair's dispatcher after it started the first move: that move's name and
    when the dispatcher asked to be woken to start the second (its pipelined start)."""
    cluster, moves, costs = busy_pair()
    dispatcher = make_dispatcher("ours", cluster, moves, costs)
    assert isinstance(dispatcher, BandwidthDispatcher)
    (first,) = [a for a in dispatcher.begin(0.0) if isinstance(a, Start)]
    assert dispatcher.wake_s is not None
    dispatcher.tick(dispatcher.wake_s)  # its setup ends: it sends
    assert dispatcher.wake_s is not None
    return dispatcher, first.move.name, dispatcher.wake_s


def test_a_move_running_late_keeps_its_link() -> None:
    """The second move is not started at the first's predicted end when the first's progress
    says it will end long after; it starts once that progress says the first ends by the time
    the second has set up."""
    dispatcher, first, wake_s = _first_of_busy_pair()
    dispatcher.progress(first, wake_s - 1.0, 60.0)
    assert dispatcher.tick(wake_s) == []
    assert dispatcher.waiting == 1
    assert dispatcher.wake_s is not None  # woken again for the first's new end
    assert dispatcher.wake_s > wake_s + 50.0
    dispatcher.progress(first, wake_s + 1.0, 0.2)  # it caught up: ends before b has set up
    # b is woken to have set up when the first ends
    woken_s = dispatcher.wake_s
    assert woken_s is not None
    assert wake_s + 1.0 <= woken_s <= wake_s + 1.2
    assert [type(a) for a in dispatcher.tick(woken_s)] == [Start]


def test_a_move_without_progress_hands_over_at_its_predicted_end() -> None:
    dispatcher, first, wake_s = _first_of_busy_pair()
    assert [type(a) for a in dispatcher.tick(wake_s)] == [Start]
    del first


def test_a_move_started_on_a_running_moves_share_waits_for_its_last_byte() -> None:
    """The second move is pipelined to send as the first ends; while the first still sends
    (its last pass), the second gets only what the first leaves of the link; the first's
    release gives it the rest."""
    dispatcher, first, wake_s = _first_of_busy_pair()
    (second,) = dispatcher.tick(wake_s)
    assert isinstance(second, Start)
    assert second.cap_bps is not None
    assert second.cap_bps <= TEN_GBE / 4  # the first takes 1 GB/s of the 1.25 GB/s
    late_s = wake_s + 30.0  # the first runs late: nothing hands its share over yet
    assert all(
        a.cap_bps <= second.cap_bps for a in dispatcher.tick(late_s) if isinstance(a, SetCap)
    )
    (opened,) = dispatcher.released(first, late_s + 1.0)
    assert isinstance(opened, SetCap)
    assert opened.vm == second.move.name
    assert opened.cap_bps > TEN_GBE / 2
    assert dispatcher.released(first, late_s + 1.5) == []  # once
    assert dispatcher.finished(first, late_s + 2.0) == []  # its links were handed over already


def test_a_released_move_keeps_its_hosts_slot_until_it_ends() -> None:
    hosts = [host("a", out=1), host("b"), host("c")]
    vms = [vm("big", "a", 16), vm("small", "a", 1)]
    cluster = Cluster.build(hosts, vms)
    dispatcher = make_dispatcher("ours", cluster, evacuation(cluster, "a"), book())
    (first,) = dispatcher.begin(0.0)
    assert isinstance(first, Start)
    assert first.move.name == "big"
    assert dispatcher.released(first.move.name, 5.0) == []
    assert [type(a) for a in dispatcher.finished(first.move.name, 6.0)] == [Start]


def test_a_move_that_stops_converging_keeps_its_link_until_it_ends() -> None:
    dispatcher, first, wake_s = _first_of_busy_pair()
    dispatcher.progress(first, 1.0, 5.0)
    dispatcher.progress(first, 2.0, None)  # no longer converging at its rate
    assert dispatcher.tick(wake_s) == []
    assert dispatcher.wake_s is None
    assert [type(a) for a in dispatcher.finished(first, wake_s + 30.0)] == [Start]


def _light_pair() -> BandwidthDispatcher:
    """Two light moves from one 100 MB/s link, each able to use 80 MB/s: ``a`` reserves 80,
    ``b`` the remaining 20; both sending."""
    hosts = [Host(HostName(f"h{i}"), 4 * GIB, 16, 100_000_000) for i in (1, 2, 3)]
    vms = [Vm(VmName(n), HostName("h1"), GIB, dirty_rate_bps=1_000_000) for n in "ab"]
    cluster = Cluster.build(hosts, vms)
    moves = [Move(vms[0], HostName("h2")), Move(vms[1], HostName("h3"))]
    costs = CostBook(Calibration(qemu_throughput_bps=80_000_000))
    dispatcher = make_dispatcher("ours", cluster, moves, costs)
    assert isinstance(dispatcher, BandwidthDispatcher)
    starts = dispatcher.begin(0.0)
    assert [(a.move.name, a.cap_bps) for a in starts if isinstance(a, Start)] == [
        ("a", 80_000_000),
        ("b", 20_000_000),
    ]
    while (wake_s := dispatcher.wake_s) is not None and wake_s < 1.0:
        dispatcher.tick(wake_s)  # their setups end
    return dispatcher


def test_what_a_held_move_leaves_unused_goes_to_the_others() -> None:
    """``a`` sends 30 MB/s under its 80 MB/s cap (its host's CPU holds it): after a few
    seconds of it, ``b``'s cap rises by what ``a`` leaves (its rate plus a margin kept);
    when ``a`` speeds up again, ``b`` falls back to its reservation."""
    dispatcher = _light_pair()
    actions = [dispatcher.progress(VmName("a"), float(t), 20.0, 30e6) for t in range(2, 6)]
    assert actions[:3] == [[], [], []]  # judged only after 3 s
    (raised,) = actions[3]
    assert isinstance(raised, SetCap)
    assert raised.vm == "b"
    assert raised.cap_bps == pytest.approx(100e6 - 30e6 * 1.15)
    back = [dispatcher.progress(VmName("a"), float(t), 5.0, 80e6) for t in range(6, 20)]
    assert [SetCap(VmName("b"), 20e6)] in back


def test_a_move_near_its_cap_is_not_held() -> None:
    dispatcher = _light_pair()
    actions = [dispatcher.progress(VmName("a"), float(t), 20.0, 70e6) for t in range(2, 12)]
    assert actions == [[]] * 10


def test_every_cap_at_least_the_safe_share() -> None:
    cluster, moves = small_cluster()
    costs = book()
    dispatcher = make_dispatcher("ours", cluster, moves, costs)
    assert isinstance(dispatcher, BandwidthDispatcher)
    needs = dispatcher.needs()
    schedule = plan_job(cluster, moves, book=costs)
    for record in schedule.records:
        need = needs[record.move.name]
        floor = need.need_bps if need.feasible else need.max_bps
        assert all(cap is not None and cap >= floor * (1 - 1e-9) for _, cap in record.caps)


def instants(schedule: Schedule, costs: CostBook) -> list[float]:
    times = {r.start_s for r in schedule.records}
    times |= {r.start_s + costs.setup_s(r.move.vm) for r in schedule.records}
    times |= {t for r in schedule.records for t, _ in r.caps}
    return sorted(times)


def test_caps_of_sending_moves_fit_each_link_at_every_instant() -> None:
    cluster, moves = small_cluster()
    costs = book()
    schedule = plan_job(cluster, moves, book=costs)
    for at in instants(schedule, costs):
        t = at + 1e-7
        used: dict[tuple[str, str], float] = {}
        for r in schedule.records:
            if r.start_s + costs.setup_s(r.move.vm) <= t < r.end_s:
                cap = r.cap_at(t)
                assert cap is not None
                for link in (("out", r.move.source), ("in", r.move.destination)):
                    used[link] = used.get(link, 0.0) + cap
        for (_, name), total in used.items():
            assert total <= cluster.host(name).link_bps * (1 + 1e-6), (at, name)


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_host_limits_hold_at_every_instant(policy: str) -> None:
    cluster, moves = small_cluster()
    schedule = plan_job(cluster, moves, book=book(), policy=policy)
    limits = BASELINES.get(policy)
    for at in sorted({r.start_s for r in schedule.records}):
        running = [r for r in schedule.records if r.start_s <= at < r.end_s]
        out = {h.name: 0 for h in cluster.hosts}
        inn = dict(out)
        for r in running:
            out[r.move.source] += 1
            inn[r.move.destination] += 1
        for h in cluster.hosts:
            max_out, max_in = h.max_outbound, h.max_inbound
            if limits is not None and limits.outbound is not None:
                max_out = min(max_out, limits.outbound)
            if limits is not None and limits.inbound is not None:
                max_in = min(max_in, limits.inbound)
            assert out[h.name] <= max_out, (policy, at, h.name)
            assert inn[h.name] <= max_in, (policy, at, h.name)
        if limits is not None and limits.cluster is not None:
            assert len(running) <= limits.cluster


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_every_move_runs_once_and_the_hosts_end_empty(policy: str) -> None:
    cluster, moves = small_cluster()
    schedule = plan_job(cluster, moves, book=book(), policy=policy)
    assert sorted(r.move.name for r in schedule.records) == sorted(m.name for m in moves)
    after = cluster.after([r.move for r in schedule.records])
    for name in ("host-2", "host-5", "host-9"):
        assert after.vms_on(name) == ()
    assert schedule.makespan_s == max(r.end_s for r in schedule.records)


def test_schedule_json() -> None:
    cluster, moves = small_cluster()
    data = plan_job(cluster, moves, book=book()).to_json()
    assert data["policy"] == "ours"
    assert len(data["moves"]) == len(moves)
    assert data["eta_s"] == data["makespan_s"] == max(m["end_s"] for m in data["moves"])
    assert all(m["cap_bps"][0][1] > 0 for m in data["moves"])


def test_ours_ends_no_later_than_one_at_a_time() -> None:
    cluster, moves = small_cluster()
    ours = plan_job(cluster, moves, book=book()).makespan_s
    assert ours < plan_job(cluster, moves, book=book(), policy="fixed-1").makespan_s


# -- the loop and the clock ---------------------------------------------------------------------


def test_the_loop_runs_on_the_clock_it_is_given() -> None:
    from vmferry.core.flows import FluidExecutor
    from vmferry.core.job import PredictedFlow, run_job

    cluster, moves = small_cluster()
    costs = book()
    clock = ManualClock(1000.0)
    executor = FluidExecutor(
        {h.name: float(h.link_bps) for h in cluster.hosts},
        lambda start, now_s: PredictedFlow(start, now_s, costs, 1e9),
    )
    schedule = run_job(make_dispatcher("ours", cluster, moves, costs), executor, clock)
    assert schedule.start_s == 1000.0
    assert min(r.start_s for r in schedule.records) == 1000.0
    assert clock.now_s() == pytest.approx(schedule.eta_s)
    assert schedule.eta_s == pytest.approx(1000.0 + plan_job(cluster, moves, book=costs).makespan_s)


def test_a_clock_never_goes_back() -> None:
    clock = ManualClock(5.0)
    with pytest.raises(FerryError):
        clock.advance_to(4.0)


# -- bad input ----------------------------------------------------------------------------------


def test_unknown_host_is_refused() -> None:
    cluster = Cluster.build([host("a"), host("b")], [vm("x", "a", 1)])
    with pytest.raises(UnknownHost, match="nowhere"):
        place_evacuation(cluster, ["nowhere"])
    with pytest.raises(UnknownHost):
        plan_job(cluster, [Move(cluster.vm("x"), HostName("nowhere"))], book=book())
    assert issubclass(UnknownHost, ConfigError)


def test_evacuating_the_only_host_is_refused() -> None:
    cluster = Cluster.build([host("a")], [vm("x", "a", 1)])
    with pytest.raises(PlacementError, match="only host"):
        place_evacuation(cluster, ["a"])


def test_a_deadline_that_cannot_be_met_names_the_predicted_makespan() -> None:
    cluster = Cluster.build([host("a"), host("b")], [vm(f"v{i}", "a", 16) for i in range(4)])
    moves = evacuation(cluster, "a")
    makespan_s = plan_job(cluster, moves, book=book()).makespan_s
    with pytest.raises(DeadlineUnreachable) as caught:
        plan_job(cluster, moves, book=book(), deadline_s=makespan_s / 2)
    assert caught.value.predicted_makespan_s == pytest.approx(makespan_s)
    assert f"{makespan_s:.0f} s" in str(caught.value)
    assert isinstance(caught.value, FerryError)
    assert plan_job(cluster, moves, book=book(), deadline_s=makespan_s + 1).missed == 0


@pytest.mark.parametrize(
    "moves",
    [
        lambda c: [Move(c.vm("x"), HostName("a"))],  # to its own host
        lambda c: [Move(c.vm("x"), HostName("b")), Move(c.vm("x"), HostName("b"))],
    ],
)
def test_bad_moves_are_refused(moves: object) -> None:
    cluster = Cluster.build([host("a"), host("b")], [vm("x", "a", 1)])
    assert callable(moves)
    with pytest.raises(ConfigError):
        plan_job(cluster, moves(cluster), book=book())


def test_unknown_policy() -> None:
    cluster = Cluster.build([host("a"), host("b")], [vm("x", "a", 1)])
    with pytest.raises(ConfigError, match="policy"):
        plan_job(cluster, evacuation(cluster, "a"), book=book(), policy="fixed-3")


# -- the cost book ------------------------------------------------------------------------------


def test_share_grid_rounds_down() -> None:
    for bps in (1e6, 3.3e6, 250e6, 1.25e9, 3.125e9):
        assert share_bps(share_index(bps)) <= bps * (1 + 1e-9)
        assert share_bps(share_index(bps) + 1) > bps


def test_safety_only_grows_with_bandwidth() -> None:
    costs = CostBook(Calibration())
    guest = vm("db", "a", 4, rate=60_000_000, dirty_gib=1.0)
    safe = [costs.cost(guest, share_bps(i)).safe for i in range(0, 60, 3)]
    assert safe == sorted(safe)  # False..., then True...
    need = costs.need(guest, 450_000_000)
    assert costs.cost(guest, need.need_bps).safe
    assert not costs.cost(guest, need.need_bps / 1.2).safe


def test_predictions_are_memoized_by_bucket() -> None:
    costs = book()
    guests = [vm(f"v{i}", "a", 8, rate=5_000_000 + i) for i in range(50)]
    for guest, share in itertools.product(guests, (250e6, 1e9)):
        costs.cost(guest, share)
    assert costs.predictions == 2


def test_a_guest_that_cannot_meet_its_goal_is_a_best_effort() -> None:
    costs = book()
    hopeless = Vm(
        VmName("h"), HostName("a"), 32 * GIB, dirty_rate_bps=1_900_000_000, max_downtime_ms=40
    )
    need = costs.need(hopeless, 1e9)
    assert not need.feasible
    assert need.risk == 1.0
    assert need.need_bps == need.max_bps


# -- the strategy choice: pre-copy, multifd (zstd), hybrid --------------------------------------


def zipped(name: str, ratio: float, *, goal_ms: int = 300, rate: int = 20_000_000) -> Vm:
    """An 8 GiB guest whose pages compress ``ratio`` times."""
    return replace(
        vm(name, "a", 8, rate=rate, dirty_gib=1.0), compress_ratio=ratio, max_downtime_ms=goal_ms
    )


def test_multifd_is_chosen_where_it_is_faster_and_safe() -> None:
    costs = book()
    share = 250e6
    assert costs.choose(zipped("z", 2.5), share).strategy == "multifd"
    assert costs.choose(zipped("z", 1.0), share).strategy == "precopy"  # nothing to gain
    assert costs.choose(zipped("z", 2.5), share, PLANNED_PLAIN).strategy == "precopy"
    fast = costs.cost(zipped("z", 2.5), share, "multifd")
    slow = costs.cost(zipped("z", 2.5), share, "precopy")
    assert fast.total_s < slow.total_s / 2
    assert fast.transferred_bytes < slow.transferred_bytes / 2  # compressed on the wire


def test_a_short_goal_is_left_to_precopy() -> None:
    # QEMU may pause it for its whole limit (84 ms for 150 ms): the flush would go over.
    assert book().choose(zipped("z", 3.0, goal_ms=150), 250e6).strategy == "precopy"


def test_the_compress_ratio_is_bucketed_down() -> None:
    costs = book()
    zstd = SIM_CALIBRATION.multifd_compress_bps
    # 2.1 rounds down to 2.0 (an eighth of an octave): zstd fills 0.7 GB/s of a link at most.
    assert costs.usable_bps(zipped("z", 2.1), "multifd", 1e9) == pytest.approx(zstd / 2.0)
    assert costs.usable_bps(zipped("z", 2.1), "precopy", 1e9) == 1e9
    assert costs.usable_bps(zipped("z", 1.05), "multifd", 1e9) == 1e9  # rounds down to 1
    before = costs.predictions
    for ratio in (1.0, 1.5, 2.0, 2.5, 3.0):  # pre-copy does not depend on the ratio
        costs.cost(zipped("z", ratio), 400e6, "precopy")
    assert costs.predictions == before + 1


def test_a_compressed_move_needs_less_of_its_link() -> None:
    costs = book()
    busy = zipped("db", 2.5, rate=300_000_000)
    need = costs.need(busy, 1e9, TEN_GBE / 16)
    plain = costs.need(busy, 1e9, TEN_GBE / 16, PLANNED_PLAIN)
    assert (need.strategy, plain.strategy) == ("multifd", "precopy")
    assert need.need_bps < plain.need_bps
    assert need.max_bps <= costs.usable_bps(busy, "multifd", 1e9)
    assert costs.cost(busy, need.need_bps, "multifd").safe


def test_a_fixed_policy_with_choice_runs_the_books_strategy() -> None:
    hosts = [host("a"), host("b"), host("c")]
    cluster = Cluster.build(hosts, [zipped(f"z{i}", 2.5) for i in range(4)])
    moves = evacuation(cluster, "a")
    plain = plan_job(cluster, moves, book=book(), policy="fixed-4")
    chosen = plan_job(cluster, moves, book=book(), policy="fixed-4+choice")
    ours = plan_job(cluster, moves, book=book())
    assert {r.ran_as for r in plain.records} == {"precopy"}
    assert {r.ran_as for r in chosen.records} == {"multifd"}
    assert {r.ran_as for r in ours.records} == {"multifd"}
    assert chosen.makespan_s < plain.makespan_s * 0.7
