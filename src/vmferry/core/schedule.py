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
* **limits**: each host's outbound and inbound limits, at every instant.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

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
    started: bool = False


@dataclass(slots=True)
class _Flight:
    entry: _Entry
    cap_bps: float
    since_s: float
    total_s: float  # predicted, at cap_bps
    done: float = 0.0  # predicted fraction done at since_s

    def end_s(self) -> float:
        return self.since_s + (1.0 - self.done) * self.total_s

    def advance(self, now_s: float) -> None:
        if self.total_s > 0.0 and now_s > self.since_s:
            self.done = min(1.0, self.done + (now_s - self.since_s) / self.total_s)
        self.since_s = now_s


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
        self._free_out = dict(self._link)
        self._free_in = dict(self._link)
        self._slots = Slots(cluster)
        self._queues = _Queues()
        self._flights: dict[VmName, _Flight] = {}
        self._by_link: dict[tuple[str, HostName], set[VmName]] = {}
        self._waiting_on: dict[HostName, set[HostName]] = {}
        self._left = len(moves)
        self._done = 0
        entries = [self._entry(m, stream_bps) for m in moves]
        for entry in sorted(entries, key=lambda e: (e.key, e.move.name)):
            self._queues.by_source.setdefault(entry.move.source, []).append(entry)

    def _entry(self, move: Move, stream_bps: float) -> _Entry:
        link_bps = min(self._link[move.source], self._link[move.destination])
        least_bps = self._link[move.source] * MIN_LINK_FRACTION
        need = self._book.need(move.vm, min(stream_bps, link_bps), least_bps)
        floor_bps = min(need.max_bps, max(need.need_bps, least_bps))
        return _Entry(move, need, -need.best.total_s * (1.0 + need.risk), floor_bps)

    @property
    def waiting(self) -> int:
        return self._left - len(self._flights) - self._done

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

    def finished(self, vm: VmName, now_s: float) -> list[Action]:
        flight = self._flights.pop(vm, None)
        if flight is None:
            raise ConfigError(f"{vm} is not a running move of this job")
        move = flight.entry.move
        self._done += 1
        self._slots.give_back(move)
        self._free_out[move.source] += flight.cap_bps
        self._free_in[move.destination] += flight.cap_bps
        self._by_link[("out", move.source)].discard(vm)
        self._by_link[("in", move.destination)].discard(vm)
        actions: list[Action] = []
        actions += self._top_up(("out", move.source), now_s)
        actions += self._top_up(("in", move.destination), now_s)
        sources = [move.source, *sorted(self._waiting_on.pop(move.destination, set()))]
        for source in dict.fromkeys(sources):
            actions += self._dispatch(source, now_s)
        return actions

    def _top_up(self, link: tuple[str, HostName], now_s: float) -> list[Action]:
        """Raise the caps of the moves on ``link`` towards the most they can use, hardest
        first, with what is free on both their links."""
        actions: list[Action] = []
        running = [self._flights[vm] for vm in self._by_link.get(link, ())]
        for flight in sorted(running, key=lambda f: (f.entry.key, f.entry.move.name)):
            move = flight.entry.move
            room = min(self._free_out[move.source], self._free_in[move.destination])
            cap = min(flight.entry.need.max_bps, flight.cap_bps + room)
            if cap < flight.cap_bps * _TOP_UP_MIN:
                continue
            flight.advance(now_s)
            self._free_out[move.source] -= cap - flight.cap_bps
            self._free_in[move.destination] -= cap - flight.cap_bps
            flight.cap_bps = cap
            flight.total_s = self._total_s(flight.entry, cap)
            actions.append(SetCap(move.name, cap))
        return actions

    def _dispatch(self, source: HostName, now_s: float) -> list[Action]:
        """Start what fits on ``source``, in its queue's order, backfilling around a head
        that does not fit yet."""
        actions: list[Action] = []
        shadow: _Shadow | None = None
        for entry in list(self._queues.unstarted(source)):
            if not self._slots.has_out(source):
                break
            target = entry.move.destination
            if not self._slots.has_in(target):
                self._waiting_on.setdefault(target, set()).add(source)
                continue
            offer = min(entry.need.max_bps, self._free_out[source], self._free_in[target])
            if offer < entry.floor_bps:
                if self._free_in[target] < entry.floor_bps:
                    self._waiting_on.setdefault(target, set()).add(source)
                elif shadow is None:
                    shadow = self._shadow(source, entry.floor_bps, now_s)
                continue
            total_s = self._total_s(entry, offer)
            if shadow is not None and now_s + total_s > shadow.at_s:
                if offer > shadow.extra_bps:
                    continue
                shadow.extra_bps -= offer
            actions.append(self._start(entry, offer, total_s, now_s))
        return actions

    def _shadow(self, source: HostName, floor_bps: float, now_s: float) -> _Shadow:
        free = self._free_out[source]
        running = sorted(
            (self._flights[vm] for vm in self._by_link.get(("out", source), ())),
            key=lambda f: f.end_s(),
        )
        for flight in running:
            free += flight.cap_bps
            if free >= floor_bps:
                return _Shadow(max(now_s, flight.end_s()), free - floor_bps)
        return _Shadow(now_s, 0.0)

    def _start(self, entry: _Entry, cap_bps: float, total_s: float, now_s: float) -> Start:
        move = entry.move
        entry.started = True
        self._slots.take(move)
        self._free_out[move.source] -= cap_bps
        self._free_in[move.destination] -= cap_bps
        self._flights[move.name] = _Flight(entry, cap_bps, now_s, total_s)
        self._by_link.setdefault(("out", move.source), set()).add(move.name)
        self._by_link.setdefault(("in", move.destination), set()).add(move.name)
        return Start(move, cap_bps, entry.need.strategy)

    def _total_s(self, entry: _Entry, cap_bps: float) -> float:
        return self._book.cost(entry.move.vm, cap_bps, entry.need.strategy).total_s
