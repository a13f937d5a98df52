"""Moves as flows on links, advanced from event to event: the executor of a modelled job.

Every host has one migration link, the same rate each way. A running move is a flow out of
its source's link and into its destination's; on each link the flows share the capacity by
water-filling (each gets an even share, and what a flow cannot use, under its cap or its
demand, goes to the others), and a flow runs at the smaller of its two links' shares. The
flows' own progress is a :class:`FlowState` (a predicted move, or the simulator's model of
pre-copy): given its rate, it says when its next event is (a phase ends, it finishes) and
handles it. Between events every rate is constant, so the executor jumps from one event to
the next; a start, an end or a changed cap re-shares only the two links it touches.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

from vmferry.core._dispatch_state import water_fill
from vmferry.core.cluster_model import HostName, VmName
from vmferry.core.errors import ConfigError
from vmferry.core.schedule import Start

__all__ = ["Executor", "Finished", "FlowState", "FluidExecutor", "water_fill"]

_Link = tuple[Literal["out", "in"], HostName]


@dataclass(frozen=True, slots=True)
class Finished:
    """A move ended.

    Attributes:
        vm: the VM.
        at_s: when.
        ran_as: how it ran: ``precopy``, ``multifd``, ``hybrid``, ``precopy+postcopy`` (a
            pre-copy that stalled and was switched to post-copy) or ``multifd+hybrid`` (a
            multifd move that stalled, was cancelled and ran again as hybrid).
        felt_ms: the longest stall its guest felt.
        transferred_bytes: what crossed the link.
    """

    vm: VmName
    at_s: float
    ran_as: str
    felt_ms: int
    transferred_bytes: int


class Executor(Protocol):
    """Carries out a dispatcher's actions and reports moves that end."""

    def start(self, action: Start, now_s: float) -> None: ...

    def set_cap(self, vm: VmName, cap_bps: float, now_s: float) -> None: ...

    def next_finished(self, until_s: float = math.inf) -> Finished | None:
        """The next move to end, if one ends by ``until_s`` (a real executor waits until
        then; None: none did, or nothing runs)."""
        ...


class FlowState(Protocol):
    """One move's progress, advanced by :class:`FluidExecutor`."""

    def demand_bps(self) -> float:
        """What it would use now (its cap, a stream's most; 0 while it sets up)."""
        ...

    def set_cap(self, cap_bps: float) -> None: ...

    def advance(self, now_s: float, rate_bps: float) -> None:
        """Progress from its last update to ``now_s`` at ``rate_bps``."""
        ...

    def next_event_s(self, now_s: float, rate_bps: float) -> float:
        """When its next event comes at ``rate_bps`` (inf: never at this rate)."""
        ...

    def on_event(self, now_s: float, rate_bps: float) -> Finished | None:
        """Handle the event due at ``now_s``; a :class:`Finished` when the move ended."""
        ...


@dataclass(slots=True)
class _Live:
    state: FlowState
    source: HostName
    destination: HostName
    rate_bps: float = 0.0
    version: int = 0


class FluidExecutor:
    """Runs flows on the hosts' links (see the module docs).

    Args:
        links: each host's link rate, bytes per second each way.
        make_flow: a new move's :class:`FlowState` from its start action and time.
    """

    def __init__(
        self,
        links: Mapping[HostName, float],
        make_flow: Callable[[Start, float], FlowState],
    ) -> None:
        self._links = links
        self._make = make_flow
        self._flows: dict[VmName, _Live] = {}
        self._members: dict[_Link, set[VmName]] = {}
        self._shares: dict[_Link, dict[VmName, float]] = {}
        self._heap: list[tuple[float, int, VmName, int]] = []
        self._seq = itertools.count()

    def start(self, action: Start, now_s: float) -> None:
        move = action.move
        if move.name in self._flows:
            raise ConfigError(f"{move.name} is already moving")
        live = _Live(self._make(action, now_s), move.source, move.destination)
        self._flows[move.name] = live
        for link in _links_of(live):
            self._members.setdefault(link, set()).add(move.name)
        self._reshare(_links_of(live), now_s, retime=move.name)

    def set_cap(self, vm: VmName, cap_bps: float, now_s: float) -> None:
        live = self._flows[vm]
        live.state.advance(now_s, live.rate_bps)
        live.state.set_cap(cap_bps)
        self._reshare(_links_of(live), now_s, retime=vm)

    def next_finished(self, until_s: float = math.inf) -> Finished | None:
        while self._heap and self._heap[0][0] <= until_s:
            at_s, _, vm, version = heapq.heappop(self._heap)
            live = self._flows.get(vm)
            if live is None or live.version != version:
                continue  # superseded by a later rate change
            live.state.advance(at_s, live.rate_bps)
            result = live.state.on_event(at_s, live.rate_bps)
            if result is None:
                self._reshare(_links_of(live), at_s, retime=vm)
                continue
            del self._flows[vm]
            for link in _links_of(live):
                self._members[link].discard(vm)
            self._reshare(_links_of(live), at_s, retime=None)
            return result
        return None

    @property
    def running(self) -> int:
        return len(self._flows)

    def _reshare(self, links: Iterable[_Link], now_s: float, *, retime: VmName | None) -> None:
        """Share ``links`` again and give every flow on them its new rate (advancing it to
        ``now_s`` at the old one first); ``retime`` is re-timed even if its rate stays."""
        touched: set[VmName] = set()
        for link in links:
            members = self._members.get(link, set())
            demands = ((vm, self._flows[vm].state.demand_bps()) for vm in members)
            self._shares[link] = water_fill(demands, self._links[link[1]])
            touched |= members
        for vm in sorted(touched):
            live = self._flows[vm]
            rate = min(
                self._shares[("out", live.source)][vm], self._shares[("in", live.destination)][vm]
            )
            if rate == live.rate_bps and vm != retime:
                continue
            live.state.advance(now_s, live.rate_bps)
            live.rate_bps = rate
            live.version += 1
            at_s = live.state.next_event_s(now_s, rate)
            if math.isfinite(at_s):
                heapq.heappush(self._heap, (max(now_s, at_s), next(self._seq), vm, live.version))


def _links_of(live: _Live) -> tuple[_Link, _Link]:
    return ("out", live.source), ("in", live.destination)
