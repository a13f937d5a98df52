"""The leader lease's keeper against a scripted lease (no database): a follower retries until
the lease is free, then leads; a leader that cannot renew stops before its lease could expire;
one whose lease was taken over stops at once. (The lease's SQL and its fence run against a
real PostgreSQL in tests/integration/test_serve_failover.py.)"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator

import pytest

from vmferry.core.errors import ConfigError, FerryError
from vmferry.service.lease import LeaseKeeper, LeaseTiming


class _ScriptedLease:
    """Answers ``try_take`` and ``renew`` from scripts (an exception is raised)."""

    def __init__(self, takes: list[int | None], renewals: list[bool | Exception]) -> None:
        self.holder = "me"
        self.timing = LeaseTiming(1.0)
        self._takes: Iterator[int | None] = iter(takes)
        self._renewals: Iterator[bool | Exception] = iter(renewals)
        self.asked: list[tuple[str, float]] = []

    def try_take(self) -> int | None:
        self.asked.append(("take", time.monotonic()))
        return next(self._takes)

    def renew(self) -> bool:
        self.asked.append(("renew", time.monotonic()))
        answer = next(self._renewals)
        if isinstance(answer, Exception):
            raise answer
        return answer


def _keep(lease: _ScriptedLease) -> tuple[list[int], list[str], float]:
    led: list[int] = []
    lost: list[str] = []

    async def lead(epoch: int) -> None:
        led.append(epoch)

    began = time.monotonic()
    asyncio.run(asyncio.wait_for(LeaseKeeper(lease, lead, lost.append).run(), 10))
    return led, lost, time.monotonic() - began


def test_timing() -> None:
    timing = LeaseTiming(10.0)
    assert (timing.renew_every_s, timing.give_up_s, timing.retry_s) == (2.5, 7.5, 2.5)
    assert not timing.must_stop(7.4)
    assert timing.must_stop(7.5)
    for bad in (0.5, 601.0):
        with pytest.raises(ConfigError):
            LeaseTiming(bad)


def test_a_follower_retries_then_leads_and_renews_until_taken_over() -> None:
    lease = _ScriptedLease([None, None, 7], [True, True, False])
    led, lost, _ = _keep(lease)
    assert led == [7]
    assert lost == ["the lease expired or was taken over"]
    assert [what for what, _ in lease.asked] == ["take"] * 3 + ["renew"] * 3
    renewals = [at for what, at in lease.asked if what == "renew"]
    gaps = [b - a for a, b in itertools.pairwise(renewals)]
    # Every quarter of the 1 s lease; a loaded machine wakes the loop late, but a keeper that
    # renewed later than 3/4 of it would have stopped leading
    assert all(0.2 <= gap < lease.timing.give_up_s for gap in gaps), gaps


def test_a_leader_that_cannot_renew_stops_before_its_lease_expires() -> None:
    lease = _ScriptedLease([1], [FerryError("no answer")] * 10)
    led, lost, took_s = _keep(lease)
    assert led == [1]
    [why] = lost
    assert why.startswith("no renewal for "), why
    # Renewals tried every quarter of the 1 s lease (not in a tight loop); at three quarters
    # there is no time left to try again: stopped.
    assert [what for what, _ in lease.asked] == ["take"] + ["renew"] * 2
    assert 0.75 <= took_s < 1.5, took_s
