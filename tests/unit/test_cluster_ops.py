"""Cluster operations' pure parts: where a new VM goes, VMs brought back to a host, the job's
ETA while it runs, and the controller's state store (maintenance marks, groups, job records
and the one-job-per-host rule)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import cast

import pytest

from vmferry.agent.api import HostInfo, Profile
from vmferry.agent.port import AgentPort
from vmferry.controller.cluster import Cluster as Controller
from vmferry.controller.evacuation import JobRequest, plan_evacuation, probe_paths
from vmferry.controller.inventory import HostEntry, Inventory
from vmferry.controller.jobs import HostMark, JobConflict, JobStore
from vmferry.controller.placing import LiveCluster
from vmferry.core.cluster_model import Cluster, Host, HostName, Vm, VmName
from vmferry.core.errors import ConfigError
from vmferry.core.job_progress import job_remaining_s
from vmferry.core.placement import place_new, place_onto

MIB = 1 << 20


def host(name: str, mib: int = 1024, vcpus: int = 8) -> Host:
    return Host(HostName(name), mib * MIB, vcpus, 100_000_000)


def vm(name: str, on: str, mib: int, *, vcpus: int = 1, group: str | None = None) -> Vm:
    return Vm(VmName(name), HostName(on), mib * MIB, vcpus=vcpus, group=group)


def cluster() -> Cluster:
    return Cluster.build(
        [host("h1"), host("h2"), host("h3", vcpus=2)],
        [vm("a", "h1", 512, group="web"), vm("b", "h2", 256), vm("c", "h3", 128, vcpus=2)],
    )


@pytest.mark.parametrize(
    ("new", "hosts", "expected"),
    [
        (vm("n", "h1", 256), ["h1", "h2", "h3"], "h2"),  # h3: most free memory, no vCPU
        (vm("n", "h1", 256), ["h1"], "h1"),  # the others left out (maintenance)
        (vm("n", "h1", 256, group="web"), ["h1"], None),  # anti-affinity
        (vm("n", "h1", 900), ["h1", "h2", "h3"], None),  # no room anywhere
    ],
)
def test_a_new_vm_goes_to_the_most_free_host_it_fits(
    new: Vm, hosts: list[str], expected: str | None
) -> None:
    placed = place_new(cluster(), new, hosts)
    assert placed.host == expected
    assert {v.host for v in placed.verdicts} == set(hosts)


def test_no_room_names_the_biggest_free_host() -> None:
    placed = place_new(cluster(), vm("n", "h1", 900), ["h1", "h2", "h3"])
    assert placed.host is None
    assert "most free is h3 with 896 MiB" in placed.reason
    assert placed.verdicts[0].why_not == "h3 has not enough free memory"


def test_the_reason_of_a_choice_says_how_much_was_free() -> None:
    placed = place_new(cluster(), vm("n", "h1", 128), ["h1", "h2"])
    assert placed.host == "h2"
    assert placed.reason == "the most free memory (768 MiB, 7 vCPUs) of the 2 host(s) it fits"
    refused = place_new(cluster(), vm("n", "h1", 128, group="web"), ["h1"])
    assert refused.verdicts[0].why_not == "h1 already runs a VM of the same group"


def test_vms_brought_back_fit_the_host_together_largest_first() -> None:
    now = Cluster.build(
        [host("h1", 600), host("h2")],
        [vm("x", "h2", 400), vm("y", "h2", 300), vm("z", "h1", 100)],
    )
    placement = place_onto(now, [now.vm("x"), now.vm("y"), now.vm("z")], "h1")
    assert [(m.name, m.destination) for m in placement.moves] == [("x", "h1")]
    assert placement.refused == ((VmName("y"), "h1 has not enough free memory"),)


def test_job_eta_follows_the_plan_then_what_happened() -> None:
    planned = {"a": (0.0, 10.0), "b": (0.0, 6.0), "c": (6.0, 12.0)}
    assert job_remaining_s(planned, 0.0, ended={}, running={}) == 12.0
    # b runs 2 s late: c, which takes over its link, is expected 2 s late too
    left = job_remaining_s(planned, 7.0, ended={"b": 8.0}, running={"a": (0.0, None)})
    assert left == pytest.approx(14.0 - 7.0)
    # a's own ETA wins over its plan
    left = job_remaining_s(
        planned, 9.0, ended={"b": 6.0}, running={"a": (0.0, 5.0), "c": (6.0, None)}
    )
    assert left == pytest.approx(5.0)
    assert job_remaining_s(planned, 20.0, ended=dict.fromkeys(planned, 15.0), running={}) == 0.0


def test_marks_and_groups_survive_a_new_store(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "history.db")
    first = store.set_mark("host-1", "entering")
    store.set_mark("host-1", "maintenance", 4)
    store.set_group("vm1", "web")
    store.set_group("vm2", "web")
    store.set_group("vm2", None)
    again = JobStore(tmp_path / "history.db")
    mark = again.marks()["host-1"]
    assert (mark.state, mark.job, mark.since) == ("maintenance", 4, first.since)
    assert again.groups() == {"vm1": "web"}
    assert again.clear_mark("host-1") == mark
    assert again.marks() == {}
    assert again.clear_mark("host-1") is None


def test_one_job_per_host_and_its_record(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "history.db")
    job = store.begin("evacuate", "host-1", [("a", "host-1", "host-2")], {"moves": 1})
    with pytest.raises(JobConflict, match=r"job 1 \(evacuate\) is running on host-2"):
        store.begin("evacuate", "host-3", [("b", "host-3", "host-2")], {})
    assert isinstance(JobConflict(1, "x", ["h"]), ConfigError)  # exits 2: nothing moved
    other = store.begin("evacuate", "host-3", [("b", "host-3", "host-4")], {})
    store.move_state(job, "a", "running")
    store.move_state(job, "a", "completed", {"status": "completed"})
    store.end(job, "completed", {"makespan_s": 1.0})
    record = store.job(job)
    assert (record.state, record.hosts, record.report) == (
        "completed",
        ("host-1", "host-2"),
        {"makespan_s": 1.0},
    )
    assert [(m.vm, m.state, m.report) for m in record.moves] == [
        ("a", "completed", {"status": "completed"})
    ]
    assert [j.id for j in store.jobs(host="host-3")] == [other]
    with pytest.raises(ConfigError, match="no job 9"):
        store.job(9)


def test_a_job_whose_controller_died_no_longer_holds_its_hosts(tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    store = JobStore(tmp_path / "history.db")
    job = store.begin("evacuate", "host-1", [("a", "host-1", "host-2")], {}, pid=int(dead.stdout))
    again = store.begin("evacuate", "host-1", [("a", "host-1", "host-2")], {})
    assert store.job(job).state == "interrupted"
    assert store.job(again).state == "running"


def _live(hosts: list[str], marks: dict[str, str]) -> LiveCluster:
    infos = {
        h: HostInfo(h, 1 << 30, 0, 0, "10.0", ("pc",), ("qemu64",), "tcg", "127.0.0.1")
        for h in hosts
    }
    model = Cluster.build([host(h) for h in hosts], [vm("a", hosts[0], 128)])
    return LiveCluster(
        model,
        infos,
        {},
        {h: HostMark(h, "maintenance", "now", None) for h in marks},
        {},
        (),
    )


@pytest.mark.parametrize(
    ("hosts", "marks", "to", "message"),
    [
        (["h1"], {}, None, "cannot empty h1: it is the only host"),
        (["h1", "h2"], {"h2": ""}, None, r"no other host takes VMs \(h2 in maintenance\)"),
        (["h1", "h2"], {"h2": ""}, ("h2",), "--to h2: it is in maintenance"),
        (["h1", "h2"], {}, ("h1",), "--to h1: the host being emptied"),
        (["h1", "h2"], {}, ("h7",), "unknown host 'h7'"),
    ],
)
def test_evacuation_refusals_come_before_anything_is_measured(
    hosts: list[str], marks: dict[str, str], to: tuple[str, ...] | None, message: str
) -> None:
    live = _live(hosts, marks)
    nowhere = Controller(Inventory(Path("/nonexistent"), "token", ()))  # never asked
    with pytest.raises(ConfigError, match=message):
        asyncio.run(plan_evacuation(nowhere, live, JobRequest("h1", to=to), None))


class _PathAgent:
    """An agent that knows no path yet and probes (each probe takes 10 ms)."""

    def __init__(self, name: str, log: list[tuple[str, str]], busy: list[int]) -> None:
        self.name, self.log, self.busy = name, log, busy

    async def profile(self, name: str, address: str | None = None) -> Profile:
        return Profile(None, None, None)

    async def open_sink(self) -> int:
        return 1

    async def sink_result(self, port: int, wait_s: float = 10.0) -> float:
        return 18e6

    async def probe(self, address: str, port: int, duration_ms: int = 1000) -> float:
        self.busy[0] += 1
        self.busy[1] = max(self.busy[1], self.busy[0])
        await asyncio.sleep(0.01)
        self.busy[0] -= 1
        self.log.append((self.name, address))
        return 18e6

    async def record_bandwidth(self, address: str, bandwidth_bps: float) -> None:
        pass


def test_each_path_is_probed_once_and_one_at_a_time(tmp_path: Path) -> None:
    log: list[tuple[str, str]] = []
    busy = [0, 0]  # probes running now, most at once
    hosts = tuple(HostEntry(f"h{i}", "http://x", None, "/tmp", f"10.0.0.{i}") for i in (1, 2, 3))
    agents = {h.name: cast(AgentPort, _PathAgent(h.name, log, busy)) for h in hosts}
    moves = [("h1", "h2", "a"), ("h1", "h3", "b"), ("h1", "h2", "c"), ("h1", "h3", "d")]

    async def run() -> None:
        async with Controller(Inventory(tmp_path, "token", hosts), agents) as controller:
            await probe_paths(controller, moves)

    asyncio.run(run())
    assert log == [("h1", "10.0.0.2"), ("h1", "10.0.0.3")]
    assert busy[1] == 1
