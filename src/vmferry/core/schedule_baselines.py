"""What the peers do with many moves, as dispatchers with the same interface as vmferry's.

Every baseline takes the moves first in, first out (in the order they were asked for), starts
as many as its concurrency limits allow, and caps none of them: the moves on a link share it
evenly. They differ only in their limits (DESIGN.md "What peers do with many moves"):

* ``fixed-1``: one move out and one in per host at a time (OpenStack Nova's
  ``max_concurrent_live_migrations`` default);
* ``fixed-2``: two out and two in per host (oVirt);
* ``fixed-4``: four per host (Proxmox's workers);
* ``kubevirt``: five per cluster and two outbound per node, no inbound limit.

They run every move as plain pre-copy, as the peers do by default. ``fixed-N+choice`` is
``fixed-N`` given vmferry's per-move strategy choice: each move runs as what the cost book
chooses (:meth:`~vmferry.core.move_cost.CostBook.choose`: pre-copy, multifd with zstd, or
hybrid) at the share an even split gives it when its links are full (a stream's most, its
source's link over its outbound limit, its destination's over its inbound limit). Set side
by side with ``fixed-N`` and with vmferry's scheduler, it tells what the strategy choice gains
and what the scheduling does.

A host's own limits (:class:`~vmferry.core.cluster_model.Host`) still hold. A move whose
destination is busy is passed over for the next one of the same source, so none waits behind
a move it does not depend on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vmferry.core.cluster_model import Cluster, HostName, Move, VmName
from vmferry.core.errors import ConfigError
from vmferry.core.move_cost import CostBook, Planned
from vmferry.core.schedule import Action, Slots, Start, check_moves

__all__ = ["BASELINES", "FifoDispatcher", "Limits"]


@dataclass(frozen=True, slots=True)
class Limits:
    """A baseline's concurrency limits (None: none of its own), and whether it is given
    vmferry's per-move strategy choice (else plain pre-copy)."""

    outbound: int | None
    inbound: int | None
    cluster: int | None = None
    choice: bool = False


BASELINES: dict[str, Limits] = {
    "fixed-1": Limits(1, 1),
    "fixed-2": Limits(2, 2),
    "fixed-4": Limits(4, 4),
    "kubevirt": Limits(2, None, cluster=5),
    "fixed-1+choice": Limits(1, 1, choice=True),
    "fixed-2+choice": Limits(2, 2, choice=True),
    "fixed-4+choice": Limits(4, 4, choice=True),
}


class FifoDispatcher:
    """First in, first out under fixed limits; links split evenly (see the module docs).

    Args:
        name: the policy's name (a key of :data:`BASELINES`, or any label).
        cluster: hosts and VMs.
        moves: the moves of the job, in the order asked for.
        limits: the concurrency limits.
        book: the cost book that chooses each move's strategy (with ``limits.choice``).
        stream_bps: the most one migration stream carries (with ``limits.choice``).

    Raises:
        UnknownHost, ConfigError: see :func:`vmferry.core.schedule.check_moves`; also a
            choice without a book.
    """

    def __init__(
        self,
        name: str,
        cluster: Cluster,
        moves: Sequence[Move],
        limits: Limits,
        *,
        book: CostBook | None = None,
        stream_bps: float = float("inf"),
    ) -> None:
        check_moves(cluster, moves)
        if limits.choice and book is None:
            raise ConfigError(f"{name}: a strategy choice needs a cost book")
        self.name = name
        self._limits = limits
        self._book = book if limits.choice else None
        self._stream_bps = stream_bps
        self._link = {h.name: float(h.link_bps) for h in cluster.hosts}
        self._slots = Slots(cluster, outbound=limits.outbound, inbound=limits.inbound)
        self._moves = list(moves)
        self._started = [False] * len(self._moves)
        self._first = 0  # first not started, in the global order
        self._by_source: dict[HostName, list[int]] = {}
        for index, move in enumerate(self._moves):
            self._by_source.setdefault(move.source, []).append(index)
        self._next: dict[HostName, int] = dict.fromkeys(self._by_source, 0)
        self._running: dict[VmName, Move] = {}
        self._waiting_on: dict[HostName, set[HostName]] = {}
        self._left = len(self._moves)

    @property
    def waiting(self) -> int:
        return self._left - len(self._running)

    @property
    def wake_s(self) -> float | None:
        return None  # it acts when moves end, never on a timer

    def tick(self, now_s: float) -> list[Action]:
        del now_s
        return []

    def progress(
        self, vm: VmName, now_s: float, left_s: float | None, rate_bps: float | None = None
    ) -> list[Action]:
        del vm, now_s, left_s, rate_bps  # it starts moves as others end, whatever their progress
        return []

    def begin(self, now_s: float) -> list[Action]:
        del now_s
        if self._limits.cluster is not None:
            return self._dispatch_cluster()
        actions: list[Action] = []
        for source in self._by_source:  # in the order of each source's first move
            actions += self._dispatch_source(source)
        return actions

    def released(self, vm: VmName, now_s: float) -> list[Action]:
        del vm, now_s  # its slot frees when it ends
        return []

    def finished(self, vm: VmName, now_s: float) -> list[Action]:
        del now_s
        move = self._running.pop(vm, None)
        if move is None:
            raise ConfigError(f"{vm} is not a running move of this job")
        self._slots.give_back(move)
        self._left -= 1
        if self._limits.cluster is not None:
            return self._dispatch_cluster()
        actions = self._dispatch_source(move.source)
        for source in sorted(self._waiting_on.pop(move.destination, set())):
            actions += self._dispatch_source(source)
        return actions

    def _can_start(self, move: Move) -> bool:
        return self._slots.has_out(move.source) and self._slots.has_in(move.destination)

    def _start(self, index: int) -> Start:
        move = self._moves[index]
        self._started[index] = True
        self._slots.take(move)
        self._running[move.name] = move
        return Start(move, None, self._strategy(move))

    def _strategy(self, move: Move) -> Planned:
        """Plain pre-copy; with a choice, the book's at the share of an even split of full
        links."""
        if self._book is None:
            return "precopy"
        out_share = self._link[move.source] / self._slots.max_out[move.source]
        in_share = self._link[move.destination] / self._slots.max_in[move.destination]
        share = min(self._stream_bps, out_share, in_share)
        return self._book.choose(move.vm, share).strategy

    def _dispatch_source(self, source: HostName) -> list[Action]:
        actions: list[Action] = []
        queue = self._by_source.get(source, [])
        position = self._next.get(source, 0)
        while position < len(queue) and self._started[queue[position]]:
            position += 1
        self._next[source] = position
        for index in queue[position:]:
            if not self._slots.has_out(source):
                break
            if self._started[index]:
                continue
            move = self._moves[index]
            if not self._slots.has_in(move.destination):
                self._waiting_on.setdefault(move.destination, set()).add(source)
                continue
            actions.append(self._start(index))
        return actions

    def _dispatch_cluster(self) -> list[Action]:
        """Under a cluster-wide limit: the first moves in the global order that fit."""
        limit = self._limits.cluster or 0
        actions: list[Action] = []
        while self._first < len(self._moves) and self._started[self._first]:
            self._first += 1
        for index in range(self._first, len(self._moves)):
            if self._slots.total >= limit:
                break
            if not self._started[index] and self._can_start(self._moves[index]):
                actions.append(self._start(index))
        return actions
