"""History of every migration, in SQLite or PostgreSQL (one row per migration, the report as JSON
beside the columns people filter on, and who asked for it: ``api:<token name>`` through
``vmferry serve``, ``local:<user>`` from a command run in-process).

Beside it, what each move saw of its guest that a pre-flight cannot (``rewrites``: the rate
of pages rewritten unchanged, and whether the move stalled on them, :mod:`vmferry.core.blind`),
which the next plan of the same VM reads back (:meth:`History.resent_zero`). It is a table of
its own: a measurement of one VM, not a calibration sample
(``vmferry.controller.plan.calibration_from`` reads only ``migrations``)."""

from __future__ import annotations

import getpass
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from vmferry.controller.database import Database, Schema, SqliteDatabase
from vmferry.core.blind import BLIND_MOVES, stalled_on_rewrites
from vmferry.core.model import MigrationReport

__all__ = ["History", "HistoryEntry"]

_SCHEMA = Schema(
    """
CREATE TABLE IF NOT EXISTS migrations (
    id {serial},
    started_at TEXT NOT NULL,
    vm TEXT NOT NULL,
    source TEXT NOT NULL,
    destination TEXT NOT NULL,
    strategy TEXT NOT NULL,
    status TEXT NOT NULL,
    total_ms INTEGER NOT NULL,
    downtime_ms INTEGER,
    report TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS migrations_vm ON migrations (vm);
CREATE TABLE IF NOT EXISTS rewrites (
    vm TEXT NOT NULL,
    observed_at TEXT NOT NULL,
    resent_zero_bps BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS rewrites_vm ON rewrites (vm);
""",
    # Not in databases from before: who asked; whether the move stalled on the rewrites.
    added=(("migrations", "asked_by", "TEXT"), ("rewrites", "stalled", "INTEGER")),
)
_WHAT = "migration history"


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One recorded migration."""

    id: int
    started_at: str
    report: dict[str, object]
    asked_by: str | None = None  # None: recorded before who asked was

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "started_at": self.started_at,
            "asked_by": self.asked_by,
            **self.report,
        }


def _local_user() -> str:
    try:
        return f"local:{getpass.getuser()}"
    except (OSError, KeyError):
        return "local"


class History:
    """The migration history in ``database`` (a SQLite file's path: created on first use); what
    it records, ``asked_by`` asked for (None: the user running this process)."""

    def __init__(self, database: Path | Database, asked_by: str | None = None) -> None:
        self.db = SqliteDatabase(database) if isinstance(database, Path) else database
        self.asked_by = asked_by

    def for_asker(self, asked_by: str) -> History:
        """The same history, recording what ``asked_by`` asks for."""
        return History(self.db, asked_by)

    def record(self, report: MigrationReport, started_at: datetime | None = None) -> int:
        """Store one report; returns its id.

        Raises:
            FerryError: the database cannot be written.
        """
        when = (started_at or datetime.now(UTC)).isoformat(timespec="seconds")
        with self.db.transaction(_SCHEMA, _WHAT, write=True) as db:
            if report.resent_zero_bps is not None:
                got_across = report.running_on == report.destination
                stalled = stalled_on_rewrites(report.resent_zero_bps, got_across=got_across)
                db.execute(
                    "INSERT INTO rewrites (vm, observed_at, resent_zero_bps, stalled)"
                    " VALUES (?, ?, ?, ?)",
                    (report.vm, when, report.resent_zero_bps, int(stalled)),
                )
            return db.insert(
                "INSERT INTO migrations (started_at, vm, source, destination, strategy, status,"
                " total_ms, downtime_ms, report, asked_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    when,
                    report.vm,
                    report.source,
                    report.destination,
                    report.strategy,
                    report.status,
                    report.total_ms,
                    report.downtime_ms,
                    json.dumps(report.to_json()),
                    self.asked_by or _local_user(),
                ),
            )

    def entries(self, vm: str | None = None, limit: int = 100) -> list[HistoryEntry]:
        """The latest ``limit`` migrations, oldest first (optionally of one VM).

        Raises:
            FerryError: the database cannot be read.
        """
        if not self.db.exists():
            return []
        query = "SELECT id, started_at, report, asked_by FROM migrations"
        args: tuple[object, ...] = ()
        if vm is not None:
            query += " WHERE vm = ?"
            args = (vm,)
        query += " ORDER BY id DESC LIMIT ?"
        with self.db.transaction(_SCHEMA, _WHAT) as db:
            rows = db.execute(query, (*args, limit))
        return [_entry(r) for r in reversed(rows)]

    def resent_zero(
        self, vm: str, now: datetime | None = None, limit: int = BLIND_MOVES
    ) -> list[tuple[float, int, bool]]:
        """``(age_s, resent_zero_bps, stalled)`` of ``vm``'s latest ``limit`` moves that
        measured it, oldest first.

        Raises:
            FerryError: the database cannot be read.
        """
        if not self.db.exists():
            return []
        with self.db.transaction(_SCHEMA, _WHAT) as db:
            rows = db.execute(
                "SELECT observed_at, resent_zero_bps, stalled FROM rewrites WHERE vm = ?"
                " ORDER BY observed_at DESC LIMIT ?",
                (vm, limit),
            )
        at = now or datetime.now(UTC)
        return [
            ((at - datetime.fromisoformat(str(when))).total_seconds(), int(bps), bool(stalled))
            for when, bps, stalled in reversed(rows)
        ]

    def entries_since(self, started_at: datetime) -> list[HistoryEntry]:
        """Every migration that started at or after ``started_at``, oldest first.

        Raises:
            FerryError: the database cannot be read.
        """
        if not self.db.exists():
            return []
        since = started_at.astimezone(UTC).isoformat(timespec="seconds")
        with self.db.transaction(_SCHEMA, _WHAT) as db:
            rows = db.execute(
                "SELECT id, started_at, report, asked_by FROM migrations WHERE started_at >= ?"
                " ORDER BY id",
                (since,),
            )
        return [_entry(r) for r in rows]


def _entry(row: tuple[object, ...]) -> HistoryEntry:
    asked_by = row[3]
    return HistoryEntry(
        int(str(row[0])),
        str(row[1]),
        json.loads(str(row[2])),
        asked_by if isinstance(asked_by, str) else None,
    )
