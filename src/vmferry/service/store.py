"""What the service keeps: the migration history, the controller's job tables, and its own
record of every job it ran for a client (who asked, what, how it ended).

The service talks to :class:`ServiceStore` only. :class:`SqlStore` keeps all three in one
database (:mod:`vmferry.controller.database`): :class:`SqliteStore`, the embedded default, in the
lab's ``history.db`` beside the tables the in-process CLI writes (one database: ``vmferry
history`` shows moves from both); or PostgreSQL, shared by several controllers under a leader
lease (:mod:`vmferry.service.pg`, :mod:`vmferry.service.lease`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from vmferry.agent.api import NotFound
from vmferry.controller.database import Database, Schema, SqliteDatabase, Transaction, one
from vmferry.controller.history import History
from vmferry.controller.jobs import JobStore
from vmferry.service.api import JobState
from vmferry.service.auth import Principal, Role

__all__ = ["JobNotFound", "ServiceJob", "ServiceStore", "SqlStore", "SqliteStore"]

_SCHEMA = Schema(
    """
CREATE TABLE IF NOT EXISTS service_jobs (
    id {serial},
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    asked_by TEXT NOT NULL,
    role TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    request TEXT NOT NULL,
    result TEXT,
    error TEXT,
    controller_job INTEGER
);
"""
)
_WHAT = "service state"


@dataclass(frozen=True, slots=True)
class ServiceJob:
    """A job the service ran (or runs) for a client."""

    id: int
    kind: str
    state: JobState
    asked_by: Principal
    created_at: str
    updated_at: str
    request: Mapping[str, Any]
    result: Any  # the report / job result JSON, None until there is one
    error: Mapping[str, str] | None  # {"code", "message"} when it broke off or was refused
    controller_job: int | None  # its record in the controller's job tables (evacuate, balance)

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "kind": self.kind,
            "state": str(self.state),
            "asked_by": self.asked_by.to_json(),
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "request": dict(self.request),
            "result": self.result,
            "error": None if self.error is None else dict(self.error),
            "controller_job": self.controller_job,
        }

    def event_json(self) -> dict[str, object]:
        """The record as job events carry it: without the result (a job of many moves has a
        large one; ``GET /jobs/{id}`` has it), with whether there is one."""
        data = self.to_json()
        data["has_result"] = data.pop("result") is not None
        return data


class ServiceStore(Protocol):
    """Where the service keeps its state (see the module docstring)."""

    def history(self, asked_by: str | None = None) -> History:
        """The migration history, recording moves as asked by ``asked_by``."""
        ...

    def job_store(self) -> JobStore:
        """The controller's job tables (maintenance marks, evacuation and balance jobs)."""
        ...

    def create_job(self, kind: str, request: Mapping[str, Any], who: Principal) -> ServiceJob:
        """Record a new running job."""
        ...

    def update_job(
        self,
        job: int,
        state: JobState,
        *,
        result: Any = None,
        error: Mapping[str, str] | None = None,
        controller_job: int | None = None,
    ) -> ServiceJob:
        """Change a job's state (and its result, error, controller job where given)."""
        ...

    def job(self, job: int) -> ServiceJob:
        """Raises: ConfigError (NotFound): no such job."""
        ...

    def jobs(self, limit: int = 100, state: JobState | None = None) -> list[ServiceJob]:
        """The latest jobs, newest first."""
        ...

    def interrupt_running(self) -> list[int]:
        """Jobs a previous service left ``running`` (it died) become ``interrupted``."""
        ...

    def reopen(self, job: int) -> bool:
        """An ``interrupted`` job is ``running`` again, without its error, for the next leader
        to take over (a shared store); False: it was not interrupted."""
        ...


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class JobNotFound(NotFound):
    """No such job."""


_COLUMNS = (
    "id, kind, state, asked_by, role, created_at, updated_at, request, result, error,"
    " controller_job"
)


class SqlStore:
    """Everything in one SQL database (see the module docstring)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._history = History(db)
        self._jobs = JobStore(db)

    def _connect(self, *, write: bool = False) -> AbstractContextManager[Transaction]:
        return self.db.transaction(_SCHEMA, _WHAT, write=write)

    def history(self, asked_by: str | None = None) -> History:
        return self._history if asked_by is None else self._history.for_asker(asked_by)

    def job_store(self) -> JobStore:
        return self._jobs

    def create_job(self, kind: str, request: Mapping[str, Any], who: Principal) -> ServiceJob:
        now = _now()
        with self._connect(write=True) as db:
            job = db.insert(
                "INSERT INTO service_jobs (kind, state, asked_by, role, created_at, updated_at,"
                " request) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    kind,
                    str(JobState.RUNNING),
                    who.name,
                    str(who.role),
                    now,
                    now,
                    json.dumps(request),
                ),
            )
        return ServiceJob(job, kind, JobState.RUNNING, who, now, now, request, None, None, None)

    def update_job(
        self,
        job: int,
        state: JobState,
        *,
        result: Any = None,
        error: Mapping[str, str] | None = None,
        controller_job: int | None = None,
    ) -> ServiceJob:
        with self._connect(write=True) as db:
            db.execute(
                "UPDATE service_jobs SET state = ?, updated_at = ?,"
                " result = COALESCE(?, result), error = COALESCE(?, error),"
                " controller_job = COALESCE(?, controller_job) WHERE id = ?",
                (
                    str(state),
                    _now(),
                    None if result is None else json.dumps(result),
                    None if error is None else json.dumps(error),
                    controller_job,
                    job,
                ),
            )
        return self.job(job)

    def job(self, job: int) -> ServiceJob:
        with self._connect() as db:
            row = one(db.execute(f"SELECT {_COLUMNS} FROM service_jobs WHERE id = ?", (job,)))
        if row is None:
            raise JobNotFound(f"no job {job}")
        return _job(row)

    def jobs(self, limit: int = 100, state: JobState | None = None) -> list[ServiceJob]:
        query, args = f"SELECT {_COLUMNS} FROM service_jobs", []
        if state is not None:
            query += " WHERE state = ?"
            args.append(str(state))
        with self._connect() as db:
            rows = db.execute(query + " ORDER BY id DESC LIMIT ?", (*args, limit))
        return [_job(r) for r in rows]

    def reopen(self, job: int) -> bool:
        with self._connect(write=True) as db:
            return bool(
                db.execute(
                    "UPDATE service_jobs SET state = 'running', error = NULL, updated_at = ?"
                    " WHERE id = ? AND state = 'interrupted' RETURNING id",
                    (_now(), job),
                )
            )

    def interrupt_running(self) -> list[int]:
        with self._connect(write=True) as db:
            ids = [
                int(r[0]) for r in db.execute("SELECT id FROM service_jobs WHERE state = 'running'")
            ]
            db.execute(
                "UPDATE service_jobs SET state = 'interrupted', updated_at = ?"
                " WHERE state = 'running'",
                (_now(),),
            )
        return ids


class SqliteStore(SqlStore):
    """The embedded store: everything in one SQLite file (the lab's ``history.db``)."""

    def __init__(self, path: Path) -> None:
        super().__init__(SqliteDatabase(path))
        self.path = path


def _job(row: tuple[Any, ...]) -> ServiceJob:
    return ServiceJob(
        id=int(row[0]),
        kind=str(row[1]),
        state=JobState(row[2]),
        asked_by=Principal(str(row[3]), Role(row[4])),
        created_at=str(row[5]),
        updated_at=str(row[6]),
        request=json.loads(row[7]),
        result=None if row[8] is None else json.loads(row[8]),
        error=None if row[9] is None else json.loads(row[9]),
        controller_job=None if row[10] is None else int(row[10]),
    )
