"""History of every migration, in SQLite (one row per migration, the report as JSON beside the
columns people filter on)."""

from __future__ import annotations

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

    def to_json(self) -> dict[str, object]:
        return {"id": self.id, "started_at": self.started_at, **self.report}


class History:
    """The migration history database at ``path`` (created on first use)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with closing(sqlite3.connect(self.path, timeout=10.0)) as connection, connection:
                connection.executescript(_SCHEMA)
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
                " total_ms, downtime_ms, report) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
        query = "SELECT id, started_at, report FROM migrations"
        args: tuple[object, ...] = ()
        if vm is not None:
            query += " WHERE vm = ?"
            args = (vm,)
        query += " ORDER BY id DESC LIMIT ?"
        with self._connect() as db:
            rows = db.execute(query, (*args, limit)).fetchall()
        return [HistoryEntry(int(r[0]), str(r[1]), json.loads(r[2])) for r in reversed(rows)]

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
                "SELECT id, started_at, report FROM migrations WHERE started_at >= ? ORDER BY id",
                (since,),
            ).fetchall()
        return [HistoryEntry(int(r[0]), str(r[1]), json.loads(r[2])) for r in rows]
