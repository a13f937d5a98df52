"""The scheduler of many moves: which move starts when, with how much of its links.

A sans-I/O state machine (as h11's connection): a :class:`Dispatcher` is told that time
began and that moves finished, at instants its caller gives it, and answers with actions
(start this move with this bandwidth cap, change that move's cap). It never reads a clock and
never touches a host: :mod:`vmferry.core.job` drives it against predicted moves (a plan and
its ETA) or against the simulator's model of pre-copy, and the controller drives it against
real ones.

:class:`BandwidthDispatcher` is vmferry's policy:

* **order**: longest and hardest first (LPT list scheduling): by predicted duration at the
  most bandwidth the move can use, times ``1 + risk`` where risk is the share of that
  bandwidth it needs to converge and meet its goal (:class:`~vmferry.core.move_cost.MoveNeed`).
* **shares**: each move runs under a bandwidth cap reserved on its source's and its
  destination's links; a move starts only when both links have at least the share at which it
  is safe left (and a sixteenth of its source link: tiny shares only lengthen the tail), and
  it gets as much as it can use up to what is free. So a link is shared only while each move
  on it still converges and meets its goal. When a move ends, the moves still running on its
  links are topped up first (fewer moves at higher rates re-send less), then new ones start.
* **backfill**: when the next move of a source does not fit yet, a later one may start only
  if it is predicted to end before the head's turn comes, or uses capacity the head will not
  need then (EASY backfilling): the hard moves are not starved by a stream of small ones.
* **pipelining**: a move sets up (destination started, zero pages scanned) before it needs
  bandwidth, so it may start that long before the moves it takes over from are predicted to
  end; the dispatcher asks to be woken then (:attr:`Dispatcher.wake_s`).
* **limits**: each host's outbound and inbound limits, at every instant.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from vmferry.core.cluster_model import Cluster, HostName, Move, VmName
from vmferry.core.errors import ConfigError
from vmferry.core.move_cost import CostBook, MoveNeed, Planned

__all__ = [
    "Action",
    "BandwidthDispatcher",
    "Dispatcher",
    "SetCap",
    "Slots",
    "Start",
]

# A move is not started on less than this share of its source's link (unless it can use no
# more): a trickle only stretches the tail of the schedule.
MIN_LINK_FRACTION = 1.0 / 16.0
# How far down a source's queue a free slot looks for a move that fits.
LOOKAHEAD = 64
# A top-up smaller than this factor of the current cap is not worth a change.
_TOP_UP_MIN = 1.05
_EPS_S = 1e-6

_Link = tuple[Literal["out", "in"], HostName]


@dataclass(frozen=True, slots=True)
class Start:
    """Start ``move`` as ``strategy``, its bandwidth capped at ``cap_bps`` (None: uncapped,
    the links are shared evenly among the moves on them)."""

    move: Move
    cap_bps: float | None
    strategy: Planned = "precopy"


@dataclass(frozen=True, slots=True)
class SetCap:
    """Change the bandwidth cap of a running move."""

    vm: VmName
    cap_bps: float


Action = Start | SetCap


class Dispatcher(Protocol):
    """A scheduling policy's state machine (see the module docs)."""

    name: str

    def begin(self, now_s: float) -> list[Action]:
        """The job starts at ``now_s``: what to start."""
        ...

    def finished(self, vm: VmName, now_s: float) -> list[Action]:
        """``vm``'s move ended at ``now_s`` (done or failed): what to do next."""
        ...

    def tick(self, now_s: float) -> list[Action]:
        """The time it asked to be woken at (:attr:`wake_s`) has come."""
        ...

    @property
    def wake_s(self) -> float | None:
        """When it wants :meth:`tick` called next, if ever (whatever else happens)."""
        ...

    @property
    def waiting(self) -> int:
        """Moves not started yet."""
        ...


class Slots:
    """Moves in flight per host, against each host's outbound and inbound limits."""

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
class _Entry:
    move: Move
    need: MoveNeed
    key: float  # smaller first
    floor_bps: float  # the least it is started with
    setup_s: float  # predicted time before it uses its links
    started: bool = False


@dataclass(slots=True)
class _Flight:
    """A running move as predicted: it sets up, then transfers for the predictor's total at
    its cap less the setup (as :class:`vmferry.core.job.PredictedFlow` runs it)."""

    entry: _Entry
    cap_bps: float
    setup_end_s: float
    transfer_s: float  # at cap_bps
    since_s: float
    done: float = 0.0  # of the transfer, at since_s

    def end_s(self) -> float:
        return max(self.since_s, self.setup_end_s) + (1.0 - self.done) * self.transfer_s

    def advance(self, now_s: float) -> None:
        busy_s = now_s - max(self.since_s, self.setup_end_s)
        if busy_s > 0.0:
            self.done = min(1.0, self.done + busy_s / self.transfer_s)
        self.since_s = max(self.since_s, now_s)


@dataclass(slots=True)
class _Shadow:
    """A blocked head's turn: when its source link frees enough for it, and how much more
    than it needs will be free then (backfilled moves may use that)."""

    at_s: float
    extra_bps: float


@dataclass(slots=True)
class _Queues:
    by_source: dict[HostName, list[_Entry]] = field(default_factory=dict)
    first: dict[HostName, int] = field(default_factory=dict)  # first not started

    def unstarted(self, source: HostName) -> Iterable[_Entry]:
        queue, start = self.by_source.get(source, []), self.first.get(source, 0)
        while start < len(queue) and queue[start].started:
            start += 1
        self.first[source] = start
        for entry in queue[start : start + LOOKAHEAD]:
            if not entry.started:
                yield entry


class BandwidthDispatcher:
    """vmferry's scheduler (see the module docs).

    Args:
        cluster: hosts (links, limits) and VMs.
        moves: the moves of the job.
        book: predictions of each move at a share.
        stream_bps: the most one migration stream carries (one QEMU migration thread).

    Raises:
        UnknownHost, ConfigError: see :func:`check_moves`.
    """

    name = "ours"

    def __init__(
        self, cluster: Cluster, moves: Sequence[Move], book: CostBook, *, stream_bps: float
    ) -> None:
        check_moves(cluster, moves)
        self._book = book
        self._link = {h.name: float(h.link_bps) for h in cluster.hosts}
        self._free: dict[_Link, float] = {}
        for name, rate in self._link.items():
            self._free[("out", name)] = self._free[("in", name)] = rate
        self._slots = Slots(cluster)
        self._queues = _Queues()
        self._flights: dict[VmName, _Flight] = {}
        self._on: dict[_Link, set[VmName]] = {}
        self._waiting_on: dict[HostName, set[HostName]] = {}
        self._wakes: list[tuple[float, HostName]] = []
        self._wake_of: dict[HostName, float] = {}
        self._left = len(moves)
        entries = [self._entry(m, stream_bps) for m in moves]
        for entry in sorted(entries, key=lambda e: (e.key, e.move.name)):
            self._queues.by_source.setdefault(entry.move.source, []).append(entry)

    def _entry(self, move: Move, stream_bps: float) -> _Entry:
        link_bps = min(self._link[move.source], self._link[move.destination])
        least_bps = self._link[move.source] * MIN_LINK_FRACTION
        need = self._book.need(move.vm, min(stream_bps, link_bps), least_bps)
        floor_bps = min(need.max_bps, max(need.need_bps, least_bps))
        key = -need.best.total_s * (1.0 + need.risk)
        return _Entry(move, need, key, floor_bps, self._book.setup_s(move.vm))

    @property
    def waiting(self) -> int:
        return self._left

    @property
    def wake_s(self) -> float | None:
        while self._wakes and self._wake_of.get(self._wakes[0][1]) != self._wakes[0][0]:
            heapq.heappop(self._wakes)  # superseded
        return self._wakes[0][0] if self._wakes else None

    def needs(self) -> dict[VmName, MoveNeed]:
        """Every move's need (strategy, least safe share, most it can use)."""
        return {e.move.name: e.need for q in self._queues.by_source.values() for e in q}

    def begin(self, now_s: float) -> list[Action]:
        actions: list[Action] = []
        heads = sorted(
            (queue[0].key, source) for source, queue in self._queues.by_source.items() if queue
        )
        for _, source in heads:
            actions += self._dispatch(source, now_s)
        return actions

    def tick(self, now_s: float) -> list[Action]:
        actions: list[Action] = []
        while (due := self.wake_s) is not None and due <= now_s + _EPS_S:
            _, source = heapq.heappop(self._wakes)
            del self._wake_of[source]
            actions += self._dispatch(source, now_s)
        return actions

    def finished(self, vm: VmName, now_s: float) -> list[Action]:
        flight = self._flights.pop(vm, None)
        if flight is None:
            raise ConfigError(f"{vm} is not a running move of this job")
        move = flight.entry.move
        self._slots.give_back(move)
        for link in _links(move):
            self._free[link] += flight.cap_bps
            self._on[link].discard(vm)
        actions: list[Action] = []
        for link in _links(move):
            actions += self._top_up(link, now_s)
        sources = [move.source, *sorted(self._waiting_on.pop(move.destination, set()))]
        for source in dict.fromkeys(sources):
            actions += self._dispatch(source, now_s)
        return actions

    def _top_up(self, link: _Link, now_s: float) -> list[Action]:
        """Raise the caps of the moves on ``link`` towards the most they can use, hardest
        first, with what is free on both their links."""
        actions: list[Action] = []
        running = [self._flights[vm] for vm in self._on.get(link, ())]
        for flight in sorted(running, key=lambda f: (f.entry.key, f.entry.move.name)):
            move = flight.entry.move
            room = min(self._free[link] for link in _links(move))
            cap = min(flight.entry.need.max_bps, flight.cap_bps + room)
            if cap < flight.cap_bps * _TOP_UP_MIN:
                continue
            flight.advance(now_s)
            for each in _links(move):
                self._free[each] -= cap - flight.cap_bps
            flight.cap_bps = cap
            flight.transfer_s = self._transfer_s(flight.entry, cap)
            actions.append(SetCap(move.name, cap))
        return actions

    def _available(self, link: _Link, at_s: float) -> float:
        """What ``link`` has free at ``at_s``: free now, plus the caps of the moves on it
        predicted to end by then."""
        ending = (self._flights[vm] for vm in self._on.get(link, ()))
        return self._free[link] + sum(f.cap_bps for f in ending if f.end_s() <= at_s)

    def _dispatch(self, source: HostName, now_s: float) -> list[Action]:
        """Start what fits on ``source``, in its queue's order, backfilling around a head
        that does not fit yet. A move sets up without using its links, so it may start when
        the links will have its share once its setup is over (moves predicted to end by then
        hand theirs over)."""
        self._wake_of.pop(source, None)
        actions: list[Action] = []
        shadow: _Shadow | None = None
        for entry in list(self._queues.unstarted(source)):
            if not self._slots.has_out(source):
                break
            target = entry.move.destination
            if not self._slots.has_in(target):
                self._waiting_on.setdefault(target, set()).add(source)
                continue
            ready_s = now_s + entry.setup_s
            free_in = self._available(("in", target), ready_s)
            offer = min(entry.need.max_bps, self._available(("out", source), ready_s), free_in)
            if offer < entry.floor_bps:
                if free_in < entry.floor_bps:
                    self._waiting_on.setdefault(target, set()).add(source)
                elif shadow is None:
                    shadow = self._shadow(source, entry, now_s)
                continue
            transfer_s = self._transfer_s(entry, offer)
            if shadow is not None and ready_s + transfer_s > shadow.at_s:
                if offer > shadow.extra_bps:
                    continue
                shadow.extra_bps -= offer
            actions.append(self._start(entry, offer, transfer_s, now_s))
        return actions

    def _shadow(self, source: HostName, head: _Entry, now_s: float) -> _Shadow:
        """When ``head`` gets its share of ``source``'s link, and wake up to start it its
        setup time before that."""
        free = self._free[("out", source)]
        running = sorted(
            (self._flights[vm] for vm in self._on.get(("out", source), ())),
            key=lambda f: f.end_s(),
        )
        for flight in running:
            free += flight.cap_bps
            if free >= head.floor_bps:
                at_s = max(now_s, flight.end_s())
                wake_s = at_s - head.setup_s
                if wake_s > now_s + _EPS_S:
                    self._wake_of[source] = wake_s
                    heapq.heappush(self._wakes, (wake_s, source))
                return _Shadow(at_s, free - head.floor_bps)
        return _Shadow(now_s, 0.0)

    def _start(self, entry: _Entry, cap_bps: float, transfer_s: float, now_s: float) -> Start:
        move = entry.move
        entry.started = True
        self._left -= 1
        self._slots.take(move)
        self._flights[move.name] = _Flight(
            entry, cap_bps, now_s + entry.setup_s, transfer_s, now_s
        )
        for link in _links(move):
            self._free[link] -= cap_bps
            self._on.setdefault(link, set()).add(move.name)
        return Start(move, cap_bps, entry.need.strategy)

    def _transfer_s(self, entry: _Entry, cap_bps: float) -> float:
        """The predicted time of ``entry``'s transfer at ``cap_bps`` (its total less its
        setup)."""
        total_s = self._book.cost(entry.move.vm, cap_bps, entry.need.strategy).total_s
        return max(1e-3, total_s - entry.setup_s)


def _links(move: Move) -> tuple[_Link, _Link]:
    return ("out", move.source), ("in", move.destination)
