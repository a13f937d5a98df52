"""The scheduler of many moves: which move starts when, with how much of its links.

A sans-I/O state machine (as h11's connection): a :class:`Dispatcher` is told that time
began and that moves finished, at instants its caller gives it, and answers with actions
(start this move with this bandwidth cap, change that move's cap). It never reads a clock and
never touches a host: :mod:`vmferry.core.job` drives it against predicted moves (a plan and
its ETA) or against the simulator's model of pre-copy, and the controller drives it against
real ones.

:class:`BandwidthDispatcher` is vmferry's policy:

* **strategy**: each move's, chosen by the cost book at the most bandwidth it can use
  (:meth:`~vmferry.core.move_cost.CostBook.choose`): the safe one of pre-copy and multifd
  (zstd) that needs the least time, else hybrid; ``strategies`` narrows the choice (pre-copy
  and hybrid only: what vmferry planned before it compressed).
* **order**: longest and hardest first (LPT list scheduling): by predicted duration at the
  most bandwidth the move can use, times ``1 + risk`` where risk is the share of that
  bandwidth it needs to converge and meet its goal (:class:`~vmferry.core.move_cost.MoveNeed`).
* **shares**: each move reserves a share of its source's and its destination's links; a move
  starts only when both links have at least the share at which it is safe left (and a
  sixteenth of its source link: tiny shares only lengthen the tail), and it reserves as much
  as it can use up to what is free. So a link is shared only while each move on it still
  converges and meets its goal. When a move ends, the moves still running on its links are
  topped up first (fewer moves at higher rates re-send less), then new ones start.
* **caps**: each move's bandwidth is capped at its reservation plus an even part of what the
  moves on its links leave unused (while they set up, or beyond the most they can use), so no
  link idles while a move could use it; when a move that was setting up starts sending, the
  others fall back towards their reservations (:class:`SetCap`).
* **backfill**: when the next move of a source does not fit yet, a later one may start only
  if it is predicted to end before the head's turn comes, or uses capacity the head will not
  need then (EASY backfilling): the hard moves are not starved by a stream of small ones.
* **pipelining**: a move sets up (destination started, zero pages scanned) before it needs
  bandwidth, so it may start that long before the moves it takes over from are predicted to
  end; the dispatcher asks to be woken then (:attr:`Dispatcher.wake_s`). Until those moves
  have sent their last byte (:meth:`Dispatcher.released`) it sends only what they leave.
* **limits**: each host's outbound and inbound limits, at every instant.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from vmferry.core._dispatch_state import (
    EPS_S,
    Entry,
    Flight,
    Link,
    Queues,
    Slots,
    check_moves,
    links_of,
    water_fill,
)
from vmferry.core.cluster_model import Cluster, HostName, Move, VmName
from vmferry.core.errors import ConfigError
from vmferry.core.move_cost import PLANNED, CostBook, MoveNeed, Planned

__all__ = [
    "Action",
    "BandwidthDispatcher",
    "Dispatcher",
    "SetCap",
    "Slots",
    "Start",
    "check_moves",
]

# A move is not started on less than this share of its source's link (unless it can use no
# more): a trickle only stretches the tail of the schedule.
MIN_LINK_FRACTION = 1.0 / 16.0
# A top-up smaller than this factor of the current reservation is not worth a change.
_TOP_UP_MIN = 1.05
# Nor a cap that moves by less than this share.
_RECAP_MIN = 0.02
# A move's progress moves its source's next wake-up earlier only by more than this.
_REWAKE_MIN_S = 0.25


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

    def released(self, vm: VmName, now_s: float) -> list[Action]:
        """``vm``'s move sent its last byte at ``now_s`` (QEMU completed; the guest is being
        checked on its destination): its links are free, its hosts' slots not yet."""
        ...

    def tick(self, now_s: float) -> list[Action]:
        """The time it asked to be woken at (:attr:`wake_s`) has come."""
        ...

    def progress(
        self, vm: VmName, now_s: float, left_s: float | None, rate_bps: float | None = None
    ) -> list[Action]:
        """``vm``'s move reported at ``now_s`` that it needs ``left_s`` more (None: no
        estimate yet, or it does not converge at its rate) and sends at ``rate_bps`` (None:
        it does not send its RAM yet): what to change."""
        ...

    @property
    def wake_s(self) -> float | None:
        """When it wants :meth:`tick` called next, if ever (whatever else happens)."""
        ...

    @property
    def waiting(self) -> int:
        """Moves not started yet."""
        ...


@dataclass(slots=True)
class _Shadow:
    """A blocked head's turn: when its source link frees enough for it, and how much more
    than it needs will be free then (backfilled moves may use that)."""

    at_s: float
    extra_bps: float


class BandwidthDispatcher:
    """vmferry's scheduler (see the module docs).

    Args:
        cluster: hosts (links, limits) and VMs.
        moves: the moves of the job.
        book: predictions of each move at a share.
        stream_bps: the most one migration stream carries (one QEMU migration thread).
        strategies: what moves may run as (see the module docs).
        name: the policy's name in reports.

    Raises:
        UnknownHost, ConfigError: see :func:`check_moves`.
    """

    def __init__(
        self,
        cluster: Cluster,
        moves: Sequence[Move],
        book: CostBook,
        *,
        stream_bps: float,
        strategies: Sequence[Planned] = PLANNED,
        name: str = "ours",
    ) -> None:
        check_moves(cluster, moves)
        self.name = name
        self._book = book
        self._strategies = tuple(strategies)
        self._link = {h.name: float(h.link_bps) for h in cluster.hosts}
        self._free: dict[Link, float] = {}  # not reserved
        for name, rate in self._link.items():
            self._free[("out", name)] = self._free[("in", name)] = rate
        self._extra: dict[Link, dict[VmName, float]] = {}
        self._slots = Slots(cluster)
        self._queues = Queues()
        self._flights: dict[VmName, Flight] = {}
        self._on: dict[Link, set[VmName]] = {}
        self._waiting_on: dict[HostName, set[HostName]] = {}
        # Wake-ups: (when, order, what, whose); valid while _wake_of says so (a source's
        # pipelined start) or the flight still sets up until then (a setup's end).
        self._wakes: list[tuple[float, int, str, str]] = []
        self._wake_of: dict[HostName, float] = {}
        self._seq = itertools.count()
        self._left = len(moves)
        entries = [self._entry(m, stream_bps) for m in moves]
        for entry in sorted(entries, key=lambda e: (e.key, e.move.name)):
            self._queues.by_source.setdefault(entry.move.source, []).append(entry)

    def _entry(self, move: Move, stream_bps: float) -> Entry:
        """A queued move, as the strategy the book chooses at the most it can use; ordered by
        its predicted duration there, times ``1 + risk`` (the inverse of its dirty-rate
        headroom there)."""
        max_bps = min(stream_bps, self._link[move.source], self._link[move.destination])
        least_bps = self._link[move.source] * MIN_LINK_FRACTION
        setup_s = self._book.setup_s(move.vm)
        best = self._book.choose(move.vm, max_bps, self._strategies)
        if best.safe and best.strategy != "hybrid":  # the need waits for a smaller share
            usable = self._book.usable_bps(move.vm, best.strategy, max_bps)
            key = -best.total_s * (1 + best.risk)
            return Entry(move, best.strategy, usable, least_bps, key, setup_s)
        need = self._book.need(move.vm, max_bps, least_bps, self._strategies)
        key = -need.best.total_s * (1.0 + need.risk)
        return Entry(move, need.strategy, max_bps, least_bps, key, setup_s, need)

    def _is_enough(self, entry: Entry, offer_bps: float) -> bool:
        """Whether ``entry`` may start with ``offer_bps``: all it can use, or at least a
        sixteenth of its source's link where it is safe (one prediction, which also gives
        its duration there; the least safe share itself is looked up only when needed)."""
        if offer_bps >= entry.max_bps:
            return True
        if offer_bps < entry.least_bps:
            return False
        if entry.need is not None:
            return offer_bps >= self._floor(entry)
        return self._book.cost(entry.move.vm, offer_bps, entry.strategy).safe

    def _floor(self, entry: Entry) -> float:
        """The least share ``entry`` starts with: its safe share, and a sixteenth of its
        source's link (unless it can use no more)."""
        if entry.need is None:  # its strategy is safe at the most it can use
            vm = entry.move.vm
            entry.need = self._book.need(vm, entry.max_bps, entry.least_bps, (entry.strategy,))
        return min(entry.max_bps, max(entry.need.need_bps, entry.least_bps))

    @property
    def waiting(self) -> int:
        return self._left

    @property
    def wake_s(self) -> float | None:
        while self._wakes and not self._is_due_valid(self._wakes[0]):
            heapq.heappop(self._wakes)
        return self._wakes[0][0] if self._wakes else None

    def _is_due_valid(self, wake: tuple[float, int, str, str]) -> bool:
        at_s, _, what, whose = wake
        if what == "source":
            return self._wake_of.get(HostName(whose)) == at_s
        flight = self._flights.get(VmName(whose))
        return flight is not None and flight.setup_end_s == at_s

    def needs(self) -> dict[VmName, MoveNeed]:
        """Every move's need (strategy, least safe share, most it can use)."""
        for queue in self._queues.by_source.values():
            for entry in queue:
                self._floor(entry)
        return {
            e.move.name: e.need
            for q in self._queues.by_source.values()
            for e in q
            if e.need is not None
        }

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
        links: list[Link] = []
        while (due := self.wake_s) is not None and due <= now_s + EPS_S:
            _, _, what, whose = heapq.heappop(self._wakes)
            if what == "source":
                del self._wake_of[HostName(whose)]
                actions += self._dispatch(HostName(whose), now_s)
            else:  # a move starts sending: the others on its links make room
                links += links_of(self._flights[VmName(whose)].entry.move)
        return actions + self._recap(links, now_s)

    def progress(
        self, vm: VmName, now_s: float, left_s: float | None, rate_bps: float | None = None
    ) -> list[Action]:
        """Learn from ``vm``'s progress when its move will really end and what it really
        sends. A move runs late when its guest or the host's CPU holds it below its cap: its
        links are then not handed over at its predicted end (:meth:`_available`), and a move
        that does not converge at its rate (``left_s`` None after an estimate) keeps them
        until it ends. A move held well below its cap for a while leaves the rest of its
        share to the moves on its links (their caps rise), until it speeds up again."""
        flight = self._flights.get(vm)
        if flight is None:
            return []
        actions: list[Action] = []
        if (
            rate_bps is not None
            and flight.is_active(now_s)
            and flight.observe_rate(now_s, rate_bps)
        ):
            actions = self._recap(links_of(flight.entry.move), now_s)
        if left_s is None:
            if flight.seen_end_s is not None:
                flight.seen_end_s = math.inf
            return actions
        flight.seen_end_s = now_s + max(0.0, left_s)
        source = flight.entry.move.source
        wake_s, queue = self._wake_of.get(source), self._queues.unstarted(source)
        if wake_s is not None and queue:  # it ends sooner than its source's head was told
            sooner_s = max(now_s, flight.seen_end_s - queue[0].setup_s)
            if sooner_s < wake_s - _REWAKE_MIN_S:
                self._wake_of[source] = sooner_s
                heapq.heappush(self._wakes, (sooner_s, next(self._seq), "source", source))
        return actions

    def finished(self, vm: VmName, now_s: float) -> list[Action]:
        flight = self._flights.pop(vm, None)
        if flight is None:
            raise ConfigError(f"{vm} is not a running move of this job")
        move = flight.entry.move
        self._slots.give_back(move)
        touched = [] if flight.released else self._hand_over(flight)
        return self._dispatch_freed(move, now_s, slot_held=False) + self._recap(touched, now_s)

    def released(self, vm: VmName, now_s: float) -> list[Action]:
        flight = self._flights.get(vm)
        if flight is None or flight.released:
            return []
        touched = self._hand_over(flight)
        flight.released = True
        move = flight.entry.move
        return self._dispatch_freed(move, now_s, slot_held=True) + self._recap(touched, now_s)

    def _dispatch_freed(self, move: Move, now_s: float, *, slot_held: bool) -> list[Action]:
        """Dispatch ``move``'s source and the sources waiting on its destination, now that
        its links (and, unless ``slot_held``, its hosts' slots) are free."""
        actions: list[Action] = []
        sources = [move.source, *sorted(self._waiting_on.pop(move.destination, set()))]
        for source in dict.fromkeys(sources):
            if not slot_held or self._slots.has_out(source):
                actions += self._dispatch(source, now_s)
        return actions

    def _hand_over(self, flight: Flight) -> list[Link]:
        """Give ``flight``'s shares of its links back, topping up the moves on them; the links
        whose moves' caps change."""
        vm, move = flight.entry.move.name, flight.entry.move
        touched: list[Link] = list(links_of(move))
        for link in touched:
            self._free[link] += flight.reserve_bps
            self._on[link].discard(vm)
            self._extra.get(link, {}).pop(vm, None)
        for link in links_of(move):
            self._top_up(link, touched)
        return touched

    def _top_up(self, link: Link, touched: list[Link]) -> None:
        """Raise the reservations of the moves on ``link`` towards the most they can use,
        hardest first, with what is free on both their links (their caps follow in
        :meth:`_recap`)."""
        running = [self._flights[vm] for vm in self._on.get(link, ())]
        for flight in sorted(running, key=lambda f: (f.entry.key, f.entry.move.name)):
            move = flight.entry.move
            room = min(self._free[each] for each in links_of(move))
            reserve = min(flight.entry.max_bps, flight.reserve_bps + room)
            if reserve < flight.reserve_bps * _TOP_UP_MIN:
                continue
            for each in links_of(move):
                self._free[each] -= reserve - flight.reserve_bps
            flight.reserve_bps = reserve
            touched += links_of(move)

    def _recap(self, links: Iterable[Link], now_s: float) -> list[Action]:
        """Cap every move on ``links`` at its reservation plus its part of what the moves
        sending on both its links leave unused (a held move gets no part: it cannot use it)."""
        touched = sorted({vm for link in links for vm in self._on.get(link, ())})
        for link in dict.fromkeys(
            x for vm in touched for x in links_of(self._flights[vm].entry.move)
        ):
            sending = [self._flights[vm] for vm in self._on.get(link, ())]
            sending = [f for f in sending if f.is_active(now_s)]
            slack = self._link[link[1]] - sum(f.used_bps() for f in sending)
            wants = (
                (f.entry.move.name, 0.0 if f.held else f.entry.max_bps - f.reserve_bps)
                for f in sending
            )
            self._extra[link] = water_fill(wants, max(0.0, slack))
        actions: list[Action] = []
        for vm in touched:
            flight = self._flights[vm]
            out_link, in_link = links_of(flight.entry.move)
            extra = min(self._extra[out_link].get(vm, 0.0), self._extra[in_link].get(vm, 0.0))
            cap = min(flight.reserve_bps + extra, self._gate(flight, now_s))
            if abs(cap - flight.cap_bps) <= flight.cap_bps * _RECAP_MIN:
                continue
            flight.advance(now_s)
            flight.recapped(cap)
            flight.transfer_s = self._transfer_s(flight.entry, cap)
            actions.append(SetCap(vm, cap))
        return actions

    def _gate(self, flight: Flight, now_s: float) -> float:
        """The most ``flight`` may send while a move it was started on the share of still
        sends: what the moves sending on its links leave, at least a trickle (its least share).

        That move's last pass (QEMU's stop-and-copy, multifd's flush) must have the link to
        itself until it has sent its last byte (:meth:`released`). Evacuation lab, 30 Nov:
        moves whose successor started sending at their measured end paused 279-300 ms against
        a ~170 ms limit (their guests felt 353-375 ms of 300)."""
        if not any(v in self._flights and not self._flights[v].released for v in flight.lenders):
            flight.lenders = frozenset()
            return math.inf
        vm = flight.entry.move.name
        left = min(
            self._link[link[1]]
            - sum(
                self._flights[other].used_bps()
                for other in self._on.get(link, ())
                if other != vm and self._flights[other].is_active(now_s)
            )
            for link in links_of(flight.entry.move)
        )
        return max(flight.entry.least_bps, min(flight.reserve_bps, left))

    def _lenders(self, move: Move, now_s: float, ready_s: float) -> frozenset[VmName]:
        """The moves still running whose shares :meth:`_available` counted for ``move``."""
        return frozenset(
            f.entry.move.name
            for link in links_of(move)
            for f in self._handing_over(link, now_s, ready_s)
        )

    def _handing_over(self, link: Link, now_s: float, at_s: float) -> list[Flight]:
        """The moves on ``link`` expected to end between now and ``at_s`` (as their progress
        says, once they report it). A move already past its end hands nothing over until it
        really ends: it runs slower than expected, and lending its share again would only slow
        every move on the link further."""
        ending = (self._flights[vm] for vm in self._on.get(link, ()))
        return [f for f in ending if now_s < f.expected_end_s() <= at_s + EPS_S]

    def _available(self, link: Link, now_s: float, at_s: float) -> float:
        """What ``link`` has unreserved at ``at_s``: now, plus the reservations of the moves
        handing it over by then (:meth:`_handing_over`)."""
        return self._free[link] + sum(f.reserve_bps for f in self._handing_over(link, now_s, at_s))

    def _dispatch(self, source: HostName, now_s: float) -> list[Action]:
        """Start what fits on ``source``, in its queue's order, backfilling around a head
        that does not fit yet. A move sets up without using its links, so it may start when
        the links will have its share once its setup is over (moves predicted to end by then
        hand theirs over)."""
        self._wake_of.pop(source, None)
        actions: list[Action] = []
        shadow: _Shadow | None = None
        for entry in self._queues.unstarted(source):
            if not self._slots.has_out(source):
                break
            target = entry.move.destination
            if not self._slots.has_in(target):
                self._waiting_on.setdefault(target, set()).add(source)
                continue
            ready_s = now_s + entry.setup_s
            free_out = self._available(("out", source), now_s, ready_s)
            free_in = self._available(("in", target), now_s, ready_s)
            offer = min(entry.max_bps, free_out, free_in)
            if not self._is_enough(entry, offer):
                if free_in < min(entry.max_bps, free_out):
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

    def _shadow(self, source: HostName, head: Entry, now_s: float) -> _Shadow:
        """When ``head`` gets its share of ``source``'s link; asks to be woken its setup time
        before that, to start it then."""
        free = self._free[("out", source)]
        running = sorted(
            (self._flights[vm] for vm in self._on.get(("out", source), ())),
            key=lambda f: f.expected_end_s(),
        )
        for flight in running:
            if math.isinf(flight.expected_end_s()):
                break
            free += flight.reserve_bps
            share = min(head.max_bps, free)
            if self._is_enough(head, share):
                at_s = max(now_s, flight.expected_end_s())
                wake_s = at_s - head.setup_s
                if wake_s > now_s + EPS_S:
                    self._wake_of[source] = wake_s
                    heapq.heappush(self._wakes, (wake_s, next(self._seq), "source", source))
                return _Shadow(at_s, free - share)
        return _Shadow(now_s, 0.0)

    def _start(self, entry: Entry, reserve_bps: float, transfer_s: float, now_s: float) -> Start:
        move = entry.move
        entry.started = True
        self._left -= 1
        self._slots.take(move)
        ready_s = now_s + entry.setup_s
        flight = Flight(entry, reserve_bps, reserve_bps, ready_s, transfer_s, now_s)
        if any(self._free[link] < reserve_bps for link in links_of(move)):
            flight.lenders = self._lenders(move, now_s, ready_s)
            flight.cap_bps = min(reserve_bps, self._gate(flight, now_s))
        self._flights[move.name] = flight
        for link in links_of(move):
            self._free[link] -= reserve_bps
            self._on.setdefault(link, set()).add(move.name)
        heapq.heappush(self._wakes, (flight.setup_end_s, next(self._seq), "setup", move.name))
        return Start(move, flight.cap_bps, entry.strategy)

    def _transfer_s(self, entry: Entry, cap_bps: float) -> float:
        """The predicted time of ``entry``'s transfer at ``cap_bps`` (its total less its
        setup)."""
        total_s = self._book.cost(entry.move.vm, cap_bps, entry.strategy).total_s
        return max(1e-3, total_s - entry.setup_s)
