"""Two ``vmferry serve`` on one PostgreSQL (a real server from Debian's ``postgresql`` package,
started in a temporary directory): one leads through the lease, the other follows; the leader
is killed (SIGKILL) mid-evacuation and the follower takes the lease over and finishes the job
from its record, every VM running once, verified. Then the new leader is stopped (SIGTERM)
mid-evacuation: it winds its move down and hands the job over, and the restarted first service
finishes it. The failover times are printed and written to
``bench/results/serve_failover.json``.

Before it, without QEMU: the store, the lease and its fence on that server (a follower writes
nothing; a lease is taken only once expired; the old holder's writes are refused after).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from labcli import Lab

from vmferry.controller.inventory import Inventory
from vmferry.qemu.process import is_qemu_pid
from vmferry.service.api import JobState
from vmferry.service.auth import Principal, Role
from vmferry.service.lease import Lease, LeaseTiming
from vmferry.service.pg import NotLeader, PgDatabase
from vmferry.service.store import SqlStore

SMALL = "dirty:rate=2M,size=32M,pattern=random,mode=paced"
GUESTS = ("f1", "f2")
LEASE_S = 3.0
RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results" / "serve_failover.json"


def _bindir() -> Path:
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parts[-3])
    )
    assert found, "PostgreSQL is missing: `make setup` installs Debian's postgresql package"
    return found[-1].parent


@pytest.fixture
def postgres() -> Iterator[str]:
    """A PostgreSQL server of its own (initdb in a temporary directory, a unix socket there,
    no TCP), run as the ``postgres`` user when we are root (it refuses root); its URL."""
    base = Path(tempfile.mkdtemp(prefix="vmf-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
        as_user = ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--"]
    bindir, data = _bindir(), base / "data"
    subprocess.run(
        [*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "vmferry", "-A", "trust",
         "-E", "UTF8", "--no-sync"],
        check=True, capture_output=True,
    )  # fmt: skip
    server = subprocess.Popen(
        [*as_user, str(bindir / "postgres"), "-D", str(data), "-k", str(base), "-p", "5432",
         "-c", "listen_addresses=", "-c", "fsync=off", "-c", "full_page_writes=off"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        url = f"postgresql://vmferry@/postgres?host={base}&port=5432"
        deadline = time.monotonic() + 30
        while not (base / ".s.PGSQL.5432").exists():
            assert server.poll() is None, "postgres exited"
            assert time.monotonic() < deadline, "postgres did not come up"
            time.sleep(0.05)
        _until(lambda: _answers(url), 30, "postgres does not answer")
        yield url
    finally:
        server.send_signal(signal.SIGINT)  # fast shutdown
        try:
            server.wait(30)
        finally:
            server.kill()
            server.wait()
            shutil.rmtree(base, ignore_errors=True)


def _answers(url: str) -> bool:
    import psycopg

    try:
        psycopg.connect(url, connect_timeout=2).close()
    except psycopg.OperationalError:
        return False
    return True


def _until(ok: Callable[[], Any], timeout_s: float, what: str, every_s: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (found := ok()):
        assert time.monotonic() < deadline, what
        time.sleep(every_s)
    return found


def test_store_lease_and_fence_on_postgresql(postgres: str) -> None:
    timing = LeaseTiming(1.0)
    leases, stores, opened = [], [], []
    for name in ("a", "b"):
        lease = Lease(PgDatabase(postgres), f"holder-{name}", f"https://{name}", timing)
        db = PgDatabase(postgres)
        db.fence = lease
        leases.append(lease)
        stores.append(SqlStore(db))
        opened += [db, lease.db]
    try:
        _lease_and_fence(leases[0], leases[1], stores[0], stores[1])
    finally:
        for db in opened:
            db.close()


def _lease_and_fence(a: Lease, b: Lease, store_a: SqlStore, store_b: SqlStore) -> None:
    timing = a.timing
    who = Principal("operator", Role.OPERATOR)

    assert a.try_take() == 1
    assert b.try_take() is None  # held, unexpired: never taken
    held = b.leader()
    assert held is not None
    assert (held.holder, held.url, held.epoch) == ("holder-a", "https://a", 1)
    job = store_a.create_job("evacuate", {"host": "h1"}, who)
    jobs_a = store_a.job_store()
    moves = [("v2", "h1", "h2"), ("v1", "h1", "h3")]
    controller = jobs_a.begin("evacuate", "h1", moves, {"request": None})
    store_a.update_job(job.id, JobState.RUNNING, controller_job=controller)
    jobs_a.set_mark("h1", "entering", controller)
    jobs_a.set_mark("h1", "entering", controller)  # an upsert: once
    # A follower reads all of it, and writes nothing.
    assert [m.vm for m in store_b.job_store().job(controller).moves] == ["v2", "v1"]
    assert store_b.job(job.id).controller_job == controller
    assert list(store_b.job_store().marks()) == ["h1"]
    with pytest.raises(NotLeader):
        store_b.create_job("balance", {}, who)
    with pytest.raises(NotLeader):
        store_b.job_store().move_state(controller, "v1", "running")

    # Past its expiry (never renewed), b takes it over; a's writes are refused from then on.
    time.sleep(timing.length_s + 0.2)
    assert b.try_take() == 2
    with pytest.raises(NotLeader):
        jobs_a.move_state(controller, "v1", "running")
    assert a.renew() is False
    jobs_b = store_b.job_store()
    assert jobs_b.job(controller).state == "running"  # reading changes nothing
    assert jobs_b.settle_orphans() == [controller]  # a's job: another epoch's
    assert jobs_b.claim(controller).state == "running"
    assert jobs_b.settle_orphans() == []  # now b's
    store_b.history("api:operator").entries()  # the history's table, on PostgreSQL too
    b.release()
    assert a.try_take() == 3


# -- the failover, against a real lab -------------------------------------------------------


class _Api:
    """Plain HTTPS calls to a ``vmferry serve`` (status, headers, JSON)."""

    def __init__(self, url: str, token: str, ca: Path | None) -> None:
        self.url, self.token = url, token
        self.tls = ssl.create_default_context(cafile=None if ca is None else str(ca))

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, context=self.tls, timeout=10) as answer:
                return answer.status, answer.headers, json.loads(answer.read())
        except urllib.error.HTTPError as err:
            with err:
                return err.code, err.headers, json.loads(err.read())

    def role(self) -> str:
        return str(self.call("GET", "/openapi.json")[1]["X-Vmferry-Role"])


def _start_serve(lab_dir: Path, work: Path, name: str, store: str) -> subprocess.Popen[bytes]:
    ready = work / f"{name}-ready.json"
    env = {k: v for k, v in os.environ.items() if k not in ("VMFERRY_URL", "VMFERRY_TOKEN")}
    with (work / f"{name}.log").open("wb") as log:  # the child has its own copy
        process = subprocess.Popen(
            [sys.executable, "-m", "vmferry.cli.main", "serve", "--listen", "127.0.0.1:0",
             "--ready-file", str(ready), "--store", store, "--lease", str(LEASE_S),
             "--grace", "0.5"],
            env={**env, "VMFERRY_LAB_DIR": str(lab_dir)}, stdout=subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
    _until(lambda: ready.exists() or process.poll() is not None, 30, f"serve {name} not up")
    assert process.poll() is None, (work / f"{name}.log").read_text()
    return process


def _live_qemus(lab_dir: Path) -> Counter[str]:
    found: Counter[str] = Counter()
    for pid_file in lab_dir.glob("hosts/*/vms/*/qemu.pid"):
        text = pid_file.read_text().strip()
        if text and is_qemu_pid(int(text)):
            found[pid_file.parent.name] += 1
    return found


@pytest.mark.qemu
def test_the_follower_finishes_an_evacuation_whose_leader_was_killed(
    lab_dir: Path, tmp_path: Path, postgres: str
) -> None:
    lab = Lab(lab_dir)
    lab.ok("lab", "up", "--hosts", "2", "--memory-per-host", "1G")
    for name in GUESTS:
        lab.ok("vm", "create", name, "--host", "host-1", "--memory", "128M", "--workload", SMALL)
    started: list[subprocess.Popen[bytes]] = []
    try:
        a = _serve(lab_dir, tmp_path, "a", postgres, started)
        _until(lambda: a.role() == "leader", 15, "a does not lead")
        b = _serve(lab_dir, tmp_path, "b", postgres, started)
        _follows(b, a.url)
        # The leader killed mid-move: the follower takes the lease once it expired.
        killed = _evacuate_and_stop(lab, a, started[0], b, "host-1", signal.SIGKILL)
        _assert_one_verified_copy_each(lab, lab_dir, "host-2")
        # The new leader stopped mid-move (SIGTERM: wound down, handed over, lease given up).
        a = _serve(lab_dir, tmp_path, "a2", postgres, started)
        _follows(a, b.url)
        stopped = _evacuate_and_stop(lab, b, started[1], a, "host-2", signal.SIGTERM)
        assert started[1].returncode == 0, (tmp_path / "b.log").read_text()
        _assert_one_verified_copy_each(lab, lab_dir, "host-1")
        timings = {
            **{f"sigkill_{k}": v for k, v in killed.items()},
            **{f"sigterm_{k}": v for k, v in stopped.items()},
        }
        print(f"\nfailover (lease {LEASE_S:.0f} s): {json.dumps(timings)}")
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps({"lease_s": LEASE_S, **timings}, indent=2) + "\n")
        started[2].send_signal(signal.SIGTERM)
        assert started[2].wait(30) == 0, (tmp_path / "a2.log").read_text()
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
                process.wait()


def _serve(
    lab_dir: Path, work: Path, name: str, store: str, started: list[subprocess.Popen[bytes]]
) -> _Api:
    started.append(_start_serve(lab_dir, work, name, store))
    ready = json.loads((work / f"{name}-ready.json").read_text())
    token = Path(ready["tokens"]["operator"]).read_text().strip()
    return _Api(ready["url"], token, Inventory.load(lab_dir).ca_file)


def _follows(b: _Api, leader_url: str) -> None:
    """A follower answers reads, and refuses to act with 503 naming the leader."""
    assert b.role() == "follower"
    status, _, jobs = b.call("GET", "/api/v1/jobs")
    assert status == 200, jobs
    status, headers, error = b.call("POST", "/api/v1/evacuations", {"host": "host-1"})
    assert status == 503, error
    assert headers["X-Vmferry-Leader"] == leader_url
    assert error["error"]["code"] == "unavailable"
    assert leader_url in error["error"]["message"]


def _evacuate_and_stop(
    lab: Lab, a: _Api, leader: subprocess.Popen[bytes], b: _Api, host: str, how: signal.Signals
) -> dict[str, float]:
    """Evacuate ``host`` through the leader, stop it (``how``) mid-move; the follower goes on
    with the job to its end. How long that took from the signal: to leading, to the end."""
    body = {"host": host, "bandwidth_mbps": 200, "max_outbound": 1}
    status, _, job = a.call("POST", "/api/v1/evacuations", body)
    assert status == 202, job
    _until(lambda: any(v["state"] == "migrating" for v in lab.vms()), 60, "no move started", 0.1)
    leader.send_signal(how)  # SIGKILL: no clean-up of any kind
    signalled = time.monotonic()
    _until(lambda: b.role() == "leader", 4 * LEASE_S, "the follower does not take over")
    leads = time.monotonic()

    def ended() -> Any:
        found = b.call("GET", f"/api/v1/jobs/{job['id']}")[2]
        return found if found["state"] != "running" else None

    done = _until(ended, 90, "the job does not end", 0.2)
    finished = time.monotonic()
    leader.wait(30)
    assert done["state"] == "completed", done
    result = done["result"]
    assert (result["resumed"], result["state"], result["host"]) == (True, "completed", host)
    assert {m["vm"] for m in result["moves"]} | {s["vm"] for s in result["settled"]} == set(GUESTS)
    assert result["moves"], result  # a VM was left to move
    if how is signal.SIGKILL:  # the move in flight was settled as reconcile does
        assert any(s["reconcile"] is not None for s in result["settled"]), result["settled"]
    # The moves the new leader made are in the shared history, asked by who asked for the job.
    asked = [(e["vm"], e["asked_by"]) for e in b.call("GET", "/api/v1/history?limit=100")[2]]
    assert {(m["vm"], "api:operator") for m in result["moves"]} <= set(asked), asked
    return {
        "to_leading_s": round(leads - signalled, 2),
        "to_job_finished_s": round(finished - signalled, 2),
    }


def _assert_one_verified_copy_each(lab: Lab, lab_dir: Path, host: str) -> None:
    assert [(v["name"], v["host"], v["state"]) for v in lab.vms()] == [
        (name, host, "running") for name in GUESTS
    ]
    assert _live_qemus(lab_dir) == Counter(GUESTS)
    for name in GUESTS:
        assert lab.ok("verify", name)["ok"] is True
