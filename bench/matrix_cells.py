"""The matrix bench's cells: a seeded fractional design over issue 13's dimensions, split into a
fit half and a held-out half.

Dimensions and levels (issue 13, item 4): guest memory 256 MiB-4 GiB, link 50 Mbit/s to an
unshaped veth (loopback speed), downtime goal 50 ms-2 s, paced and CPU-bound writers, zero /
compressible / random pages, the lab guest and the Debian 12 guest. The full factorial
(4 x 4 x 4 x 3 x 3 x 2 = 1,152 cells, x 8 strategies) is far beyond TCG, so each half is a
*balanced* sample: per dimension, the levels repeated to the half's size (each level
``n // k`` or ``n // k + 1`` times) and shuffled independently with a seeded RNG; among
``CANDIDATES`` such shuffles the one covering the most distinct level pairs is kept. Both halves
are drawn that way (different seeds) and share no cell, so the held-out half covers every level
too, with combinations the fit half never saw.

Derived per cell (not dimensions of their own): the working set (a quarter of the guest,
capped to ~8 s of the link, at least 16 MiB), the paced rate (0.25x or 1x the link's bytes/s;
QEMU's ~450 MB/s stands in for the unshaped link) and the deadline (generous: 30 s plus six
copies of the working set over the link, at most 150 s).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import asdict, dataclass
from typing import Any, Literal

Half = Literal["fit", "held-out"]

MEMORY_LEVELS = ("256M", "1G", "2G", "4G")
LINK_LEVELS_MBPS: tuple[int | None, ...] = (50, 200, 1000, None)  # None: unshaped veth
GOAL_LEVELS_MS = (50, 100, 300, 2000)
WRITER_LEVELS = ("paced-0.25x", "paced-1x", "cpu")
PATTERN_LEVELS = ("zero", "compressible", "random")
GUEST_LEVELS = ("lab", "debian")
DIMENSIONS = ("memory", "link_mbps", "goal_ms", "writer", "pattern", "guest")

# What an unshaped link carries at most: one QEMU migration thread under TCG (DESIGN.md).
UNSHAPED_BYTES_PER_S = 450_000_000
WS_LINK_SECONDS = 8.0
MIN_WS_BYTES = 16 << 20
CANDIDATES = 400
DEFAULT_SEED = 13
DEFAULT_HALF_CELLS = 10

QUICK_LEVELS: dict[str, tuple[Any, ...]] = {
    "memory": ("256M", "1G"),
    "link_mbps": (200, None),
    "goal_ms": (100, 2000),
    "writer": ("paced-1x", "cpu"),
    "pattern": ("compressible", "random"),
    "guest": ("lab", "debian"),
}
QUICK_HALF_CELLS = 2
QUICK_STRATEGIES = ("precopy", "postcopy", "auto")


def full_levels() -> dict[str, tuple[Any, ...]]:
    """Every dimension's levels, in DIMENSIONS order."""
    return {
        "memory": MEMORY_LEVELS,
        "link_mbps": LINK_LEVELS_MBPS,
        "goal_ms": GOAL_LEVELS_MS,
        "writer": WRITER_LEVELS,
        "pattern": PATTERN_LEVELS,
        "guest": GUEST_LEVELS,
    }


def parse_mib(text: str) -> int:
    """``256M`` / ``4G`` in MiB."""
    return int(text[:-1]) * (1024 if text.endswith("G") else 1)


@dataclass(frozen=True, slots=True)
class Cell:
    """One point of the design, with what is derived from it."""

    name: str
    half: Half
    memory: str
    link_mbps: int | None
    goal_ms: int
    writer: str
    pattern: str
    guest: str
    ws_bytes: int
    rate_bps: int
    deadline_s: float

    @property
    def link_label(self) -> str:
        return "unshaped" if self.link_mbps is None else f"{self.link_mbps}M"

    @property
    def link_bytes_per_s(self) -> int:
        return UNSHAPED_BYTES_PER_S if self.link_mbps is None else self.link_mbps * 125_000

    @property
    def mode(self) -> str:
        return "cpu" if self.writer == "cpu" else "paced"

    @property
    def workload(self) -> str:
        """The lab guest's ``--workload`` SPEC (the Debian guest gets the same as kernel args)."""
        size = f"size={self.ws_bytes >> 20}M,pattern={self.pattern}"
        if self.mode == "cpu":
            return f"dirty:{size},mode=cpu"
        return f"dirty:rate={self.rate_bps},{size},mode=paced"

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "link": self.link_label, "workload": self.workload}


def derive_cell(levels: dict[str, Any], half: Half, index: int) -> Cell:
    """A cell from one level per dimension: working set, paced rate, deadline, name."""
    memory_bytes = parse_mib(levels["memory"]) << 20
    link_mbps: int | None = levels["link_mbps"]
    link_bps = UNSHAPED_BYTES_PER_S if link_mbps is None else link_mbps * 125_000
    ws = min(memory_bytes // 4, int(link_bps * WS_LINK_SECONDS))
    ws = max(MIN_WS_BYTES, ws >> 20 << 20)
    writer: str = levels["writer"]
    multiple = {"paced-0.25x": 0.25, "paced-1x": 1.0, "cpu": 0.0}[writer]
    deadline_s = min(150.0, 30.0 + 6 * ws / link_bps)
    link = "unshaped" if link_mbps is None else f"{link_mbps}M"
    prefix = "f" if half == "fit" else "h"
    name = (
        f"{prefix}{index:02d}-{levels['guest']}-{levels['memory']}-{link}-"
        f"{writer}-{levels['pattern']}-{levels['goal_ms']}ms"
    )
    return Cell(
        name=name,
        half=half,
        memory=levels["memory"],
        link_mbps=link_mbps,
        goal_ms=levels["goal_ms"],
        writer=writer,
        pattern=levels["pattern"],
        guest=levels["guest"],
        ws_bytes=ws,
        rate_bps=round(multiple * link_bps),
        deadline_s=round(deadline_s),
    )


def _balanced(levels: tuple[Any, ...], n: int, rng: random.Random) -> list[Any]:
    column = [levels[i % len(levels)] for i in range(n)]
    rng.shuffle(column)
    return column


def _pairs_covered(rows: list[tuple[Any, ...]]) -> int:
    pairs = set()
    for row in rows:
        for (i, a), (j, b) in itertools.combinations(enumerate(row), 2):
            pairs.add((i, repr(a), j, repr(b)))
    return len(pairs)


def sample_half(
    levels: dict[str, tuple[Any, ...]], n: int, rng: random.Random, avoid: set[tuple[Any, ...]]
) -> list[tuple[Any, ...]]:
    """``n`` distinct rows, each level of each dimension ``n // k`` or ``n // k + 1`` times,
    none in ``avoid``; the candidate covering the most level pairs wins."""
    best: list[tuple[Any, ...]] | None = None
    best_pairs = -1
    for _ in range(CANDIDATES):
        columns = [_balanced(levels[d], n, rng) for d in DIMENSIONS]
        rows = list(zip(*columns, strict=True))
        if len(set(rows)) < n or any(row in avoid for row in rows):
            continue
        pairs = _pairs_covered(rows)
        if pairs > best_pairs:
            best, best_pairs = rows, pairs
    if best is None:
        raise ValueError(f"no design of {n} distinct cells found; use another seed")
    return best


def make_design(
    seed: int = DEFAULT_SEED, half_cells: int = DEFAULT_HALF_CELLS, quick: bool = False
) -> list[Cell]:
    """The fit half, then the held-out half (deterministic for a seed)."""
    levels = QUICK_LEVELS if quick else full_levels()
    size = QUICK_HALF_CELLS if quick else half_cells
    fit_rows = sample_half(levels, size, random.Random(seed), set())
    held_rows = sample_half(levels, size, random.Random(seed + 1), set(fit_rows))
    for rows in (fit_rows, held_rows):
        for index, dim in enumerate(DIMENSIONS):
            missing = set(levels[dim]) - {row[index] for row in rows}
            if missing:  # too few cells per half for this dimension's levels
                raise ValueError(
                    f"a half of {size} cells leaves {dim} {sorted(map(str, missing))} out"
                )
    cells = []
    for half, rows in (("fit", fit_rows), ("held-out", held_rows)):
        for index, row in enumerate(rows, start=1):
            cells.append(derive_cell(dict(zip(DIMENSIONS, row, strict=True)), half, index))  # type: ignore[arg-type]
    return cells


def coverage(cells: list[Cell]) -> dict[str, dict[str, dict[str, int]]]:
    """Per half and dimension, how many cells take each level (every level must appear)."""
    out: dict[str, dict[str, dict[str, int]]] = {}
    for half in ("fit", "held-out"):
        rows = [c for c in cells if c.half == half]
        out[half] = {
            dim: {str(level): sum(getattr(c, dim) == level for c in rows) for level in levels}
            for dim, levels in (
                (d, tuple(dict.fromkeys(getattr(c, d) for c in cells))) for d in DIMENSIONS
            )
        }
    return out


# -- the time it takes ---------------------------------------------------------------------------

RUN_OVERHEAD_S = 8.0  # CLI start, plan (probe, profile), verify
LAB_BOOT_S = 10.0
DEBIAN_BOOT_S = 45.0  # to the guest agent and the workload running, under TCG
COPY_FACTOR = 1.8  # a move sends ~1.8x the working set (re-sent pages, headers)


def likely_fails(cell: Cell, strategy: str) -> bool:
    """Crude guess for the estimate: pre-copy variants stall when dirtying outruns the link."""
    if cell.pattern == "zero" or strategy in ("postcopy", "hybrid", "cold", "auto"):
        return False
    busy = cell.writer in ("cpu", "paced-1x")
    if strategy == "multifd":
        return busy and cell.pattern == "random"
    if strategy == "auto-converge":
        return busy and cell.mode == "paced"
    return busy


def estimate_s(cells: list[Cell], strategies: list[str]) -> tuple[float, float]:
    """(likely, worst case) wall time of the run, in seconds."""
    likely = worst = 0.0
    for cell in cells:
        boot = DEBIAN_BOOT_S if cell.guest == "debian" else LAB_BOOT_S
        likely += boot
        worst += boot
        memory_s = (parse_mib(cell.memory) << 20) / 3e9  # zero scan of the untouched rest
        copy_s = COPY_FACTOR * cell.ws_bytes / cell.link_bytes_per_s + memory_s
        for strategy in strategies:
            worst += cell.deadline_s + RUN_OVERHEAD_S
            if likely_fails(cell, strategy):
                likely += cell.deadline_s + RUN_OVERHEAD_S
            else:
                likely += min(cell.deadline_s, copy_s * 1.3) + RUN_OVERHEAD_S
    return likely, worst
