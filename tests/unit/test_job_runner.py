"""The runner of a job of real moves, against a stand-in for ``migrate`` on a fast clock: the
dispatcher's starts are carried out concurrently, each move is recorded as it starts and ends,
a move refused before it started does not stop the others."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pytest
from rich.console import Console

from vmferry.agent.port import AgentPort
from vmferry.cli.job_view import JobView, result_table
from vmferry.controller.cluster import Cluster as Controller
from vmferry.controller.evacuation import JobPlan, JobRequest
from vmferry.controller.history import History
from vmferry.controller.inventory import HostEntry, Inventory
from vmferry.controller.job_runner import JobResult, MoveResult, move_goal_ms, run_plan
from vmferry.controller.jobs import JobStore
from vmferry.controller.migrate import MigrationRequest
from vmferry.core.cluster_model import Cluster, Host, HostName, Move, Vm, VmName
from vmferry.core.errors import ConfigError, StateError
from vmferry.core.job import plan_job
from vmferry.core.model import IntegrityReport, MigrationReport, MigrationStats
from vmferry.core.move_cost import Calibration, CostBook
from vmferry.core.phases import Phase
from vmferry.core.status import MigrationStatus

MIB = 1 << 20


def _plan(policy: str = "ours", stream_bps: int = 25_000_000) -> JobPlan:
    hosts = [Host(HostName(f"h{i}"), 4096 * MIB, 16, 50_000_000) for i in (1, 2, 3)]
    vms = [Vm(VmName(n), HostName("h1"), 128 * MIB, dirty_rate_bps=1_000_000) for n in "abc"]
    model = Cluster.build(hosts, vms)
    moves = tuple(Move(vm, HostName("h2" if vm.name != "b" else "h3")) for vm in vms)
    book = CostBook(Calibration(qemu_throughput_bps=stream_bps))
    schedule = plan_job(model, moves, book=book, policy=policy)
    request = JobRequest("h1", policy=policy)
    return JobPlan("evacuate", "h1", request, model, moves, (), schedule, book, {})


class _Moves:
    """``migrate`` as the runner calls it: each move takes 20 ms; VM ``c`` is refused."""

    def __init__(self) -> None:
        self.requests: list[MigrationRequest] = []
        self.at_once = 0
        self.most_at_once = 0

    async def __call__(
        self,
        cluster: Controller,
        request: MigrationRequest,
        *,
        history: History | None = None,
        on_progress: Callable[[Phase, MigrationStats | None], None] | None = None,
    ) -> MigrationReport:
        self.requests.append(request)
        if request.vm == "c":
            raise ConfigError("h2 has 0 MiB free")
        self.at_once += 1
        self.most_at_once = max(self.most_at_once, self.at_once)
        if on_progress is not None:
            on_progress(Phase.ACTIVE, None)
        await asyncio.sleep(0.02)
        self.at_once -= 1
        return MigrationReport(
            request.vm, "h1", request.destination, request.destination, "precopy", "completed",
            None, 20, 5, 30, 1000, 2, None, IntegrityReport(True, 10, 0), True,
        )  # fmt: skip


class _Seen:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def started(self, move: Move, cap_bps: float | None, at_s: float) -> None:
        self.events.append(("started", move.name))

    def progress(self, vm: str, phase: Phase, stats: MigrationStats | None) -> None:
        self.events.append(("progress", vm))

    def ended(self, result: MoveResult) -> None:
        self.events.append(("ended", result.move.name))


def test_a_job_runs_every_move_and_records_each(tmp_path: Path) -> None:
    plan = _plan()
    store = JobStore(tmp_path / "history.db")
    job = store.begin("evacuate", "h1", [(m.name, m.source, m.destination) for m in plan.moves], {})
    moves, seen = _Moves(), _Seen()
    controller = Controller(Inventory(tmp_path, "token", ()))
    result = asyncio.run(
        run_plan(controller, plan, store, job, history=None, observer=seen, mover=moves)
    )
    assert sorted(r.vm for r in moves.requests) == ["a", "b", "c"]
    assert all(r.bandwidth_mbps is not None and r.bandwidth_mbps <= 200 for r in moves.requests)
    assert moves.most_at_once >= 2  # concurrent, as the dispatcher started them
    by_vm: dict[str, MoveResult] = {m.move.name: m for m in result.moves}
    assert by_vm["a"].ok
    assert by_vm["b"].ok
    assert not by_vm["c"].ok
    assert by_vm["c"].error == "h2 has 0 MiB free"
    assert not result.ok
    assert {e for e in seen.events if e[0] != "progress"} == {
        (kind, vm) for kind in ("started", "ended") for vm in "abc"
    }
    record = store.job(job)
    assert {m.vm: m.state for m in record.moves} == {
        "a": "completed",
        "b": "completed",
        "c": "failed",
    }
    report = result.to_json()
    assert report["state"] == "failed"
    assert report["predicted_makespan_s"] > 0
    assert [m["vm"] for m in report["moves"]] == [m.move.name for m in result.moves]


def test_a_fixed_policy_runs_the_same_moves_one_at_a_time_uncapped(tmp_path: Path) -> None:
    plan = _plan("fixed-1")
    store = JobStore(tmp_path / "history.db")
    job = store.begin("evacuate", "h1", [(m.name, m.source, m.destination) for m in plan.moves], {})
    moves = _Moves()
    controller = Controller(Inventory(tmp_path, "token", ()))
    result = asyncio.run(run_plan(controller, plan, store, job, history=None, mover=moves))
    assert sorted(r.vm for r in moves.requests) == ["a", "b", "c"]
    assert moves.most_at_once == 1
    assert all(r.bandwidth_mbps is None for r in moves.requests)
    assert sum(m.ok for m in result.moves) == 2


def test_an_unknown_policy_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown policy"):
        JobRequest("h1", policy="fixed-3").check()


def test_a_move_planned_as_multifd_runs_as_multifd(tmp_path: Path) -> None:
    hosts = [Host(HostName(f"h{i}"), 4096 * MIB, 16, 50_000_000) for i in (1, 2)]
    vms = [
        Vm(VmName("a"), HostName("h1"), 128 * MIB, dirty_rate_bps=1_000_000, compress_ratio=2.5),
        Vm(VmName("b"), HostName("h1"), 128 * MIB, dirty_rate_bps=1_000_000),
    ]
    model = Cluster.build(hosts, vms)
    moves = tuple(Move(vm, HostName("h2")) for vm in vms)
    book = CostBook(Calibration(qemu_throughput_bps=25_000_000))
    schedule = plan_job(model, moves, book=book)
    plan = JobPlan("evacuate", "h1", JobRequest("h1"), model, moves, (), schedule, book, {})
    store = JobStore(tmp_path / "history.db")
    job = store.begin("evacuate", "h1", [(m.name, m.source, m.destination) for m in moves], {})
    mover = _Moves()
    controller = Controller(Inventory(tmp_path, "token", ()))
    asyncio.run(run_plan(controller, plan, store, job, history=None, mover=mover))
    # The compressible guest is planned as multifd and runs so; the other one as "auto".
    assert {r.vm: r.strategy for r in mover.requests} == {"a": "multifd", "b": "auto"}
    # ... and the job's plan says so (the scheduler's strategy, not one move's own plan).
    assert {m["vm"]: m["strategy"] for m in plan.to_json()["moves"]} == {
        "a": "multifd",
        "b": "precopy",
    }


def test_the_job_view_prints_whole_lines_in_a_pipe(tmp_path: Path) -> None:
    plan = _plan()
    store = JobStore(tmp_path / "history.db")
    job = store.begin("evacuate", "h1", [(m.name, m.source, m.destination) for m in plan.moves], {})
    text = io.StringIO()
    console = Console(file=text, width=200)
    with JobView(console, plan) as view:
        result = asyncio.run(
            run_plan(
                Controller(Inventory(tmp_path, "token", ())), plan, store, job,
                history=None, observer=view, mover=_Moves(),
            )
        )  # fmt: skip
    lines = text.getvalue().splitlines()
    assert sum("started, 200 Mbit/s" in line for line in lines) == 3
    assert any(line.startswith("a → h2: completed in ") for line in lines)
    assert any(line.startswith("c → h2: refused: h2 has 0 MiB free") for line in lines)
    assert lines[-1].startswith("job 3/3 done, 0 moving")
    assert lines[-1].endswith("ETA 0.0 s")
    assert result_table(result).row_count == 3


class _CapAgent:
    """The source agent as the runner uses it to re-cap a move in flight."""

    def __init__(self, refuse: bool = False) -> None:
        self.caps: list[tuple[str, int]] = []
        self.refuse = refuse

    async def set_migration_cap(self, name: str, bandwidth_bps: int) -> None:
        if self.refuse:
            raise StateError(f"migration of {name}", "completed", "sending")
        self.caps.append((name, bandwidth_bps))


class _Sending(_Moves):
    """Moves that report a progress sample (they send), then take 100 ms (``b`` 500 ms)."""

    async def __call__(
        self,
        cluster: Controller,
        request: MigrationRequest,
        *,
        history: History | None = None,
        on_progress: Callable[[Phase, MigrationStats | None], None] | None = None,
    ) -> MigrationReport:
        if on_progress is not None and request.vm != "c":
            on_progress(Phase.ACTIVE, _SAMPLE)
        await asyncio.sleep(0.5 if request.vm == "b" else 0.1)
        return await super().__call__(cluster, request, history=history)


_SAMPLE = MigrationStats(MigrationStatus.ACTIVE, 100, 10 * MIB, 100 * MIB, 128 * MIB, 0, 4096,
                         1, 20_000_000, None, None)  # fmt: skip


def _run_with_agent(tmp_path: Path, agent: _CapAgent) -> tuple[JobPlan, JobResult]:
    plan = _plan(stream_bps=40_000_000)  # a takes 40 of h1's 50 MB/s, b the rest
    store = JobStore(tmp_path / "history.db")
    job = store.begin("evacuate", "h1", [(m.name, m.source, m.destination) for m in plan.moves], {})
    hosts = tuple(HostEntry(f"h{i}", "http://x", None, "/tmp", "127.0.0.1") for i in (1, 2, 3))
    agents = {f"h{i}": cast(AgentPort, agent) for i in (1, 2, 3)}

    async def run() -> JobResult:
        async with Controller(Inventory(tmp_path, "token", hosts), agents) as controller:
            return await run_plan(controller, plan, store, job, history=None, mover=_Sending())

    return plan, asyncio.run(run())


def test_cap_changes_reach_the_moves_in_flight(tmp_path: Path) -> None:
    """When ``a`` ends, the dispatcher raises ``b``'s cap, and the runner has b's source agent
    apply it (in bytes/s, from whole Mbit/s)."""
    agent = _CapAgent()
    _, result = _run_with_agent(tmp_path, agent)
    changed = {
        m.move.name: m.caps[-1][1] for m in result.moves if len(m.caps) > 1 and m.caps[-1][1]
    }
    assert "b" in changed  # the dispatcher did re-cap a move in flight
    applied = dict(agent.caps)
    for vm, cap_bps in changed.items():
        assert applied[vm] == int(cap_bps * 8 / 1e6) * 1_000_000 // 8


def test_a_refused_cap_change_does_not_stop_the_job(tmp_path: Path) -> None:
    _, result = _run_with_agent(tmp_path, _CapAgent(refuse=True))
    assert sum(m.ok for m in result.moves) == 2


def test_a_jobs_moves_ask_for_half_a_long_goal_and_most_of_a_short_one() -> None:
    assert move_goal_ms(300, 1) == 300  # alone: the whole goal
    assert move_goal_ms(300, 6) == 150
    assert move_goal_ms(2000, 2) == 1000
    assert move_goal_ms(150, 6) == 100  # not under the floor
    assert move_goal_ms(100, 6) == 80  # short goals keep 0.8 of theirs
    assert move_goal_ms(50, 6) == 40
    assert move_goal_ms(1, 6) == 1
