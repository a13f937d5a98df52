"""What a move costs at a share of a link, from the real predictor, memoized by buckets.

The scheduler asks two questions of every move, many times: how long does it take at this
bandwidth, and what is the least bandwidth at which it still converges and meets its downtime
goal? Both come from :func:`vmferry.core.predict.predict` with a
:class:`~vmferry.core.measurement.Measurement` whose bandwidth is the share, judged by
:func:`vmferry.core.strategy.meets`. A prediction costs about a millisecond, so answers are
memoized by buckets, rounded towards the harder case so that a bucket never promises more
than its members get:

* the VM: RAM up to a quarter octave, zero share to the nearest 10 %, dirty rate up to a sixth of a
  decade (and at least 1 MB/s), dirty set up to half an octave, the goal as is, and the zstd
  ratio of its pages *down* to an eighth of an octave (1, 1.09, 1.19, 1.30, 1.41, …, 2, …: a
  move is never planned on more compression than was measured);
* the share: down to a sixteenth of a decade (~15 %), from :data:`MIN_SHARE_BPS` up.

Three strategies are planned (:data:`PLANNED`): pre-copy, multifd with zstd (its channels
carry compressed pages: guest memory moves at ``share x ratio``, but no faster than
``Calibration.multifd_compress_bps``, as :func:`~vmferry.core.predict.predict` says), and
hybrid (one pass, then post-copy). A pre-copy or multifd move is *safe* at a share when it
meets the goal there and still converges with the guest dirtying ``headroom`` times faster
(:attr:`StrategyPrediction.dirty_headroom`: the convergence risk), a multifd move only if its
guest would still meet the goal were QEMU to pause it for its whole downtime limit (the
channels' flush comes on top of the pause: 150 ms goals are left to pre-copy); a hybrid move
when the guest would feel its page-fault stall for at most ``hybrid_share`` of the goal.
:meth:`CostBook.choose` takes, at a share, the safe pre-copy-like strategy that needs the least
time (pre-copy on a tie within 2 %: multifd costs CPU and a flush the guest feels), and hybrid
only when neither is safe (post-copy's failure window is a risk the others do not take). The
least safe share of the chosen strategy is found by bisection over the share grid (safety only
grows with bandwidth). A multifd move uses no more of a link than zstd can fill
(:meth:`CostBook.usable_bps`).

QEMU's downtime limit for a goal is what the controller gives it
(``controller.plan.qemu_downtime_limit_ms``): the resume taken off, then 70 % of the rest.

Example:
    >>> from vmferry.core.cluster_model import HostName, Vm, VmName
    >>> book = CostBook(Calibration.default())
    >>> vm = Vm(VmName("db"), HostName("h1"), memory_bytes=4 << 30, dirty_rate_bps=50_000_000,
    ...         dirty_set_bytes=1 << 30, zero_fraction=0.0)
    >>> need = book.need(vm, max_bps=450_000_000)
    >>> need.strategy, need.need_bps < need.max_bps
    ('precopy', True)
    >>> from dataclasses import replace
    >>> book.choose(replace(vm, compress_ratio=2.5), 100_000_000).strategy
    'multifd'
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from vmferry.core.calibration import Calibration
from vmferry.core.cluster_model import Vm
from vmferry.core.felt import precopy_felt_ms
from vmferry.core.measurement import Measurement
from vmferry.core.predict import StrategyPrediction, predict
from vmferry.core.strategy import Goal, meets

__all__ = [
    "DOWNTIME_HEADROOM",
    "MIN_SHARE_BPS",
    "PLANNED",
    "PLANNED_PLAIN",
    "RESUME_ALLOWANCE_MS",
    "SHARE_STEPS_PER_DECADE",
    "Calibration",
    "CostBook",
    "MoveCost",
    "MoveNeed",
    "Planned",
    "qemu_downtime_limit_ms",
    "share_bps",
    "share_index",
]

Planned = Literal["precopy", "multifd", "hybrid"]
# What the scheduler plans, in order of preference on a tie; hybrid only when no other is safe.
PLANNED: tuple[Planned, ...] = ("precopy", "multifd", "hybrid")
# Without compression: what the peers' schedulers run (and vmferry's before multifd was planned).
PLANNED_PLAIN: tuple[Planned, ...] = ("precopy", "hybrid")
# A strategy later in the preference must be this much faster than an earlier one to be taken.
_TIE = 0.98

SHARE_STEPS_PER_DECADE = 16
# The share grid starts here (index 0); no move is planned below it.
MIN_SHARE_BPS = 1_000_000
_ZERO_STEP = 0.1
_RATE_STEPS_PER_DECADE = 6
# Rates below this behave alike at any share worth planning: they share its bucket.
_RATE_FLOOR_BPS = 1_000_000.0
_RAM_STEPS_PER_OCTAVE = 4
_SET_STEPS_PER_OCTAVE = 2
_RATIO_STEPS_PER_OCTAVE = 8
# QEMU's downtime limit is a target it overshoots (the last pass, device state): ask QEMU for
# this share of the user's maximum so the result stays under it.
DOWNTIME_HEADROOM = 0.7
# The user's maximum is what the guest feels: QEMU's pause plus resuming on the destination.
RESUME_ALLOWANCE_MS = Calibration.default().resume_felt_ms
_EPS = 1e-9


def qemu_downtime_limit_ms(max_downtime_ms: int) -> int:
    """The ``downtime-limit`` given to QEMU (and to the predictor) for a user's maximum of what
    the guest feels: the resume is taken off first, then QEMU's overshoot."""
    return max(1, int((max_downtime_ms - RESUME_ALLOWANCE_MS) * DOWNTIME_HEADROOM))


def share_index(bps: float) -> int:
    """The grid step at or below ``bps`` (0 at :data:`MIN_SHARE_BPS`; negative below it)."""
    return math.floor(SHARE_STEPS_PER_DECADE * math.log10(bps / MIN_SHARE_BPS) + _EPS)


def share_bps(index: int) -> float:
    """The bandwidth of grid step ``index``."""
    return float(MIN_SHARE_BPS * 10.0 ** (index / SHARE_STEPS_PER_DECADE))


@dataclass(frozen=True, slots=True)
class MoveCost:
    """A move's predicted cost at one share.

    Attributes:
        strategy: pre-copy, multifd (zstd), or hybrid (one pass, then post-copy).
        total_s: from start to done (setup included); inf when it does not converge.
        felt_ms: the longest stall the guest feels; None when it does not converge.
        transferred_bytes: what crosses the link, compressed for multifd (0 when it does not
            converge).
        safe: meets the goal with the margins of :class:`CostBook`.
        headroom: the dirty-rate headroom of a pre-copy or multifd move
            (``StrategyPrediction.dirty_headroom``: 0 when it does not converge, at most 4);
            None for hybrid.
    """

    strategy: Planned
    total_s: float
    felt_ms: int | None
    transferred_bytes: int
    safe: bool
    headroom: float | None = None

    @property
    def risk(self) -> float:
        """Convergence risk, 0..1: the inverse of the headroom (1 without convergence, 0.25
        with plenty of headroom; 0.5 for hybrid, whose post-copy may stall the guest)."""
        if self.headroom is None:
            return 0.5
        return 1.0 if self.headroom <= 1.0 else 1.0 / self.headroom


@dataclass(frozen=True, slots=True)
class MoveNeed:
    """What a move needs of its links.

    Attributes:
        strategy: what it runs as.
        need_bps: the least share at which it is safe (``max_bps`` when it never is).
        max_bps: the most it can use (a QEMU stream, the slower of its two links, and for
            multifd what zstd can fill).
        feasible: False when even ``max_bps`` does not meet its goal (a best effort).
        best: its cost at ``max_bps``.
    """

    strategy: Planned
    need_bps: float
    max_bps: float
    feasible: bool
    best: MoveCost

    @property
    def risk(self) -> float:
        """The share of the most it can use that it needs (0..1): convergence risk."""
        return 1.0 if not self.feasible else min(1.0, self.need_bps / self.max_bps)


# RAM, zero share, dirty rate, dirty set, goal, zstd ratio: grid steps (see the module docs).
_VmKey = tuple[int, int, int, int, int, int]


class CostBook:
    """Predictions of moves at shares, memoized (see the module docs).

    Args:
        cal: the predictor's constants (``multifd_compress_bps``: what zstd compresses for
            one move, all its channels together).
        headroom: a safe pre-copy or multifd move still converges at this many times the
            measured dirty rate.
        hybrid_share: a safe hybrid move's felt stall is at most this share of the goal.
    """

    def __init__(
        self, cal: Calibration, *, headroom: float = 1.3, hybrid_share: float = 0.8
    ) -> None:
        self.cal = cal
        self.headroom = headroom
        self.hybrid_share = hybrid_share
        self._costs: dict[tuple[_VmKey, int, Planned], MoveCost] = {}
        self._needs: dict[tuple[_VmKey, int, int, tuple[Planned, ...]], MoveNeed] = {}
        self.predictions = 0

    def setup_s(self, vm: Vm) -> float:
        """The part of a move that uses no bandwidth: setting up, scanning zero pages."""
        zero_bytes = vm.memory_bytes * vm.zero_fraction
        scan_s = zero_bytes / self.cal.zero_scan_bps * self.cal.time_scale
        return self.cal.setup_ms / 1000.0 + scan_s

    def cost(self, vm: Vm, share: float, strategy: Planned = "precopy") -> MoveCost:
        """``vm``'s cost moving as ``strategy`` at ``share`` bytes/s (rounded down to the
        grid, at least :data:`MIN_SHARE_BPS`)."""
        return self._cost(_vm_key(vm), max(0, share_index(share)), strategy)

    def choose(self, vm: Vm, share: float, strategies: Sequence[Planned] = PLANNED) -> MoveCost:
        """The cost of the strategy ``vm`` should move as at ``share``: of ``strategies``, the
        safe pre-copy-like one that needs the least time (the earlier on a tie), else hybrid
        (whose ``safe`` says whether even it is)."""
        return self._choose(_vm_key(vm), max(0, share_index(share)), tuple(strategies))

    def usable_bps(self, vm: Vm, strategy: Planned, max_bps: float) -> float:
        """The most of ``max_bps`` a move as ``strategy`` can use: a multifd move's wire
        carries no more than zstd compresses (at its bucket's ratio, rounded down: so it is
        never given less than it can use)."""
        if strategy != "multifd":
            return max_bps
        return min(max_bps, self.cal.multifd_compress_bps / _ratio(_vm_key(vm)[5]))

    def need(
        self,
        vm: Vm,
        max_bps: float,
        floor_bps: float = MIN_SHARE_BPS,
        strategies: Sequence[Planned] = PLANNED,
    ) -> MoveNeed:
        """The least safe share of ``vm`` when it can use at most ``max_bps``, for the strategy
        :meth:`choose` takes of ``strategies`` at ``max_bps`` (else a best effort as hybrid at
        ``max_bps``). Shares under ``floor_bps`` are not looked at (the answer is then
        ``floor_bps``'s grid step): a caller that never gives less saves the predictions."""
        key, top = _vm_key(vm), max(0, share_index(max_bps))
        low = min(top, max(0, share_index(floor_bps)))
        memo = (key, top, low, tuple(strategies))
        found = self._needs.get(memo)
        if found is None:
            found = self._need(key, top, low, memo[3])
            self._needs[memo] = found
        return found

    def _need(self, key: _VmKey, top: int, low: int, strategies: tuple[Planned, ...]) -> MoveNeed:
        best = self._choose(key, top, strategies)
        strategy = best.strategy
        if not best.safe:
            return MoveNeed(strategy, share_bps(top), share_bps(top), False, best)
        usable = share_bps(top)
        if strategy == "multifd":
            usable = min(usable, self.cal.multifd_compress_bps / _ratio(key[5]))
        if self._cost(key, low, strategy).safe:
            return MoveNeed(strategy, min(share_bps(low), usable), usable, True, best)
        high = top  # safe at high, not at low
        while high - low > 1:
            middle = (low + high) // 2
            if self._cost(key, middle, strategy).safe:
                high = middle
            else:
                low = middle
        return MoveNeed(strategy, min(share_bps(high), usable), usable, True, best)

    def _choose(self, key: _VmKey, index: int, strategies: tuple[Planned, ...]) -> MoveCost:
        chosen: MoveCost | None = None
        for strategy in strategies:
            if strategy == "hybrid":
                continue
            cost = self._cost(key, index, strategy)
            if cost.safe and (chosen is None or cost.total_s < chosen.total_s * _TIE):
                chosen = cost
        return chosen if chosen is not None else self._cost(key, index, "hybrid")

    def _cost(self, key: _VmKey, index: int, strategy: Planned) -> MoveCost:
        if strategy != "multifd":
            key = (*key[:5], 0)  # the others do not compress: one prediction for any ratio
        found = self._costs.get((key, index, strategy))
        if found is None:
            found = self._predict(key, index, strategy)
            self._costs[(key, index, strategy)] = found
        return found

    def _predict(self, key: _VmKey, index: int, strategy: Planned) -> MoveCost:
        m = _measurement(key, share_bps(index))
        goal_ms = key[4]
        self.predictions += 1
        p = predict(strategy, m, downtime_limit_ms=qemu_downtime_limit_ms(goal_ms), cal=self.cal)
        sent = p.transferred_bytes or 0
        if strategy == "multifd":
            sent = round(sent / m.compress_ratio)  # the predictor counts guest bytes
        return MoveCost(
            strategy,
            math.inf if p.total_ms is None else p.total_ms / 1000.0,
            p.felt_ms,
            sent,
            self._is_safe(p, m, goal_ms),
            p.dirty_headroom,
        )

    def _is_safe(self, p: StrategyPrediction, m: Measurement, goal_ms: int) -> bool:
        if not meets(p, Goal(max_downtime_ms=goal_ms)):
            return False
        if p.strategy == "hybrid":
            return (p.felt_ms or 0) <= goal_ms * self.hybrid_share
        if p.strategy == "multifd":
            # Its flush comes on top of QEMU's pause, which DOWNTIME_HEADROOM does not cover
            # for short goals: the guest must feel no more than its goal even when QEMU
            # pauses it for its whole downtime limit (a remainder just at the threshold).
            pause_ms = qemu_downtime_limit_ms(goal_ms) + self.cal.switchover_ms
            if precopy_felt_ms(m, downtime_ms=pause_ms, cal=self.cal, multifd=True) > goal_ms:
                return False
        return (p.dirty_headroom or 0.0) >= self.headroom


def _vm_key(vm: Vm) -> _VmKey:
    """The VM's bucket, rounded towards the harder case."""
    ram = _ceil_log(vm.memory_bytes, _RAM_STEPS_PER_OCTAVE, 2)
    zero = round(vm.zero_fraction / _ZERO_STEP)
    rate = -1
    if vm.dirty_rate_bps > 0:
        rate = _ceil_log(max(vm.dirty_rate_bps, _RATE_FLOOR_BPS), _RATE_STEPS_PER_DECADE, 10)
    dirty_set = _SET_STEPS_PER_OCTAVE * ram  # all of it
    if vm.dirty_set_bytes is not None:
        wanted = vm.dirty_set_bytes
        dirty_set = -1 if wanted <= 0 else _ceil_log(wanted, _SET_STEPS_PER_OCTAVE, 2)
    # Down: less compression than measured is the harder case.
    ratio = max(0, -_ceil_log(1.0 / max(1.0, vm.compress_ratio), _RATIO_STEPS_PER_OCTAVE, 2))
    return ram, zero, rate, dirty_set, vm.max_downtime_ms, ratio


def _ratio(step: int) -> float:
    """The zstd ratio of grid step ``step`` (0: no compression)."""
    return float(2.0 ** (step / _RATIO_STEPS_PER_OCTAVE))


def _measurement(key: _VmKey, bandwidth_bps: float) -> Measurement:
    ram_q, zero_q, rate_q, set_q, _, ratio_q = key
    ram = round(2.0 ** (ram_q / _RAM_STEPS_PER_OCTAVE))
    rate = 0 if rate_q < 0 else round(10.0 ** (rate_q / _RATE_STEPS_PER_DECADE))
    dirty_set = 0 if set_q < 0 else min(ram, round(2.0 ** (set_q / _SET_STEPS_PER_OCTAVE)))
    return Measurement(
        ram_bytes=ram,
        zero_fraction=min(1.0, zero_q * _ZERO_STEP),
        compress_ratio=_ratio(ratio_q),
        dirty_rate_bps=rate,
        bandwidth_bps=max(1, round(bandwidth_bps)),
        dirty_set_bytes=dirty_set,
    )


def _ceil_log(value: float, steps: int, base: int) -> int:
    """The grid step (``steps`` per factor ``base``) at or above ``value``."""
    return math.ceil(steps * math.log(value, base) - _EPS)
