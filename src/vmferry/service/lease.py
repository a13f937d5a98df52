"""The leader lease: which of the ``vmferry serve`` processes sharing one PostgreSQL database
runs jobs.

One row (``vmferry_lease``) says who holds it (``holder``: host, pid and a random tag; its
``url``), since when, until when, and its ``epoch``, a number that grows by one at every
takeover. Times are the database's own clock (``now()``), so the controllers' clocks never
matter.

- **Taking it**: one ``INSERT … ON CONFLICT DO UPDATE … WHERE expires_at < now()``: a row
  lock decides between controllers racing for it, and only an expired lease is taken
  (``epoch + 1``).
- **Keeping it**: the holder renews every quarter of its length (:class:`LeaseTiming`); a
  renewal only extends a lease still unexpired and still its own.
- **Losing it**: a holder that could not renew for three quarters of the length stops (see
  :class:`LeaseKeeper`) before the lease can expire, so two controllers never both act; and
  every write to the jobs checks the lease in the same transaction (:class:`Lease.check`, the
  fence of :mod:`vmferry.service.pg`), so even a holder that did not stop in time (a paused
  process) writes nothing once its lease is gone.
- **Giving it up**: a holder stopping cleanly (SIGTERM) expires its lease at once, so a
  follower takes over within one retry instead of one lease length.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from vmferry.controller.database import Schema, Transaction, one
from vmferry.core.errors import ConfigError, FerryError
from vmferry.service.pg import NotLeader, PgDatabase

__all__ = ["Holding", "Leader", "Lease", "LeaseKeeper", "LeaseTiming", "holder_name"]

logger = logging.getLogger(__name__)

_SCHEMA = Schema(
    """
CREATE TABLE IF NOT EXISTS vmferry_lease (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    url TEXT,
    epoch BIGINT NOT NULL,
    acquired_at TIMESTAMPTZ NOT NULL,
    renewed_at TIMESTAMPTZ NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
);
"""
)
_WHAT = "controller lease"
_NAME = "controller"


def holder_name() -> str:
    """This process, as a lease names its holder: ``host:pid:tag`` (the tag tells apart a
    restarted process that got the same pid)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


@dataclass(frozen=True, slots=True)
class LeaseTiming:
    """How a lease of ``length_s`` is kept: renewed every ``renew_every_s``, its holder stops
    once ``give_up_s`` passed without a renewal (well before it expires), a follower tries to
    take it every ``retry_s``.

    Raises:
        ConfigError: a length out of [1, 600] s.
    """

    length_s: float

    def __post_init__(self) -> None:
        if not 1.0 <= self.length_s <= 600.0:
            raise ConfigError(f"the lease length must be in [1, 600] s, got {self.length_s}")

    @property
    def renew_every_s(self) -> float:
        return self.length_s / 4

    @property
    def give_up_s(self) -> float:
        return self.length_s * 3 / 4

    @property
    def retry_s(self) -> float:
        return self.length_s / 4

    def must_stop(self, since_renewed_s: float) -> bool:
        """Whether a holder whose last good renewal was asked for ``since_renewed_s`` ago must
        stop (its lease may expire before it could renew again)."""
        return since_renewed_s >= self.give_up_s


@dataclass(frozen=True, slots=True)
class Leader:
    """Who holds the lease (as its row says)."""

    holder: str
    url: str | None
    epoch: int
    expires_in_s: float

    def describe(self) -> str:
        where = f" at {self.url}" if self.url else ""
        state = "expired" if self.expires_in_s <= 0 else f"{self.expires_in_s:.1f} s left"
        return f"{self.holder}{where} (epoch {self.epoch}, {state})"


class Lease:
    """The lease row in ``db`` (its own connection: renewals never wait behind the store's
    statements), as seen by the controller ``holder`` serving at ``url``."""

    def __init__(self, db: PgDatabase, holder: str, url: str | None, timing: LeaseTiming) -> None:
        self.db, self.holder, self.url, self.timing = db, holder, url, timing
        self._epoch: int | None = None

    @property
    def epoch(self) -> int | None:
        """The epoch this controller leads with (the fence's token; None: it does not lead)."""
        return self._epoch

    @property
    def leading(self) -> bool:
        return self._epoch is not None

    def try_take(self) -> int | None:
        """Take the lease if it is free or expired; the epoch it is held with (None: another
        controller holds it).

        Raises:
            FerryError: the database did not answer.
        """
        with self.db.unfenced(_SCHEMA, _WHAT) as tx:
            row = one(
                tx.execute(
                    "INSERT INTO vmferry_lease AS l (name, holder, url, epoch, acquired_at,"
                    " renewed_at, expires_at) VALUES (?, ?, ?, 1, now(), now(),"
                    " now() + make_interval(secs => ?)) ON CONFLICT (name) DO UPDATE SET"
                    " holder = excluded.holder, url = excluded.url, epoch = l.epoch + 1,"
                    " acquired_at = now(), renewed_at = now(), expires_at = excluded.expires_at"
                    " WHERE l.expires_at < now() RETURNING epoch",
                    (_NAME, self.holder, self.url, self.timing.length_s),
                )
            )
        self._epoch = None if row is None else int(row[0])
        return self._epoch

    def renew(self) -> bool:
        """Extend the lease by its length from now; False: it is no longer this controller's
        (or it expired: it is never renewed then).

        Raises:
            FerryError: the database did not answer.
        """
        if self._epoch is None:
            return False
        with self.db.unfenced(_SCHEMA, _WHAT) as tx:
            row = one(
                tx.execute(
                    "UPDATE vmferry_lease SET renewed_at = now(),"
                    " expires_at = now() + make_interval(secs => ?) WHERE name = ? AND holder = ?"
                    " AND epoch = ? AND expires_at > now() RETURNING epoch",
                    (self.timing.length_s, _NAME, self.holder, self._epoch),
                )
            )
        if row is None:
            self._epoch = None
        return row is not None

    def release(self) -> None:
        """Give the lease up now (a follower takes it at its next try).

        Raises:
            FerryError: the database did not answer.
        """
        if self._epoch is None:
            return
        with self.db.unfenced(_SCHEMA, _WHAT) as tx:
            tx.execute(
                "UPDATE vmferry_lease SET expires_at = now() WHERE name = ? AND holder = ?"
                " AND epoch = ?",
                (_NAME, self.holder, self._epoch),
            )
        self._epoch = None

    def leader(self) -> Leader | None:
        """Who holds the lease now (None: nobody ever did).

        Raises:
            FerryError: the database did not answer.
        """
        with self.db.unfenced(_SCHEMA, _WHAT) as tx:
            row = one(
                tx.execute(
                    "SELECT holder, url, epoch, EXTRACT(EPOCH FROM expires_at - now())"
                    " FROM vmferry_lease WHERE name = ?",
                    (_NAME,),
                )
            )
        return None if row is None else Leader(str(row[0]), row[1], int(row[2]), float(row[3]))

    def check(self, tx: Transaction) -> None:
        """The fence: called first in every write transaction of the store (another
        connection); locks the lease row so a takeover waits for the write to commit.

        Raises:
            NotLeader: the lease is not this controller's any more, or expired.
        """
        epoch = self._epoch
        if epoch is None:
            raise NotLeader(None, "it holds no lease")
        row = one(
            tx.execute(
                "SELECT 1 FROM vmferry_lease WHERE name = ? AND holder = ? AND epoch = ?"
                " AND expires_at > now() FOR SHARE",
                (_NAME, self.holder, epoch),
            )
        )
        if row is None:
            raise NotLeader(None, f"its lease (epoch {epoch}) expired or was taken over")


class Holding(Protocol):
    """What :class:`LeaseKeeper` needs of a lease (:class:`Lease` is one)."""

    @property
    def holder(self) -> str: ...

    @property
    def timing(self) -> LeaseTiming: ...

    def try_take(self) -> int | None: ...

    def renew(self) -> bool: ...


class LeaseKeeper:
    """Takes the lease when it is free, keeps it, and stops the controller that loses it.

    Args:
        on_lead: awaited once this controller leads (with its epoch): take the jobs over.
        on_lost: called when it may have lost the lease (with why); it must stop every action
            of this controller at once (the service exits).
        clock: seconds, monotonic.
    """

    def __init__(
        self,
        lease: Holding,
        on_lead: Callable[[int], Awaitable[None]],
        on_lost: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.lease, self.on_lead, self.on_lost, self.clock = lease, on_lead, on_lost, clock

    async def run(self) -> None:
        """Follow until the lease is had, then lead until it is lost (``on_lost``)."""
        timing = self.lease.timing
        while True:
            asked = self.clock()
            try:
                epoch = await asyncio.to_thread(self.lease.try_take)
            except FerryError as err:
                logger.warning("lease.unreachable %s", err)
                epoch = None
            if epoch is not None:
                break
            await asyncio.sleep(timing.retry_s)
        logger.info("lease.taken epoch %d by %s", epoch, self.lease.holder)
        await self.on_lead(epoch)
        await self._keep(asked)

    async def _keep(self, renewed: float) -> None:
        """Renew every ``renew_every_s`` from the last try (``renewed``: when the last good
        renewal was asked for) until the lease is lost."""
        timing = self.lease.timing
        asked = renewed
        while True:
            await asyncio.sleep(max(0.0, asked + timing.renew_every_s - self.clock()))
            asked = self.clock()
            if timing.must_stop(asked - renewed):
                self.on_lost(f"no renewal for {asked - renewed:.1f} s")
                return
            try:
                async with asyncio.timeout(renewed + timing.give_up_s - asked):
                    kept = await asyncio.to_thread(self.lease.renew)
            except (FerryError, TimeoutError) as err:
                logger.warning("lease.renewal_failed %s", str(err) or "no answer in time")
                kept = None
            if kept is False:
                self.on_lost("the lease expired or was taken over")
                return
            if kept:
                renewed = asked
            elif timing.must_stop(self.clock() - renewed):
                self.on_lost(f"no renewal for {self.clock() - renewed:.1f} s")
                return
