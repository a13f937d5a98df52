"""Placement: evacuation destinations with room and anti-affinity, and balance plans."""

from __future__ import annotations

import pytest

from vmferry.core.cluster_model import Cluster, Host, HostName, Move, PlacementError, Vm, VmName
from vmferry.core.errors import ConfigError
from vmferry.core.placement import (
    Room,
    host_load,
    place_by_rate,
    place_evacuation,
    plan_balance,
)
from vmferry.core.simulate import model_cluster

GIB = 1 << 30


def host(name: str, gib: int = 64, vcpus: int = 32) -> Host:
    return Host(HostName(name), gib * GIB, vcpus, 1_250_000_000)


def vm(name: str, on: str, gib: int, *, vcpus: int = 1, group: str | None = None) -> Vm:
    return Vm(VmName(name), HostName(on), gib * GIB, vcpus=vcpus, group=group)


def assert_fits(cluster: Cluster) -> None:
    for h in cluster.hosts:
        on = cluster.vms_on(h.name)
        assert sum(v.memory_bytes for v in on) <= h.memory_bytes, h.name
        assert sum(v.vcpus for v in on) <= h.vcpus, h.name
        groups = [v.group for v in on if v.group is not None]
        assert len(groups) == len(set(groups)), h.name


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_evacuation_places_every_vm_where_there_is_room(seed: int) -> None:
    cluster = model_cluster(30, 500, seed=seed).cluster
    sources = ["host-1", "host-7", "host-30"]
    placement = place_evacuation(cluster, sources)
    after = cluster.after(placement.require_all())
    assert_fits(after)
    for source in sources:
        assert after.vms_on(source) == ()
    assert {m.destination for m in placement.moves}.isdisjoint(sources)


def test_moves_keep_the_order_asked() -> None:
    cluster = Cluster.build(
        [host("a"), host("b")], [vm("z", "a", 1), vm("big", "a", 8), vm("m", "a", 2)]
    )
    assert [m.name for m in place_evacuation(cluster, ["a"]).moves] == ["z", "big", "m"]


def test_no_room_is_named_up_front() -> None:
    cluster = Cluster.build(
        [host("a"), host("b", gib=16), host("c", gib=16)],
        [vm("huge", "a", 32), vm("ok", "a", 8), vm("cpu", "a", 1, vcpus=64)],
    )
    placement = place_evacuation(cluster, ["a"])
    assert [m.name for m in placement.moves] == ["ok"]
    reasons = dict(placement.refused)
    assert "memory" in reasons[VmName("huge")]
    assert "vCPU" in reasons[VmName("cpu")]
    with pytest.raises(PlacementError, match="huge") as caught:
        placement.require_all()
    assert set(caught.value.reasons) == {"huge", "cpu"}


def test_anti_affinity_groups_are_kept_apart() -> None:
    cluster = Cluster.build(
        [host("a"), host("b"), host("c")],
        [
            vm("db1", "a", 4, group="db"),
            vm("db2", "a", 4, group="db"),
            vm("db3", "b", 4, group="db"),
        ],
    )
    placement = place_evacuation(cluster, ["a"])
    assert len(placement.moves) == 1
    assert placement.moves[0].destination == "c"
    assert "group 'db'" in dict(placement.refused)[placement.refused[0][0]]


def test_evacuate_to_named_hosts_only() -> None:
    cluster = Cluster.build([host("a"), host("b"), host("c")], [vm("x", "a", 1), vm("y", "a", 1)])
    placement = place_evacuation(cluster, ["a"], to=["c"])
    assert {m.destination for m in placement.moves} == {"c"}
    with pytest.raises(ConfigError, match="both"):
        place_evacuation(cluster, ["a"], to=["a"])
    with pytest.raises(ConfigError):
        place_evacuation(cluster, [])


def _lab(memory_gib: int = 8) -> Cluster:
    """The evacuation lab's shape: a 50 MB/s source, one 48 MB/s and two 18 MB/s
    destinations; six VMs of 256-768 MiB."""
    mib = 1 << 20
    hosts = [
        Host(HostName("h1"), 8 * GIB, 32, 50_000_000),
        Host(HostName("h2"), memory_gib * GIB, 32, 48_000_000),
        Host(HostName("h3"), 8 * GIB, 32, 18_000_000),
        Host(HostName("h4"), 8 * GIB, 32, 18_000_000),
    ]
    sizes = {"a": 768, "b": 512, "c": 512, "d": 256, "e": 256, "f": 768}
    vms = [Vm(VmName(n), HostName("h1"), m * mib) for n, m in sizes.items()]
    return Cluster.build(hosts, vms)


def _queue_s(cluster: Cluster, moves: tuple[Move, ...]) -> float:
    """The longest destination queue: its moves' memory over its link's rate."""
    into: dict[str, float] = {}
    for m in moves:
        into[m.destination] = into.get(m.destination, 0.0) + m.vm.memory_bytes
    return max(data / cluster.host(h).link_bps for h, data in into.items())


def test_place_by_rate_sends_more_to_the_faster_link() -> None:
    cluster = _lab()
    most_free = place_evacuation(cluster, ["h1"])
    targets = [HostName("h2"), HostName("h3"), HostName("h4")]
    by_rate = place_by_rate(cluster, most_free, targets, lambda v: float(v.memory_bytes))
    assert [m.name for m in by_rate.moves] == [m.name for m in most_free.moves]  # order kept
    on_fast = [m.name for m in by_rate.moves if m.destination == "h2"]
    assert len(on_fast) >= 3, by_rate.moves
    assert _queue_s(cluster, by_rate.moves) < 0.8 * _queue_s(cluster, most_free.moves)
    assert_fits(cluster.after(by_rate.moves))


def test_place_by_rate_keeps_room_and_refusals() -> None:
    cluster = _lab(memory_gib=1)  # the fast host has room for one 768 MiB VM only
    most_free = place_evacuation(cluster, ["h1"])
    targets = [HostName("h2"), HostName("h3"), HostName("h4")]
    by_rate = place_by_rate(cluster, most_free, targets, lambda v: float(v.memory_bytes))
    assert_fits(cluster.after(by_rate.moves))
    assert by_rate.refused == most_free.refused
    assert sum(1 for m in by_rate.moves if m.destination == "h2") >= 1


def test_place_by_rate_gives_up_to_the_most_free_packing_when_it_cannot_pack() -> None:
    mib = 1 << 20
    hosts = [
        Host(HostName("s"), 8 * GIB, 32, 50_000_000),
        Host(HostName("fast"), 1024 * mib, 32, 100_000_000),
        Host(HostName("slow"), 550 * mib, 32, 10_000_000),
    ]
    vms = [Vm(VmName("x"), HostName("s"), 600 * mib), Vm(VmName("y"), HostName("s"), 500 * mib)]
    cluster = Cluster.build(hosts, vms)
    most_free = place_evacuation(cluster, ["s"])
    # By bytes sent, y is the larger: it takes the fast host, and x then has no room anywhere.
    sent = {"x": 1.0, "y": 2.0}
    by_rate = place_by_rate(
        cluster, most_free, [HostName("fast"), HostName("slow")], lambda v: sent[v.name]
    )
    assert by_rate == most_free


def spread(cluster: Cluster) -> float:
    room = Room(cluster, [h.name for h in cluster.hosts])
    loads = [host_load(h, room) for h in cluster.hosts]
    return max(loads) - min(loads)


def test_balance_narrows_the_spread_without_overfilling() -> None:
    cluster = Cluster.build(
        [host("a"), host("b"), host("c")],
        [vm(f"v{i}", "a", 4) for i in range(12)] + [vm("w", "b", 4)],
    )
    placement = plan_balance(cluster, max_moves=20, cost_s=lambda v, h: 1.0, spread=0.1)
    after = cluster.after(placement.moves)
    assert_fits(after)
    assert spread(after) <= 0.1 < spread(cluster)
    names = [m.name for m in placement.moves]
    assert len(names) == len(set(names))  # none moved twice


def test_balance_respects_max_moves_and_cooldown() -> None:
    cluster = Cluster.build([host("a"), host("b")], [vm(f"v{i}", "a", 4) for i in range(8)])
    cooled = [f"v{i}" for i in range(6)]
    placement = plan_balance(cluster, max_moves=5, cost_s=lambda v, h: 1.0, cooldown=cooled)
    assert {m.name for m in placement.moves} <= {"v6", "v7"}
    assert len(plan_balance(cluster, max_moves=1, cost_s=lambda v, h: 1.0).moves) == 1


def test_balance_prefers_the_cheaper_move() -> None:
    cluster = Cluster.build([host("a"), host("b")], [vm("busy", "a", 8), vm("idle", "a", 8)])

    def cost_s(v: Vm, h: Host) -> float:
        return 100.0 if v.name == "busy" else 1.0

    placement = plan_balance(cluster, max_moves=1, cost_s=cost_s)
    assert placement.moves == (Move(cluster.vm("idle"), HostName("b")),)


def test_balanced_cluster_needs_no_moves() -> None:
    cluster = Cluster.build([host("a"), host("b")], [vm("x", "a", 4), vm("y", "b", 4)])
    assert plan_balance(cluster, max_moves=10, cost_s=lambda v, h: 1.0).moves == ()
