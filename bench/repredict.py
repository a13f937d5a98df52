"""Re-predict recorded matrix runs offline: each move's total time under the predictor's model
then (the record's ``predicted``) and under today's first-touch term
(:mod:`vmferry.core.predict_touch`), calibrated from the fit half as the bench does.

The records hold each move's predicted and actual figures but not its measurement, so a move is
re-predicted by replacing the parts the model change touches in its recorded prediction:

* its zero pages' cost: the old scan (``zero / 3 GB/s``, times the time scale, times the
  post-copy overhead for post-copy) comes out, the new scan (``zero / zero_scan_bps``) and the
  first touches go in (``touched GiB x touch_ms_per_gib2 x RAM GiB``, not time-scaled);
* its transfer time: rescaled by the new time scale over the old one (both refined from the
  moves before it exactly as ``controller.plan.calibration_from`` does: fit moves from the fit
  moves before them, held-out moves from the whole fit half);
* the pre-copy's later rounds are not re-simulated (a longer first pass lets a paced writer
  dirty more: the live predictor counts that, this does not).

A cell's zero bytes are its RAM less the post-copy prediction's bytes (post-copy sends every
non-zero page once; the matrix has no disks). The source's holes, which the agent would read as
the memfd's allocated blocks, follow from the order of moves in a cell (pre-copy, multifd,
post-copy, hybrid, auto on one VM): a booted guest has holes for all its zero pages; a move by
the main stream or post-copy leaves its destination allocated, a multifd move leaves it holed;
a failed move leaves its source allocated (it read every page).

    uv run python bench/repredict.py [docs/bench/matrix-2026-11-30-hot.json …] [--unmeasured]

``--unmeasured``: as if the agent did not report residency (the source taken as allocated).
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from vmferry.core.calibration import Calibration, CalibrationSample
from vmferry.core.model import MECHANISMS, Mechanism, Prediction
from vmferry.core.predict_touch import GIB, destination_share

RUNS = [
    "matrix-2026-11-30.json",
    "matrix-2026-11-30-unsent.json",
    "matrix-2026-11-30-perkind.json",
    "matrix-2026-11-30-hot.json",
]
DOCS = Path(__file__).resolve().parent.parent / "docs" / "bench"
OLD = replace(Calibration.default(), zero_scan_bps=3_000_000_000, touch_ms_per_gib2=0.0)
NEW = Calibration.default()
MEMORY = {"256M": 256 << 20, "1G": 1 << 30, "2G": 2 << 30, "4G": 4 << 30}
ORDER = ("precopy", "multifd", "postcopy", "hybrid", "auto")


@dataclass
class Move:
    """One completed move with a prediction, and what the model change needs of it."""

    cell: str
    half: str
    strategy: str
    chosen: Mechanism
    history: int  # moves in the history when it was predicted
    actual_ms: int
    old_ms: int
    ram: int
    zero: float
    holes: float  # the source's never-allocated bytes
    new_ms: float = 0.0


def mechanism(name: str) -> Mechanism:
    return next(m for m in MECHANISMS if m == name)


def cell_moves(cell: dict[str, Any], measured: bool) -> list[Move]:
    """A cell's completed, predicted moves, with the source's holes at each."""
    ram = MEMORY[cell["memory"]]
    postcopy = (cell["runs"].get("postcopy") or {}).get("predicted") or {}
    if not postcopy.get("transferred_bytes"):
        return []
    zero = float(ram - postcopy["transferred_bytes"])
    holes, moves = zero, []
    for strategy in ORDER:
        run = cell["runs"].get(strategy)
        if run is None:
            continue
        chosen = run.get("chosen") or strategy
        if run["status"] != "completed":
            holes = 0.0 if run.get("transferred_bytes") else holes
            continue
        if run.get("predicted") and chosen in MECHANISMS:
            moves.append(
                Move(
                    cell["name"],
                    cell["half"],
                    strategy,
                    mechanism(chosen),
                    run["history_moves"],
                    run["total_ms"],
                    run["predicted"]["total_ms"],
                    ram,
                    zero,
                    holes if measured else 0.0,
                )
            )
        holes = zero if chosen == "multifd" else 0.0
    return moves


def _zero_ms(move: Move, cal: Calibration) -> float:
    """What the model puts on the move's zero pages (ms): the scan, time-scaled (and slowed
    like post-copy's pull), and the first touches."""
    scan = move.zero / cal.zero_scan_bps * cal.time_scale * 1000.0
    if move.chosen == "postcopy":
        scan *= cal.postcopy_fault_overhead
    touched = move.holes + move.zero * destination_share(move.chosen, cal)
    return scan + touched / GIB * cal.touch_ms_per_gib2 * move.ram / GIB


def repredict(move: Move, old: Calibration, new: Calibration) -> float:
    """The move's total under ``new`` from its recorded total under ``old``."""
    scale_old, scale_new = old.time_scale, new.time_scale
    if move.chosen == "postcopy":
        scale_old *= old.postcopy_fault_overhead
        scale_new *= new.postcopy_fault_overhead
    transfer = move.old_ms - old.setup_ms - _zero_ms(move, old)
    return new.setup_ms + transfer * scale_new / scale_old + _zero_ms(move, new)


def _sample(move: Move, total_ms: float) -> CalibrationSample:
    # Only totals are refined here; downtimes do not move the time scale.
    return CalibrationSample(move.chosen, Prediction(round(total_ms), 0, 0), move.actual_ms, None)


def run_file(path: Path, measured: bool) -> list[Move]:
    """Every move of one run, re-predicted (fit moves in history order first)."""
    data = json.loads(path.read_text())
    moves = [m for cell in data["cells"] for m in cell_moves(cell, measured)]
    fit = sorted((m for m in moves if m.half == "fit"), key=lambda m: m.history)
    old_samples: list[CalibrationSample] = []
    new_samples: list[CalibrationSample] = []
    for move in fit:
        old = OLD.refined(old_samples) if old_samples else OLD
        new = NEW.refined(new_samples) if new_samples else NEW
        move.new_ms = repredict(move, old, new)
        old_samples.append(_sample(move, move.old_ms))
        new_samples.append(_sample(move, move.new_ms))
    old, new = OLD.refined(old_samples), NEW.refined(new_samples)
    for move in moves:
        if move.half != "fit":
            move.new_ms = repredict(move, old, new)
    return moves


def _err(predicted: float, actual: int) -> float:
    return abs(predicted - actual) / actual


def _median(values: list[float]) -> str:
    return f"{statistics.median(values):6.1%}" if values else "     -"


def report(name: str, moves: list[Move]) -> None:
    """Per held-out cell and strategy: actual, before, after; medians per half."""
    print(f"== {name}")
    head = f"{'held-out cell':46} {'strategy':9} {'chosen':9} {'actual':>7}"
    print(f"{head} {'before':>13} {'after':>13}")
    for m in (m for m in moves if m.half == "held-out"):
        before, after = _err(m.old_ms, m.actual_ms), _err(m.new_ms, m.actual_ms)
        print(
            f"{m.cell[:46]:46} {m.strategy:9} {m.chosen:9} {m.actual_ms / 1000:6.1f}s "
            f"{m.old_ms / 1000:6.1f}s {before:5.0%} {m.new_ms / 1000:6.1f}s {after:5.0%}"
        )
    for half in ("fit", "held-out"):
        rows = [m for m in moves if m.half == half]
        olds = [_err(m.old_ms, m.actual_ms) for m in rows]
        news = [_err(m.new_ms, m.actual_ms) for m in rows]
        print(f"  {half:8} median total error: before {_median(olds)}  after {_median(news)}")
    cells: dict[str, list[Move]] = {}
    for m in moves:
        if m.half == "held-out":
            cells.setdefault(m.cell[:3], []).append(m)
    print("  per held-out cell (median over its moves):")
    for cell, rows in cells.items():
        was = _median([_err(m.old_ms, m.actual_ms) for m in rows])
        now = _median([_err(m.new_ms, m.actual_ms) for m in rows])
        print(f"    {cell}: {was} -> {now}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", type=Path)
    parser.add_argument("--unmeasured", action="store_true", help="no residency from the agent")
    args = parser.parse_args()
    files = args.files or [DOCS / name for name in RUNS]
    for path in files:
        report(path.name, run_file(path, measured=not args.unmeasured))


if __name__ == "__main__":
    main()
