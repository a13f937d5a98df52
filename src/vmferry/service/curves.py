"""Each recent move's progress curve and ETA, fed the samples its job publishes.

The service publishes every progress sample of a move on its event bus (what the CLI's
progress line shows). This keeps, for the dashboard, what a page opened later needs to plot
the move: a bounded curve of ``[t_ms, transferred_bytes, remaining_bytes]`` per move (QEMU's
own clock, continued across the restart of QEMU's counters after a disk copy), thinned
evenly once it grows past ``max_points``; and the move's ETA, from the same
:class:`~vmferry.core.eta.EtaEstimator` the CLI's progress line runs, told what the move's
pre-flight measured. Curves live in memory for the last ``max_jobs`` jobs: a restarted
service has none for the moves before it (their reports are in the history).

Example:
    >>> curves = MoveCurves()
    >>> curves.hint(7, "vm-1", EtaHints(zero_fraction=0.5))
    >>> curves.curves(7)
    [{'vm': 'vm-1', 'points': []}]
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from vmferry.core.eta import EtaEstimator, EtaHints
from vmferry.core.model import MigrationStats
from vmferry.service import schema as s

__all__ = ["CURVES_SCHEMA", "MoveCurves"]

Point = tuple[int, int, int]  # t_ms, transferred_bytes, remaining_bytes

CURVES_SCHEMA = s.obj(
    {
        "job": s.integer(1),
        "moves": s.array(
            s.obj(
                {
                    "vm": s.string(),
                    "points": s.array(s.array(s.integer(0), max_items=3, min_items=3)),
                },
                required=("vm", "points"),
                closed=False,
            ),
            max_items=100_000,
        ),
    },
    required=("job", "moves"),
    closed=False,
    description="Each move's progress curve: [t_ms, transferred_bytes, remaining_bytes] "
    "samples on QEMU's clock (kept in memory for the service's recent jobs).",
)


@dataclass(slots=True)
class _Move:
    """One move's curve (every ``stride``-th sample, and the latest) and its ETA."""

    eta: EtaEstimator = field(default_factory=EtaEstimator)
    points: list[Point] = field(default_factory=list)
    latest: Point | None = None
    stride: int = 1
    seen: int = 0
    offset_ms: int = 0
    last_ms: int = 0

    def add(self, stats: MigrationStats, max_points: int) -> None:
        if stats.total_ms < self.last_ms:  # QEMU's counters restarted (RAM after the disk)
            self.offset_ms += self.last_ms
        self.last_ms = stats.total_ms
        point = (self.offset_ms + stats.total_ms, stats.transferred_bytes, stats.remaining_bytes)
        self.eta.add(stats)
        self.latest = point
        if self.seen % self.stride == 0:
            self.points.append(point)
            if len(self.points) >= max_points:  # keep every other one, then sample half as often
                self.points = self.points[::2]
                self.stride *= 2
        self.seen += 1

    def curve(self) -> list[list[int]]:
        points = list(self.points)
        if self.latest is not None and (not points or points[-1] != self.latest):
            points.append(self.latest)
        return [list(p) for p in points]


class MoveCurves:
    """Curves and ETAs of the moves of the last ``max_jobs`` jobs (see the module docstring)."""

    def __init__(self, max_jobs: int = 64, max_points: int = 600) -> None:
        self.max_jobs, self.max_points = max_jobs, max_points
        self._jobs: OrderedDict[int, dict[str, _Move]] = OrderedDict()

    def _move(self, job: int, vm: str) -> _Move:
        moves = self._jobs.get(job)
        if moves is None:
            moves = self._jobs[job] = {}
            while len(self._jobs) > self.max_jobs:
                self._jobs.popitem(last=False)
        return moves.setdefault(vm, _Move())

    def hint(self, job: int, vm: str, hints: EtaHints) -> None:
        """What the move's pre-flight measured (before its first sample)."""
        self._move(job, vm).eta = EtaEstimator(hints)

    def add(self, job: int, vm: str, stats: MigrationStats) -> int | None:
        """Take the move's next sample; its ETA in ms (None: no estimate yet)."""
        move = self._move(job, vm)
        move.add(stats, self.max_points)
        return move.eta.eta_ms()

    def curves(self, job: int) -> list[dict[str, object]]:
        """The job's moves' curves (empty: none recorded in this service)."""
        return [{"vm": vm, "points": m.curve()} for vm, m in self._jobs.get(job, {}).items()]
