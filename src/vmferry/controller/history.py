"""History of every migration, in SQLite (one row per migration, the report as JSON beside the
columns people filter on, and who asked for it: ``api:<token name>`` through ``vmferry serve``,
``local:<user>`` from a command run in-process)."""

from __future__ import annotations

import getpass
import json
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from vmferry.core.errors import FerryError
from vmferry.core.model import MigrationReport

__all__ = ["History", "HistoryEntry"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS migrations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
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
"""


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
    """The migration history database at ``path`` (created on first use); what it records,
    ``asked_by`` asked for (None: the user running this process)."""

    def __init__(self, path: Path, asked_by: str | None = None) -> None:
        self.path = path
        self.asked_by = asked_by

    def for_asker(self, asked_by: str) -> History:
        """The same history, recording what ``asked_by`` asks for."""
        return History(self.path, asked_by)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with closing(sqlite3.connect(self.path, timeout=10.0)) as connection, connection:
                connection.executescript(_SCHEMA)
                columns = {r[1] for r in connection.execute("PRAGMA table_info(migrations)")}
                if "asked_by" not in columns:  # a database from before who asked was recorded
                    connection.execute("ALTER TABLE migrations ADD COLUMN asked_by TEXT")
                yield connection
        except sqlite3.Error as err:
            raise FerryError(f"migration history {self.path}: {err}") from err

    def record(self, report: MigrationReport, started_at: datetime | None = None) -> int:
        """Store one report; returns its id.

        Raises:
            FerryError: the database cannot be written.
        """
        when = (started_at or datetime.now(UTC)).isoformat(timespec="seconds")
        with self._connect() as db:
            cursor = db.execute(
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
            return int(cursor.lastrowid or 0)

    def entries(self, vm: str | None = None, limit: int = 100) -> list[HistoryEntry]:
        """The latest ``limit`` migrations, oldest first (optionally of one VM).

        Raises:
            FerryError: the database cannot be read.
        """
        if not self.path.exists():
            return []
        query = "SELECT id, started_at, report, asked_by FROM migrations"
        args: tuple[object, ...] = ()
        if vm is not None:
            query += " WHERE vm = ?"
            args = (vm,)
        query += " ORDER BY id DESC LIMIT ?"
        with self._connect() as db:
            rows = db.execute(query, (*args, limit)).fetchall()
        return [_entry(r) for r in reversed(rows)]

    def entries_since(self, started_at: datetime) -> list[HistoryEntry]:
        """Every migration that started at or after ``started_at``, oldest first.

        Raises:
            FerryError: the database cannot be read.
        """
        if not self.path.exists():
            return []
        since = started_at.astimezone(UTC).isoformat(timespec="seconds")
        with self._connect() as db:
            rows = db.execute(
                "SELECT id, started_at, report, asked_by FROM migrations WHERE started_at >= ?"
                " ORDER BY id",
                (since,),
            ).fetchall()
        return [_entry(r) for r in rows]


def _entry(row: tuple[object, ...]) -> HistoryEntry:
    asked_by = row[3]
    return HistoryEntry(
        int(str(row[0])),
        str(row[1]),
        json.loads(str(row[2])),
        asked_by if isinstance(asked_by, str) else None,
    )
