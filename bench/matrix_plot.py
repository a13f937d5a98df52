"""The matrix bench's PNG: the outcome grid (by the guest's clock), and predicted vs actual
total time and guest-felt downtime, fit-half runs hollow, held-out runs filled."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matrix_summary import OUTCOMES, square_text

OUTCOME_COLOURS = ("#4caf50", "#ffb300", "#bdbdbd", "#e53935", "#6a1b9a", "#9e9e9e", "#424242")


def _pairs(
    cells: list[dict[str, Any]], strategy: str, half: str, actual_key: str, predicted_key: str
) -> list[tuple[float, float]]:
    pairs = []
    for cell in cells:
        record = cell["runs"].get(strategy)
        if cell["half"] != half or record is None or record["status"] != "completed":
            continue
        predicted = (record.get("predicted") or {}).get(predicted_key)
        actual = record.get(actual_key)
        if predicted is not None and actual is not None and predicted > 0 and actual > 0:
            pairs.append((float(actual), float(predicted)))
    return pairs


def _scatter(
    ax: Any, cells: list[dict[str, Any]], strategies: list[str], keys: tuple[str, str], unit: float
) -> int:
    """Predicted vs actual for every strategy, fit hollow, held-out filled; how many points."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    colours = plt.get_cmap("tab10")
    points: list[float] = []
    for index, strategy in enumerate(strategies):
        for half in ("fit", "held-out"):
            pairs = _pairs(cells, strategy, half, *keys)
            if not pairs:
                continue
            actual = [a / unit for a, _ in pairs]
            predicted = [p / unit for _, p in pairs]
            colour = colours(index % 10)
            ax.scatter(
                actual,
                predicted,
                s=28,
                facecolors=colour if half == "held-out" else "none",
                edgecolors=colour,
                label=f"{strategy} ({half})",
            )
            points += [*actual, *predicted]
    if not points:
        ax.text(0.5, 0.5, "no predictions to compare", ha="center", transform=ax.transAxes)
        return 0
    low, high = min(points) / 1.5, max(points) * 1.5
    ax.plot([low, high], [low, high], color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(NullFormatter())
    ax.legend(fontsize=6, ncol=2)
    return len(points) // 2


def _grid(ax: Any, cells: list[dict[str, Any]], strategies: list[str]) -> None:
    from matplotlib.colors import ListedColormap

    grid = [
        [
            OUTCOMES.index(c["runs"][s]["outcome"]) if s in c["runs"] else OUTCOMES.index("error")
            for s in strategies
        ]
        for c in cells
    ]
    ax.imshow(
        grid, cmap=ListedColormap(OUTCOME_COLOURS), vmin=0, vmax=len(OUTCOMES) - 1, aspect="auto"
    )
    for row, cell in enumerate(cells):
        for col, strategy in enumerate(strategies):
            colour = "black" if grid[row][col] in (0, 1, 2, 5) else "white"
            text = square_text(cell["runs"].get(strategy))
            ax.text(col, row, text, ha="center", va="center", fontsize=6, color=colour)
    ax.set_xticks(range(len(strategies)), strategies, rotation=30, ha="right")
    ax.set_yticks(range(len(cells)), [c["cell"] for c in cells], fontsize=7)
    ax.set_title(
        "outcome by the guest's clock: total / QEMU downtime / (g guest-felt)\n"
        "* = auto forced after refusing, ! = over the goal; f = fit half, h = held-out",
        fontsize=9,
    )


def plot(results: dict[str, Any], path: Path) -> None:
    """Grid (left), predicted vs actual total time and guest-felt downtime (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    cells: list[dict[str, Any]] = results["cells"]
    strategies: list[str] = results["config"]["strategies"]
    fig = plt.figure(figsize=(1.3 * len(strategies) + 16, 0.5 * max(len(cells), 8) + 3))
    spec = fig.add_gridspec(2, 2, width_ratios=[len(strategies) + 4, 7])
    ax_grid = fig.add_subplot(spec[:, 0])
    ax_total = fig.add_subplot(spec[0, 1])
    ax_guest = fig.add_subplot(spec[1, 1])
    _grid(ax_grid, cells, strategies)
    fig.legend(
        handles=[Patch(color=c, label=o) for o, c in zip(OUTCOMES, OUTCOME_COLOURS, strict=True)],
        loc="lower left",
        ncol=len(OUTCOMES),
        fontsize=8,
    )
    predictions = results["summary"].get("predictions", {})
    held = predictions.get("held-out", {})
    _scatter(ax_total, cells, strategies, ("total_ms", "total_ms"), 1000.0)
    ax_total.set_title(
        "total time, predicted vs actual (s); hollow = fit, filled = held-out\n"
        f"held-out median rel. error {held.get('median_total_rel_err')}",
        fontsize=9,
    )
    ax_total.set_xlabel("actual (s)")
    ax_total.set_ylabel("predicted (s)")
    n = _scatter(ax_guest, cells, strategies, ("guest_downtime_ms", "guest_downtime_ms"), 1.0)
    note = "" if n else " (the predictions carry no guest_downtime_ms)"
    ax_guest.set_title(
        f"guest-felt downtime, predicted vs actual (ms){note}\n"
        f"held-out median |error| {held.get('median_guest_abs_err_ms')} ms, "
        f"within max(20 ms, 30 %): {held.get('guest_within_20ms_or_30pct')}",
        fontsize=9,
    )
    ax_guest.set_xlabel("actual (ms)")
    ax_guest.set_ylabel("predicted (ms)")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
