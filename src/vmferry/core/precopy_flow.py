"""The simulator's model of a live move: pre-copy as a fluid, at whatever rate its links give.

This is the "real" duration of a simulated move, the same for every scheduling policy, and
deliberately not the predictor (which plans from buckets of what a pre-flight measured; the
model runs on the VM's true figures). A move at rate ``b`` (bytes/s on the wire, changing
whenever the moves sharing its links change) goes through:

1. **setup**: ``Calibration.setup_ms`` plus scanning its zero pages; it uses no bandwidth.
2. **first pass**: its non-zero pages at ``b``. Meanwhile the guest dirties its dirty set
   ``W`` at rate ``r``: the dirty bytes ``D`` grow as ``dD/dt = r (1 - D/W)`` (random writes:
   the more of ``W`` is dirty, the more writes hit dirty pages).
3. **iterating**: dirty pages are re-sent while the guest dirties more:
   ``dD/dt = r (1 - D/W) - b``, so ``D`` heads for ``D* = W (1 - b/r)``. QEMU switches over as
   soon as ``D`` fits its threshold, ``b`` times its downtime limit (the same limit the
   controller sets for the VM's goal). If ``D*`` is above the threshold it never does: once
   it has hovered for three rounds (``3 D / b``, 2-60 s) the move is rescued as vmferry's
   re-planning does, by a switch to post-copy.
4. **switchover** (the guest paused while ``D`` crosses at ``b``), felt by the guest as
   :func:`vmferry.core.felt.precopy_felt_ms` says; or **post-copy**: ``D`` pulled at ``b``
   (times the fault overhead), the guest feeling its page-fault stall as
   :func:`vmferry.core.felt.postcopy_felt_ms` says.

A move planned as hybrid switches to post-copy right after its first pass (unless the dirty
bytes already fit the threshold: then it ends as a pre-copy).

A **multifd** move (zstd) is a pre-copy whose wire carries compressed pages: guest memory moves
at ``b x ratio`` (the VM's true zstd ratio), and everything above runs on that guest rate
(the threshold too, as the predictor has it), while the bytes it sends are ``1 / ratio`` of the
pages. Its guest rate is capped by what zstd compresses: ``Calibration.multifd_compress_bps``
for one move, and the source host's CPU for compression (:class:`CompressionBudget`), shared by
the multifd moves it sends at once. Its guest feels a multifd switchover (the channels'
flush). A multifd move does not switch to post-copy (vmferry runs it without post-copy): one
that stalls is cancelled, the guest still on the source, and moved again as hybrid from its
setup on.
"""

from __future__ import annotations

import enum
import math

from vmferry.core._dispatch_state import water_fill
from vmferry.core.calibration import Calibration
from vmferry.core.cluster_model import HostName, Vm, VmName
from vmferry.core.felt import postcopy_felt_ms, precopy_felt_ms
from vmferry.core.flows import Finished
from vmferry.core.move_cost import Planned, qemu_downtime_limit_ms
from vmferry.core.schedule import Start

__all__ = ["CompressionBudget", "PrecopyFlow"]

_STALL_ROUNDS = 3.0
_STALL_MIN_S = 2.0
_STALL_MAX_S = 60.0
_EPS_BYTES = 1.0


class _Phase(enum.Enum):
    SETUP = "setup"
    PASS = "first pass"
    ITERATE = "iterating"
    PAUSED = "switchover"
    PULL = "post-copy"


class CompressionBudget:
    """Each source host's CPU for zstd, in guest bytes compressed per second, shared by the
    multifd moves it sends at once: water-filled by what each would compress on its own (its
    cap or a stream's most, times its ratio, at most one move's zstd limit), as the host's
    scheduler shares its cores among their channels' threads.

    Args:
        host_bps: what one host compresses at most, all its moves together.
    """

    def __init__(self, host_bps: float) -> None:
        self.host_bps = host_bps
        self._wants: dict[HostName, dict[VmName, float]] = {}
        self._shares: dict[HostName, dict[VmName, float]] = {}

    def join(self, host: HostName, vm: VmName, want_bps: float) -> None:
        """``vm``'s move compresses on ``host`` (again: with a new want)."""
        self._wants.setdefault(host, {})[vm] = want_bps
        self._shares.pop(host, None)

    def leave(self, host: HostName, vm: VmName) -> None:
        """``vm``'s move no longer compresses on ``host``."""
        if self._wants.get(host, {}).pop(vm, None) is not None:
            self._shares.pop(host, None)

    def share_bps(self, host: HostName, vm: VmName) -> float:
        """What ``vm``'s move may compress now (the whole budget if it has not joined)."""
        shares = self._shares.get(host)
        if shares is None:
            shares = water_fill(self._wants.get(host, {}).items(), self.host_bps)
            self._shares[host] = shares
        return shares.get(vm, self.host_bps)


class PrecopyFlow:
    """One simulated move (see the module docs).

    Args:
        start: the dispatcher's start action (its strategy and cap).
        now_s: when it starts.
        truth: the VM's true figures (what the model runs on).
        cal: the machine constants (setup, switchover, felt downtime, one move's zstd).
        budget: the hosts' CPU for compression (None: no limit beyond one move's).
    """

    def __init__(
        self,
        start: Start,
        now_s: float,
        truth: Vm,
        cal: Calibration,
        budget: CompressionBudget | None = None,
    ) -> None:
        self._vm = truth
        self._cal = cal
        self._budget = budget
        self._source = start.move.source
        self._strategy: Planned = start.strategy
        self._ratio = max(1.0, truth.compress_ratio) if start.strategy == "multifd" else 1.0
        self._compressing = False  # a member of the budget
        self._cap = start.cap_bps
        self._since_s = now_s
        self._dirty = 0.0
        self._sent = 0.0  # on the wire
        self._set = float(
            truth.memory_bytes if truth.dirty_set_bytes is None else truth.dirty_set_bytes
        )
        self._rate = float(truth.dirty_rate_bps)
        self._limit_s = qemu_downtime_limit_ms(truth.max_downtime_ms) / 1000.0
        self._stalled_since: float | None = None
        self._stall_s = 0.0
        self._ran_as: str = start.strategy
        self._felt_ms = 0
        self._set_up(now_s)

    def _set_up(self, now_s: float) -> None:
        """Begin (again): set up, then a first pass over the non-zero pages."""
        zero_bytes = self._vm.memory_bytes * self._vm.zero_fraction
        self._phase = _Phase.SETUP
        self._phase_end_s = (
            now_s + self._cal.setup_ms / 1000.0 + zero_bytes / self._cal.zero_scan_bps
        )
        self._left = self._vm.memory_bytes - zero_bytes  # guest bytes still to send this phase
        self._dirty = 0.0
        self._stalled_since = None

    def _wire_bps(self) -> float:
        """What it would send without zstd's limits: its cap, at most a stream."""
        stream = float(self._cal.qemu_throughput_bps)
        return stream if self._cap is None else min(self._cap, stream)

    def demand_bps(self) -> float:
        if self._phase is _Phase.SETUP:
            return 0.0
        wire = self._wire_bps()
        if self._strategy == "multifd":
            zstd = float(self._cal.multifd_compress_bps)
            if self._budget is not None:
                zstd = min(zstd, self._budget.share_bps(self._source, self._vm.name))
            wire = min(wire, zstd / self._ratio)
        return wire

    def set_cap(self, cap_bps: float) -> None:
        self._cap = cap_bps
        if self._compressing:
            self._join()

    def _join(self) -> None:
        if self._budget is not None:
            want = min(self._wire_bps() * self._ratio, float(self._cal.multifd_compress_bps))
            self._budget.join(self._source, self._vm.name, want)
            self._compressing = True

    def _leave(self) -> None:
        if self._budget is not None and self._compressing:
            self._budget.leave(self._source, self._vm.name)
        self._compressing = False

    def advance(self, now_s: float, rate_bps: float) -> None:
        dt = now_s - self._since_s
        self._since_s = now_s
        if dt <= 0.0 or self._phase in (_Phase.SETUP, _Phase.PAUSED):
            return
        if self._phase is _Phase.PULL:
            self._left = max(0.0, self._left - rate_bps * dt)
            return
        self._sent += rate_bps * dt
        guest_bps = rate_bps * self._ratio
        if self._phase is _Phase.PASS:
            self._left = max(0.0, self._left - guest_bps * dt)
            self._dirty = self._dirtied(dt, drain_bps=0.0)
        else:
            self._dirty = self._dirtied(dt, drain_bps=guest_bps)

    def _dirtied(self, dt: float, *, drain_bps: float) -> float:
        """``D`` after ``dt`` s of dirtying at ``r`` over ``W`` while ``drain_bps`` is sent."""
        if self._rate <= 0.0 or self._set <= 0.0:
            return max(0.0, self._dirty - drain_bps * dt)
        decay = math.exp(-self._rate / self._set * dt)
        steady = self._set * (1.0 - drain_bps / self._rate)
        return max(0.0, steady + (self._dirty - steady) * decay)

    def next_event_s(self, now_s: float, rate_bps: float) -> float:
        if self._phase in (_Phase.SETUP, _Phase.PAUSED):
            return self._phase_end_s
        if rate_bps <= 0.0:
            return math.inf
        if self._phase is _Phase.PULL:
            return now_s + self._left / rate_bps
        guest_bps = rate_bps * self._ratio
        if self._phase is _Phase.PASS:
            return now_s + self._left / guest_bps
        threshold = guest_bps * self._limit_s
        if self._dirty <= threshold:
            return now_s
        if self._rate <= 0.0 or self._set <= 0.0:
            return now_s + (self._dirty - threshold) / guest_bps
        steady = self._set * (1.0 - guest_bps / self._rate)
        if steady < threshold:
            self._stalled_since = None
            ratio = (self._dirty - steady) / (threshold - steady)
            return now_s + math.log(ratio) * self._set / self._rate
        if self._stalled_since is None:
            rounds_s = _STALL_ROUNDS * self._dirty / guest_bps
            self._stalled_since = now_s
            self._stall_s = min(_STALL_MAX_S, max(_STALL_MIN_S, rounds_s))
        return self._stalled_since + self._stall_s

    def on_event(self, now_s: float, rate_bps: float) -> Finished | None:
        phase = self._phase
        if phase is _Phase.SETUP:
            self._phase = _Phase.PASS
            if self._strategy == "multifd":
                self._join()
        elif phase is _Phase.PASS:
            if self._left <= _EPS_BYTES:
                self._end_pass(rate_bps)
        elif phase is _Phase.ITERATE:
            self._iterate_event(now_s, rate_bps)
        elif phase is _Phase.PAUSED or self._left <= _EPS_BYTES:
            return self._finish(now_s)
        return None

    def _end_pass(self, rate_bps: float) -> None:
        if self._strategy == "hybrid" and self._dirty > rate_bps * self._limit_s:
            self._to_postcopy(rate_bps)
        else:
            self._phase = _Phase.ITERATE

    def _iterate_event(self, now_s: float, rate_bps: float) -> None:
        guest_bps = max(rate_bps * self._ratio, 1.0)
        threshold = guest_bps * self._limit_s
        if self._dirty <= threshold * (1.0 + 1e-9) + _EPS_BYTES:
            pause_ms = self._dirty / guest_bps * 1000.0 + self._cal.switchover_ms
            self._sent += self._dirty / self._ratio
            m = self._vm.measurement(max(rate_bps, 1.0))
            multifd = self._strategy == "multifd"
            self._felt_ms = precopy_felt_ms(m, downtime_ms=pause_ms, cal=self._cal, multifd=multifd)
            self._phase = _Phase.PAUSED
            self._phase_end_s = now_s + pause_ms / 1000.0
            return
        stalled = self._stalled_since
        if stalled is not None and now_s >= stalled + self._stall_s - 1e-9:
            if self._strategy == "multifd":  # cancelled; moved again as hybrid
                self._leave()
                self._ran_as, self._strategy, self._ratio = "multifd+hybrid", "hybrid", 1.0
                self._set_up(now_s)
                return
            self._ran_as = "precopy+postcopy"
            self._to_postcopy(rate_bps)

    def _to_postcopy(self, rate_bps: float) -> None:
        missing = self._dirty / self._set if self._set > 0.0 else 0.0
        m = self._vm.measurement(max(rate_bps, 1.0))
        self._felt_ms = postcopy_felt_ms(m, self._cal, missing_share=missing)
        self._sent += self._dirty
        self._left = self._dirty * self._cal.postcopy_fault_overhead
        self._phase = _Phase.PULL

    def _finish(self, now_s: float) -> Finished:
        self._leave()
        return Finished(self._vm.name, now_s, self._ran_as, self._felt_ms, round(self._sent))
