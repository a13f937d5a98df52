"""The controller's own cluster state, beside the migration history (SQLite, or PostgreSQL
shared by several controllers: :mod:`vmferry.controller.database`): hosts in maintenance, VMs'
anti-affinity groups, and jobs of many moves.

Every change is one transaction, so a controller killed at any instant leaves either
the state before or the state after (crash-safe without a file of our own to repair). A job
is recorded before its first move starts, each move as it starts and ends, and the job as it
ends: a later controller reads what a killed one was doing (:meth:`JobStore.job`). Two jobs
never share a host: :meth:`JobStore.begin` refuses a job whose hosts a running job holds,
in the same transaction that records it. A job whose controller process is gone no longer
holds its hosts; it is marked ``interrupted`` (its moves as they were recorded, for
``reconcile`` and a resume to settle). A later controller takes an interrupted job over
(:meth:`JobStore.claim`: running again, under its own pid, in one transaction, so two
controllers never both resume it), records where each move ended up, and adds the moves it
plans for what is left (:meth:`JobStore.extend`) under the same job id.

Whose a running job is: on SQLite, its controller's process (``pid``: alive or not, judged on
this machine, where every controller of an embedded database runs). On a database several
controllers share, a pid says nothing (the controllers run on different machines, and a pid
alive there may be another process here): a job belongs to the leader lease's epoch it was
begun or claimed under (column ``owner``). Only the lease holder writes; a new holder marks
every running job of an older epoch ``interrupted`` (:meth:`JobStore.settle_orphans`, and again
as it begins, claims or extends a job), ready for it to claim; reading the jobs changes nothing
there.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from vmferry.controller.database import Database, Schema, SqliteDatabase, Transaction, one
from vmferry.core.errors import ConfigError

__all__ = [
    "HostMark",
    "JobConflict",
    "JobMove",
    "JobNotResumable",
    "JobRecord",
    "JobStore",
    "MarkState",
    "UnknownJob",
]

MarkState = Literal["entering", "maintenance"]

_SCHEMA = Schema(
    """
CREATE TABLE IF NOT EXISTS host_marks (
    host TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    since TEXT NOT NULL,
    job INTEGER
);
CREATE TABLE IF NOT EXISTS vm_groups (
    vm TEXT PRIMARY KEY,
    grp TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id {serial},
    kind TEXT NOT NULL,
    host TEXT NOT NULL,
    hosts TEXT NOT NULL,
    state TEXT NOT NULL,
    pid INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    plan TEXT NOT NULL,
    report TEXT
);
CREATE TABLE IF NOT EXISTS job_moves (
    job INTEGER NOT NULL,
    vm TEXT NOT NULL,
    source TEXT NOT NULL,
    destination TEXT NOT NULL,
    state TEXT NOT NULL,
    report TEXT,
    PRIMARY KEY (job, vm)
);
""",
    # PostgreSQL has no rowid (a move's place in its job), and jobs follow the lease there.
    only={"postgresql": (("job_moves", "seq", "BIGSERIAL"), ("jobs", "owner", "BIGINT"))},
)
_WHAT = "controller state"


class JobConflict(ConfigError):
    """A job already runs on one of the hosts asked for. Nothing moved.

    Attributes:
        job: the running job's id.
        hosts: the hosts both jobs want.
    """

    def __init__(self, job: int, kind: str, hosts: Sequence[str]) -> None:
        super().__init__(
            f"job {job} ({kind}) is running on {', '.join(hosts)}: one job per host at a time"
        )
        self.job = job
        self.hosts = tuple(hosts)


class UnknownJob(ConfigError):
    """No job has this id.

    Attributes:
        job: the id asked for.
    """

    def __init__(self, job: int) -> None:
        super().__init__(f"no job {job} (`vmferry job list` lists them)")
        self.job = job


class JobNotResumable(ConfigError):
    """Only a job whose controller died (``interrupted``) is resumed. Nothing moved.

    Attributes:
        job: its id.
        state: its state (``running``, ``completed``, ``failed``).
        pid: its controller's pid.
    """

    def __init__(self, job: int, state: str, pid: int) -> None:
        if state == "running":
            why = (
                f"job {job} is running: its controller (pid {pid}) is alive; "
                "only an interrupted job is resumed"
            )
        else:
            why = f"job {job} is {state}: only an interrupted job is resumed"
            if state == "failed":
                why += " (run its host command again for a new job of what is left)"
        super().__init__(why)
        self.job = job
        self.state = state
        self.pid = pid


@dataclass(frozen=True, slots=True)
class HostMark:
    """A host on its way into maintenance (``entering``: being emptied) or in it."""

    host: str
    state: MarkState
    since: str
    job: int | None

    @property
    def describe(self) -> str:
        """``in maintenance`` or ``entering maintenance``."""
        return "in maintenance" if self.state == "maintenance" else "entering maintenance"

    def to_json(self) -> dict[str, object]:
        return {"host": self.host, "state": self.state, "since": self.since, "job": self.job}


@dataclass(frozen=True, slots=True)
class JobMove:
    """One move of a recorded job: ``waiting``, ``running``, ``completed`` or ``failed``."""

    vm: str
    source: str
    destination: str
    state: str
    report: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class JobRecord:
    """A recorded job."""

    id: int
    kind: str
    host: str
    hosts: tuple[str, ...]
    state: str
    pid: int
    created_at: str
    updated_at: str
    plan: dict[str, Any]
    report: dict[str, Any] | None
    moves: tuple[JobMove, ...]

    def to_json(self, *, detail: bool = False) -> dict[str, object]:
        """The job and its moves (``detail``: with each move's report and the job's plan and
        report)."""
        shown: dict[str, object] = {
            "job": self.id,
            "kind": self.kind,
            "host": self.host,
            "hosts": list(self.hosts),
            "state": self.state,
            "pid": self.pid,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "moves": [
                {
                    "vm": m.vm,
                    "source": m.source,
                    "destination": m.destination,
                    "state": m.state,
                    **({"report": m.report} if detail else {}),
                }
                for m in self.moves
            ],
        }
        if detail:
            shown["plan"] = self.plan
            shown["report"] = self.report
        return shown


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class JobStore:
    """The state in ``database`` (a SQLite file's path, the lab's ``history.db``: created on
    first use)."""

    def __init__(self, database: Path | Database) -> None:
        self.db = SqliteDatabase(database) if isinstance(database, Path) else database

    def _connect(self, *, immediate: bool = False) -> AbstractContextManager[Transaction]:
        """One transaction (``immediate``: a write, holding the write lock from its start, so
        a check and the write it leads to are one step for every other controller)."""
        return self.db.transaction(_SCHEMA, _WHAT, write=immediate, exclusive=immediate)

    # Maintenance marks.

    def marks(self) -> dict[str, HostMark]:
        """Hosts entering or in maintenance, by name."""
        with self._connect() as db:
            rows = db.execute("SELECT host, state, since, job FROM host_marks")
        return {r[0]: HostMark(str(r[0]), r[1], str(r[2]), r[3]) for r in rows}

    def set_mark(self, host: str, state: MarkState, job: int | None = None) -> HostMark:
        """Mark ``host`` (keeps the time it was first marked)."""
        with self._connect(immediate=True) as db:
            row = one(db.execute("SELECT since FROM host_marks WHERE host = ?", (host,)))
            since = str(row[0]) if row is not None else _now()
            db.execute(
                "INSERT INTO host_marks (host, state, since, job) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (host) DO UPDATE SET state = excluded.state,"
                " since = excluded.since, job = excluded.job",
                (host, state, since, job),
            )
        return HostMark(host, state, since, job)

    def clear_mark(self, host: str) -> HostMark | None:
        """Take ``host`` out of maintenance; the mark it had, if any."""
        with self._connect(immediate=True) as db:
            row = one(
                db.execute("SELECT host, state, since, job FROM host_marks WHERE host = ?", (host,))
            )
            db.execute("DELETE FROM host_marks WHERE host = ?", (host,))
        return None if row is None else HostMark(str(row[0]), row[1], str(row[2]), row[3])

    # Anti-affinity groups.

    def groups(self) -> dict[str, str]:
        """Each grouped VM's group."""
        with self._connect() as db:
            return {str(vm): str(g) for vm, g in db.execute("SELECT vm, grp FROM vm_groups")}

    def set_group(self, vm: str, group: str | None) -> None:
        """Put ``vm`` in ``group`` (None: in none)."""
        with self._connect(immediate=True) as db:
            db.execute("DELETE FROM vm_groups WHERE vm = ?", (vm,))
            if group is not None:
                db.execute("INSERT INTO vm_groups (vm, grp) VALUES (?, ?)", (vm, group))

    # Jobs.

    def begin(
        self,
        kind: str,
        host: str,
        moves: Sequence[tuple[str, str, str]],
        plan: Mapping[str, Any],
        *,
        pid: int | None = None,
    ) -> int:
        """Record a new job of ``moves`` (vm, source, destination), running.

        Returns:
            Its id.

        Raises:
            JobConflict: a running job holds one of its hosts (its own ``host``, the sources
                and the destinations).
            FerryError: the database cannot be written.
        """
        hosts = sorted({host, *(s for _, s, _ in moves), *(d for _, _, d in moves)})
        now = _now()
        with self._connect(immediate=True) as db:
            self._settle_orphans(db)
            self._check_running(db, hosts)
            job_id = db.insert(
                "INSERT INTO jobs (kind, host, hosts, state, pid, created_at, updated_at, plan)"
                " VALUES (?, ?, ?, 'running', ?, ?, ?, ?)",
                (kind, host, json.dumps(hosts), pid or os.getpid(), now, now, json.dumps(plan)),
            )
            self._own(db, job_id)
            db.executemany(
                "INSERT INTO job_moves (job, vm, source, destination, state)"
                " VALUES (?, ?, ?, ?, 'waiting')",
                [(job_id, vm, s, d) for vm, s, d in moves],
            )
        return job_id

    def claim(self, job: int, *, pid: int | None = None) -> JobRecord:
        """Take over the interrupted job ``job``: running again, under ``pid`` (this process).

        Returns:
            Its record, as its last controller left it.

        Raises:
            UnknownJob: no such job.
            JobNotResumable: it is not interrupted (its controller is alive, or it ended).
            JobConflict: another running job holds one of its hosts.
            FerryError: the database cannot be written.
        """
        with self._connect(immediate=True) as db:
            self._settle_orphans(db)
            row = one(db.execute("SELECT state, pid, hosts FROM jobs WHERE id = ?", (job,)))
            if row is None:
                raise UnknownJob(job)
            if row[0] != "interrupted":
                raise JobNotResumable(job, str(row[0]), int(row[1]))
            self._check_running(db, json.loads(row[2]))
            db.execute(
                "UPDATE jobs SET state = 'running', pid = ?, updated_at = ? WHERE id = ?",
                (pid or os.getpid(), _now(), job),
            )
            self._own(db, job)
        return self.job(job)

    def extend(
        self, job: int, moves: Sequence[tuple[str, str, str]], plan: Mapping[str, Any]
    ) -> None:
        """Moves (vm, source, destination) planned for what a resumed ``job`` has left: each
        ``waiting`` (a VM the job had already: its move as planned now); the job holds their
        hosts too and keeps ``plan`` as its latest.

        Raises:
            JobConflict: another running job holds one of the new hosts (nothing recorded).
            FerryError: the database cannot be written.
        """
        with self._connect(immediate=True) as db:
            self._settle_orphans(db)
            row = one(db.execute("SELECT host, hosts FROM jobs WHERE id = ?", (job,)))
            if row is None:
                raise UnknownJob(job)
            hosts = sorted(
                {*json.loads(row[1]), *(s for _, s, _ in moves), *(d for _, _, d in moves)}
            )
            self._check_running(db, hosts, but=job)
            db.execute(
                "UPDATE jobs SET hosts = ?, plan = ?, updated_at = ? WHERE id = ?",
                (json.dumps(hosts), json.dumps(plan), _now(), job),
            )
            db.executemany(
                "INSERT INTO job_moves (job, vm, source, destination, state)"
                " VALUES (?, ?, ?, ?, 'waiting') ON CONFLICT (job, vm) DO UPDATE SET"
                " source = excluded.source, destination = excluded.destination,"
                " state = 'waiting', report = NULL",
                [(job, vm, s, d) for vm, s, d in moves],
            )

    @staticmethod
    def _check_running(db: Transaction, hosts: Sequence[str], but: int | None = None) -> None:
        """Raises: JobConflict: a running job (other than ``but``) holds one of ``hosts``."""
        for job, job_kind, held in db.execute(
            "SELECT id, kind, hosts FROM jobs WHERE state = 'running'"
        ):
            both = sorted(set(json.loads(held)).intersection(hosts))
            if both and job != but:
                raise JobConflict(int(job), str(job_kind), both)

    def _own(self, db: Transaction, job: int) -> None:
        """``job`` runs under this controller's lease (on a shared database)."""
        if self.db.shared:
            db.execute("UPDATE jobs SET owner = ? WHERE id = ?", (self.db.lease_epoch(), job))

    def _settle_orphans(self, db: Transaction) -> list[int]:
        """Running jobs whose controller is gone become ``interrupted`` (on a shared database:
        those of another lease epoch than this controller's, which writes under the lease).

        Returns:
            Their ids.
        """
        if self.db.shared:
            return [
                int(r[0])
                for r in db.execute(
                    "UPDATE jobs SET state = 'interrupted', updated_at = ? WHERE state ="
                    " 'running' AND (owner IS NULL OR owner <> ?) RETURNING id",
                    (_now(), self.db.lease_epoch()),
                )
            ]
        orphans = []
        for job, pid in db.execute("SELECT id, pid FROM jobs WHERE state = 'running'"):
            if not _is_alive(int(pid)):
                db.execute(
                    "UPDATE jobs SET state = 'interrupted', updated_at = ? WHERE id = ?",
                    (_now(), job),
                )
                orphans.append(int(job))
        return orphans

    def settle_orphans(self) -> list[int]:
        """Mark the running jobs whose controller is gone ``interrupted`` now (a new lease
        holder does this first: see the module docstring); their ids.

        Raises:
            FerryError: the database cannot be written (or, shared, this controller does not
                hold the lease).
        """
        with self._connect(immediate=True) as db:
            return self._settle_orphans(db)

    def check_free(self, hosts: Sequence[str]) -> None:
        """Refuse early (before a job is planned) when a running job holds one of ``hosts``;
        :meth:`begin` checks again as it records the job.

        Raises:
            JobConflict: naming the job.
        """
        for job in self.jobs():
            both = sorted(set(job.hosts).intersection(hosts))
            if job.state == "running" and both:
                raise JobConflict(job.id, job.kind, both)

    def move_state(
        self, job: int, vm: str, state: str, report: Mapping[str, Any] | None = None
    ) -> None:
        """A move of ``job`` started (``running``) or ended (``completed``/``failed``), or a
        resume found where it ended up (``completed``, ``waiting`` to be moved again,
        ``failed``, ``gone``)."""
        with self._connect(immediate=True) as db:
            db.execute(
                "UPDATE job_moves SET state = ?, report = ? WHERE job = ? AND vm = ?",
                (state, None if report is None else json.dumps(report), job, vm),
            )
            db.execute("UPDATE jobs SET updated_at = ? WHERE id = ?", (_now(), job))

    def end(self, job: int, state: str, report: Mapping[str, Any] | None = None) -> None:
        """``job`` ended: ``completed``, ``failed`` or ``interrupted`` (a resume that could not
        go on gives it back: another resume may take it)."""
        with self._connect(immediate=True) as db:
            db.execute(
                "UPDATE jobs SET state = ?, updated_at = ?, report = ? WHERE id = ?",
                (state, _now(), None if report is None else json.dumps(report), job),
            )

    def job(self, job: int) -> JobRecord:
        """The job ``job``.

        Raises:
            UnknownJob: no such job.
        """
        found = self.jobs(job=job)
        if not found:
            raise UnknownJob(job)
        return found[0]

    def jobs(
        self,
        *,
        host: str | None = None,
        kind: str | None = None,
        job: int | None = None,
        state: str | None = None,
    ) -> list[JobRecord]:
        """Recorded jobs, newest first (of ``host``, of ``kind``, in ``state``)."""
        query = (
            "SELECT id, kind, host, hosts, state, pid, created_at, updated_at, plan, report"
            " FROM jobs WHERE 1 = 1"
        )
        args: list[object] = []
        for column, value in (("host", host), ("kind", kind), ("id", job), ("state", state)):
            if value is not None:
                query += f" AND {column} = ?"
                args.append(value)
        # Reading settles orphans where a pid says whose a job is (on a shared database only
        # the lease holder writes, and it settles them as it takes the lease over).
        with self._connect(immediate=not self.db.shared) as db:
            if not self.db.shared:
                self._settle_orphans(db)
            rows = db.execute(query + " ORDER BY id DESC", args)
            order = self.db.dialect.row_order
            moves = {
                r[0]: db.execute(
                    "SELECT vm, source, destination, state, report FROM job_moves WHERE job = ?"
                    f" ORDER BY {order}",
                    (r[0],),
                )
                for r in rows
            }
        return [
            JobRecord(
                id=int(r[0]),
                kind=str(r[1]),
                host=str(r[2]),
                hosts=tuple(json.loads(r[3])),
                state=str(r[4]),
                pid=int(r[5]),
                created_at=str(r[6]),
                updated_at=str(r[7]),
                plan=json.loads(r[8]),
                report=None if r[9] is None else json.loads(r[9]),
                moves=tuple(
                    JobMove(m[0], m[1], m[2], m[3], None if m[4] is None else json.loads(m[4]))
                    for m in moves[r[0]]
                ),
            )
            for r in rows
        ]
