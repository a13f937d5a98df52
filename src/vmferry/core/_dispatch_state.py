"""Bookkeeping shared by the dispatchers of :mod:`vmferry.core.schedule`: moves in flight
per host against its limits, the input checks, link sharing, and the records of vmferry's
dispatcher (queued moves, moves in flight as predicted)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from vmferry.core.cluster_model import Cluster, HostName, Move, VmName
from vmferry.core.errors import ConfigError
from vmferry.core.move_cost import MoveNeed, Planned

__all__ = ["Entry", "Flight", "Link", "Queues", "Slots", "check_moves", "links_of", "water_fill"]

Link = tuple[Literal["out", "in"], HostName]
# How far down a source's queue a free slot looks for a move that fits.
LOOKAHEAD = 64
EPS_S = 1e-6
# A move's measured rate: smoothed over samples with this weight for the newest; judged only
# after it has sent for this long at its cap (QEMU's rate limiter takes a moment to follow).
RATE_WEIGHT = 0.3
HELD_AFTER_S = 3.0
# Held: sending under this share of its cap (its guest or the host's CPU holds it back); no
# longer held above the second share. What a held move uses is its rate with a margin.
HELD_BELOW = 0.75
FREED_ABOVE = 0.9
HELD_MARGIN = 1.15


def links_of(move: Move) -> tuple[Link, Link]:
    """The source's outbound side and the destination's inbound side."""
    return ("out", move.source), ("in", move.destination)


def water_fill(demands: Iterable[tuple[VmName, float]], capacity: float) -> dict[VmName, float]:
    """Share ``capacity`` among flows: an even share each, and what a flow demands less than
    its share goes to the others."""
    ordered = sorted(demands, key=lambda item: item[1])
    left, shares = capacity, {}
    for done, (vm, demand) in enumerate(ordered):
        give = max(0.0, min(demand, left / (len(ordered) - done)))
        shares[vm] = give
        left -= give
    return shares


class Slots:
    """Moves in flight per host, against each host's outbound and inbound limits (and a
    policy's own, when lower)."""

    def __init__(
        self, cluster: Cluster, *, outbound: int | None = None, inbound: int | None = None
    ) -> None:
        self.max_out = {
            h.name: h.max_outbound if outbound is None else min(outbound, h.max_outbound)
            for h in cluster.hosts
        }
        self.max_in = {
            h.name: h.max_inbound if inbound is None else min(inbound, h.max_inbound)
            for h in cluster.hosts
        }
        self.out = dict.fromkeys(self.max_out, 0)
        self.inn = dict.fromkeys(self.max_in, 0)
        self.total = 0

    def has_out(self, host: HostName) -> bool:
        return self.out[host] < self.max_out[host]

    def has_in(self, host: HostName) -> bool:
        return self.inn[host] < self.max_in[host]

    def take(self, move: Move) -> None:
        self.out[move.source] += 1
        self.inn[move.destination] += 1
        self.total += 1

    def give_back(self, move: Move) -> None:
        self.out[move.source] -= 1
        self.inn[move.destination] -= 1
        self.total -= 1


def check_moves(cluster: Cluster, moves: Sequence[Move]) -> None:
    """Refuse moves to or from unknown hosts, to their own host, or a VM moved twice.

    Raises:
        UnknownHost: a host is not in the cluster.
        ConfigError: a move to its own host, or a VM in two moves.
    """
    seen: set[VmName] = set()
    for move in moves:
        cluster.host(move.source)
        cluster.host(move.destination)
        if move.source == move.destination:
            raise ConfigError(f"{move.name} already runs on {move.destination}")
        if move.name in seen:
            raise ConfigError(f"{move.name} is in two moves")
        seen.add(move.name)


@dataclass(slots=True)
class Entry:
    """A move of vmferry's dispatcher, queued or started. Its need (the least safe share)
    costs several predictions: it is looked up only once a share under the most it can use
    is considered for it (``need`` None until then)."""

    move: Move
    strategy: Planned
    max_bps: float  # the most it can use
    least_bps: float  # no share under this is considered
    key: float  # smaller first
    setup_s: float  # predicted time before it uses its links
    need: MoveNeed | None = None
    started: bool = False


@dataclass(slots=True)
class Flight:
    """A running move as predicted: it sets up, then transfers for the predictor's total at
    its cap less the setup (as :class:`vmferry.core.job.PredictedFlow` runs it); once a real
    move reports its progress, ``seen_end_s`` is when that says it ends, and a move that sends
    well below its cap for a while is ``held`` (what it leaves unused is re-shared).

    ``reserve_bps`` is the share it was admitted with (at least its safe share); ``cap_bps``
    the cap in force: the reservation, plus a part of what the moves on its links leave
    unused while they set up or cannot use more."""

    entry: Entry
    reserve_bps: float
    cap_bps: float
    setup_end_s: float
    transfer_s: float  # at cap_bps
    since_s: float
    done: float = 0.0  # of the transfer, at since_s
    seen_end_s: float | None = None  # when its progress says it ends (None: not seen yet)
    seen_bps: float | None = None  # its measured rate, smoothed, since seen_since_s
    seen_since_s: float | None = None
    held: bool = False
    # The moves whose shares it was started on while they still ran: until they have sent their
    # last byte, it sends only what the others on its links leave it.
    lenders: frozenset[VmName] = frozenset()
    released: bool = False  # it sent its last byte: its links are handed over

    def is_active(self, now_s: float) -> bool:
        """Set up: it uses its links."""
        return now_s >= self.setup_end_s - EPS_S

    def end_s(self) -> float:
        return max(self.since_s, self.setup_end_s) + (1.0 - self.done) * self.transfer_s

    def expected_end_s(self) -> float:
        """When it ends: as its progress says once it has reported, as predicted until then."""
        return self.end_s() if self.seen_end_s is None else self.seen_end_s

    def observe_rate(self, now_s: float, rate_bps: float) -> bool:
        """Take a measured rate; returns whether :attr:`held` changed."""
        if self.seen_bps is None or self.seen_since_s is None:
            self.seen_bps, self.seen_since_s = rate_bps, now_s
        else:
            self.seen_bps += RATE_WEIGHT * (rate_bps - self.seen_bps)
        if now_s - self.seen_since_s < HELD_AFTER_S:
            return False
        held = self.seen_bps < (FREED_ABOVE if self.held else HELD_BELOW) * self.cap_bps
        changed, self.held = held != self.held, held
        return changed

    def recapped(self, cap_bps: float) -> None:
        """Its cap changed: its rate is judged afresh against the new one."""
        self.cap_bps = cap_bps
        self.seen_bps = self.seen_since_s = None

    def used_bps(self) -> float:
        """What it uses of its links: its reservation, or less while it is held."""
        if self.held and self.seen_bps is not None:
            return min(self.reserve_bps, self.seen_bps * HELD_MARGIN)
        return self.reserve_bps

    def advance(self, now_s: float) -> None:
        busy_s = now_s - max(self.since_s, self.setup_end_s)
        if busy_s > 0.0:
            self.done = min(1.0, self.done + busy_s / self.transfer_s)
        self.since_s = max(self.since_s, now_s)


@dataclass(slots=True)
class Queues:
    """Each source's queued moves, in the dispatcher's order."""

    by_source: dict[HostName, list[Entry]] = field(default_factory=dict)
    first: dict[HostName, int] = field(default_factory=dict)  # first not started

    def unstarted(self, source: HostName) -> list[Entry]:
        """The first :data:`LOOKAHEAD` moves of ``source`` not started yet."""
        queue, start = self.by_source.get(source, []), self.first.get(source, 0)
        while start < len(queue) and queue[start].started:
            start += 1
        self.first[source] = start
        return [e for e in queue[start : start + LOOKAHEAD] if not e.started]
