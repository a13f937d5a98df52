"""The SQL under the controller's state: one small layer beneath the migration history
(:class:`~vmferry.controller.history.History`), the job tables
(:class:`~vmferry.controller.jobs.JobStore`) and the service's own table, so that the same
statements run on SQLite (the embedded default, :class:`SqliteDatabase`) and on PostgreSQL
(several controllers sharing one database: :mod:`vmferry.service.pg`).

Statements are written once, with ``?`` placeholders and SQL both understand (``INSERT … ON
CONFLICT … DO UPDATE``, ``COALESCE``); what differs is a :class:`Dialect`: the type of an
auto-numbered key, the column that keeps a table's rows in the order they were added, and how
an ``exclusive`` transaction (a check and the write it leads to, as one step for every other
controller) is had: SQLite's ``BEGIN IMMEDIATE``, a transaction-scoped advisory lock on
PostgreSQL.

A database several controllers share (:attr:`Database.shared`) is written only by the one
holding the leader lease: each write transaction checks it (fencing), and a job belongs to the
lease epoch it runs under (:meth:`Database.lease_epoch`), not to a process id.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from vmferry.core.errors import FerryError

__all__ = [
    "SQLITE",
    "Column",
    "Database",
    "Dialect",
    "Schema",
    "SqliteDatabase",
    "Transaction",
    "one",
]

Column = tuple[str, str, str]  # (table, column, SQL type)


@dataclass(frozen=True, slots=True)
class Dialect:
    """What differs between the SQL databases the controller keeps its state in.

    Attributes:
        name: ``sqlite`` or ``postgresql``.
        serial: the type of an auto-numbered primary key column.
        row_order: a column ordering a table's rows as they were added.
    """

    name: str
    serial: str
    row_order: str

    def ddl(self, text: str) -> str:
        """``text`` with ``{serial}`` spelled for this dialect."""
        return text.replace("{serial}", self.serial)


SQLITE = Dialect("sqlite", "INTEGER PRIMARY KEY AUTOINCREMENT", "rowid")


@dataclass(frozen=True, slots=True)
class Schema:
    """The tables a store needs, created where missing.

    Attributes:
        ddl: ``CREATE … IF NOT EXISTS`` statements (``{serial}``: see :meth:`Dialect.ddl`).
        added: columns added after their table was first made (added to older databases).
        only: columns one dialect alone has, by its name (PostgreSQL has no ``rowid`` and
            keeps a job's lease epoch).
    """

    ddl: str
    added: tuple[Column, ...] = ()
    only: Mapping[str, tuple[Column, ...]] = field(default_factory=dict)

    def columns(self, dialect: Dialect) -> tuple[Column, ...]:
        """The columns to add where missing, on ``dialect``."""
        return (*self.added, *self.only.get(dialect.name, ()))


class Transaction(Protocol):
    """Statements in one transaction (``?`` placeholders on every dialect)."""

    def execute(self, sql: str, args: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        """Run ``sql``; its rows (none for a statement without a result)."""
        ...

    def executemany(self, sql: str, rows: Iterable[Sequence[object]]) -> None:
        """Run ``sql`` once per row of arguments."""
        ...

    def insert(self, sql: str, args: Sequence[object] = ()) -> int:
        """Run the ``INSERT`` ``sql`` into a table with an ``id`` key; the new row's id."""
        ...


class Database(Protocol):
    """Where a store's tables are (see the module docstring)."""

    @property
    def dialect(self) -> Dialect: ...

    @property
    def shared(self) -> bool:
        """Several controllers use it: only the lease holder writes; jobs follow the lease."""
        ...

    def lease_epoch(self) -> int | None:
        """The lease epoch this controller writes under (None: it holds no lease)."""
        ...

    def exists(self) -> bool:
        """Whether the database is there to read (an embedded one is made on first write)."""
        ...

    def transaction(
        self, schema: Schema, what: str, *, write: bool = False, exclusive: bool = False
    ) -> AbstractContextManager[Transaction]:
        """One transaction on ``schema``'s tables, committed when the block ends, rolled back if
        it raises.

        Args:
            what: names the state in errors (``migration history``).
            write: it changes the state (on a shared database: only under the lease).
            exclusive: it holds the one writer's lock from its start.

        Raises:
            FerryError: the database cannot be reached, read or written.
        """
        ...


def one(rows: list[tuple[Any, ...]]) -> tuple[Any, ...] | None:
    """The first row of ``rows`` (None: there is none)."""
    return rows[0] if rows else None


class _SqliteTransaction:
    def __init__(self, connection: sqlite3.Connection) -> None:
        self._db = connection

    def execute(self, sql: str, args: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        return self._db.execute(sql, tuple(args)).fetchall()

    def executemany(self, sql: str, rows: Iterable[Sequence[object]]) -> None:
        self._db.executemany(sql, [tuple(r) for r in rows])

    def insert(self, sql: str, args: Sequence[object] = ()) -> int:
        return int(self._db.execute(sql, tuple(args)).lastrowid or 0)


class SqliteDatabase:
    """The embedded database: one SQLite file (the lab's ``history.db``), created on first use;
    one connection per transaction, so any number of processes use it (SQLite's file locks
    order them, waiting up to 10 s)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def dialect(self) -> Dialect:
        return SQLITE

    @property
    def shared(self) -> bool:
        return False

    def lease_epoch(self) -> int | None:
        return None

    def exists(self) -> bool:
        return self.path.exists()

    @contextmanager
    def transaction(
        self, schema: Schema, what: str, *, write: bool = False, exclusive: bool = False
    ) -> Iterator[Transaction]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with closing(sqlite3.connect(self.path, timeout=10.0, isolation_level=None)) as db:
                db.executescript(SQLITE.ddl(schema.ddl))
                for table, column, kind in schema.columns(SQLITE):
                    if column not in {r[1] for r in db.execute(f"PRAGMA table_info({table})")}:
                        db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
                db.execute("BEGIN IMMEDIATE" if exclusive else "BEGIN")
                try:
                    yield _SqliteTransaction(db)
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
        except sqlite3.Error as err:
            raise FerryError(f"{what} {self.path}: {err}") from err
