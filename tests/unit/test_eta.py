"""The ETA estimator (core/eta.py), pure: a recorded move (tests/data/eta/, from
bench/eta.py) and simulated ones whose passes follow QEMU's rules."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from vmferry.agent.api import stats_from_json
from vmferry.core.calibration import Calibration
from vmferry.core.eta import EtaEstimator, EtaHints, zero_page_s
from vmferry.core.measurement import Measurement
from vmferry.core.model import MigrationStats
from vmferry.core.status import MigrationStatus, Stage

DATA = Path(__file__).resolve().parents[1] / "data" / "eta"
PAGE = 4096
MIB = 1 << 20


def _recorded(name: str) -> tuple[float, EtaHints, list[tuple[float, MigrationStats]]]:
    data = json.loads((DATA / f"{name}.json").read_text())
    samples = [(s["t"], stats_from_json(s["stats"])) for s in data["samples"]]
    return data["total_ms"] / 1000, EtaHints(**data["hints"]), samples


def _shown_at(
    estimator: EtaEstimator, samples: list[tuple[float, MigrationStats]], at_s: float
) -> tuple[float, int | None]:
    shown: tuple[float, int | None] = (0.0, None)
    for t, stats in samples:
        if t > at_s:
            break
        estimator.add(stats)
        shown = (t, estimator.eta_ms())
    return shown


def _naive_ms(stats: MigrationStats) -> float:
    return stats.remaining_bytes * 1000 / stats.throughput_bps


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.75])
def test_an_idle_guests_zero_pages_do_not_count_at_the_links_rate(fraction: float) -> None:
    """Recorded: 1 GiB, 83 % zero pages, 400 Mbit/s. The naive ETA was 3-8x too long."""
    end_s, hints, samples = _recorded("idle-1G")
    t, eta = _shown_at(EtaEstimator(hints), samples, fraction * end_s)
    actual_ms = (end_s - t) * 1000
    assert eta is not None
    assert abs(eta - actual_ms) / actual_ms < 0.8
    last = [s for s_t, s in samples if s_t <= t][-1]
    assert abs(eta - actual_ms) < abs(_naive_ms(last) - actual_ms) / 2


def test_without_a_measured_zero_share_it_still_beats_the_naive_figure() -> None:
    end_s, _, samples = _recorded("idle-1G")
    t, eta = _shown_at(EtaEstimator(), samples, 0.75 * end_s)
    assert eta is not None
    assert abs(eta - (end_s - t) * 1000) / ((end_s - t) * 1000) < 0.5


def _simulate(
    *,
    ram_bytes: int,
    zero_fraction: float,
    link_bps: float,
    dirty_bps: float,
    limit_ms: int = 300,
    zero_page_s: float = 4e-6,
    step_ms: int = 100,
) -> tuple[list[MigrationStats], float]:
    """A pre-copy as QEMU runs it: zero pages first-come at a CPU cost, data pages at the
    link's rate, each pass re-sends what the last one dirtied, until it fits the limit.
    Returns the samples and when the move ends (the last pass sent, plus a 300 ms tail)."""
    pages = ram_bytes // PAGE
    zeros_left, data_left = int(pages * zero_fraction), pages - int(pages * zero_fraction)
    normal = zero = 0
    dirtied = 0.0
    iterations, t_ms, sent = 1, 0, 0
    out: list[MigrationStats] = []
    while True:
        budget_s = step_ms / 1000
        # Zero pages and data pages interleave evenly through the first pass.
        while budget_s > 0 and zeros_left + data_left > 0:
            if zeros_left and (not data_left or zeros_left * 4 >= data_left):
                zeros_left, zero, budget_s = zeros_left - 1, zero + 1, budget_s - zero_page_s
            else:
                data_left, normal, budget_s = data_left - 1, normal + 1, budget_s - PAGE / link_bps
                sent += PAGE
        t_ms += step_ms
        dirtied += dirty_bps * step_ms / 1000
        remaining = (zeros_left + data_left) * PAGE
        if remaining <= link_bps * limit_ms / 1000:
            remaining += int(dirtied)
            iterations += 1
            if remaining <= link_bps * limit_ms / 1000:
                return out, t_ms + remaining * 1000 / link_bps + 300
            data_left, zeros_left, dirtied = remaining // PAGE, 0, 0.0
            remaining = data_left * PAGE
        out.append(
            MigrationStats(
                status=MigrationStatus.ACTIVE,
                total_ms=t_ms,
                transferred_bytes=sent,
                remaining_bytes=remaining,
                total_bytes=ram_bytes,
                dirty_pages_rate=int(dirty_bps / PAGE) if iterations > 1 else 0,
                page_size=PAGE,
                iterations=iterations,
                throughput_bps=int(link_bps),
                expected_downtime_ms=None,
                downtime_ms=None,
                normal_pages=normal,
                zero_pages=zero,
            )
        )
    return out


@pytest.mark.parametrize(
    ("zero_fraction", "dirty_mib_s"), [(0.8, 0), (0.5, 10), (0.2, 25), (0.0, 35)]
)
@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.75])
def test_passes_are_modelled(zero_fraction: float, dirty_mib_s: int, fraction: float) -> None:
    samples, end_ms = _simulate(
        ram_bytes=1 << 30,
        zero_fraction=zero_fraction,
        link_bps=50 * MIB,
        dirty_bps=dirty_mib_s * MIB,
    )
    hints = EtaHints(zero_fraction=zero_fraction, dirty_rate_bps=dirty_mib_s * MIB)
    estimator = EtaEstimator(hints)
    at_ms = fraction * end_ms
    for stats in samples:
        if stats.total_ms > at_ms:
            break
        estimator.add(stats)
        shown = (stats.total_ms, estimator.eta_ms())
    t_ms, eta = shown
    assert eta is not None
    assert abs(eta - (end_ms - t_ms)) / (end_ms - t_ms) <= 0.2


def test_a_dirty_rate_above_the_link_has_no_eta() -> None:
    samples, _ = _simulate(ram_bytes=256 * MIB, zero_fraction=0.0, link_bps=50 * MIB, dirty_bps=0)
    estimator = EtaEstimator()
    for stats in samples[:10]:
        estimator.add(stats)
    assert estimator.eta_ms() is not None
    later = replace(samples[10], iterations=3, dirty_pages_rate=60 * MIB // PAGE)
    estimator.add(later)
    assert estimator.eta_ms() is None


def test_before_any_rate_is_known_there_is_no_eta() -> None:
    estimator = EtaEstimator()
    assert estimator.eta_ms() is None
    first = _simulate(ram_bytes=64 * MIB, zero_fraction=0.0, link_bps=50 * MIB, dirty_bps=0)[0][0]
    estimator.add(first)
    assert estimator.eta_ms() is None


def test_postcopy_pulls_what_is_left_at_the_links_rate() -> None:
    samples, _ = _simulate(ram_bytes=1 << 30, zero_fraction=0.0, link_bps=50 * MIB, dirty_bps=0)
    estimator = EtaEstimator(tail_ms=0)
    for stats in samples[:20]:
        estimator.add(replace(stats, status=MigrationStatus.POSTCOPY_ACTIVE))
    left_ms = samples[19].remaining_bytes * 1000 / (50 * MIB)
    eta = estimator.eta_ms()
    assert eta is not None
    assert abs(eta - left_ms) / left_ms < 0.05


def test_the_disk_stage_counts_the_disk_left_then_ram() -> None:
    def disk(total_ms: int, copied: int) -> MigrationStats:
        return MigrationStats(
            status=MigrationStatus.NONE,
            stage=Stage.DISK_COPY,
            total_ms=total_ms,
            transferred_bytes=0,
            remaining_bytes=512 * MIB,
            total_bytes=512 * MIB,
            dirty_pages_rate=0,
            page_size=PAGE,
            iterations=0,
            throughput_bps=50 * MIB,
            expected_downtime_ms=None,
            downtime_ms=None,
            disk_copied_bytes=copied,
            disk_total_bytes=400 * MIB,
        )

    estimator = EtaEstimator(EtaHints(zero_fraction=0.5), tail_ms=0)
    estimator.add(disk(1000, 50 * MIB))
    estimator.add(disk(2000, 100 * MIB))
    eta = estimator.eta_ms()
    # 300 MiB of disk, then 256 MiB of RAM data at 50 MiB/s, plus the zero pages' cost.
    assert eta is not None
    assert 11_000 < eta < 12_000


def test_the_disk_rate_is_the_mirrors_progress_not_its_bursts() -> None:
    # QEMU reports each 16 MiB chunk's burst (80 MiB/s, then 0) while the copy keeps 48 MiB/s,
    # and the guest's writes grow the disk left by 4 MiB/s.
    def disk(total_ms: int) -> MigrationStats:
        copied = 48 * MIB * total_ms // 1000
        total = 400 * MIB + 4 * MIB * total_ms // 1000
        return MigrationStats(
            status=MigrationStatus.NONE, stage=Stage.DISK_COPY, total_ms=total_ms,
            transferred_bytes=0, remaining_bytes=512 * MIB, total_bytes=512 * MIB,
            dirty_pages_rate=0, page_size=PAGE, iterations=0,
            throughput_bps=80 * MIB if total_ms // 200 % 2 else 0, expected_downtime_ms=None,
            downtime_ms=None, disk_copied_bytes=copied, disk_total_bytes=total,
        )  # fmt: skip

    estimator = EtaEstimator(EtaHints(zero_fraction=1.0), tail_ms=0)
    for total_ms in range(200, 2001, 200):
        estimator.add(disk(total_ms))
    eta = estimator.eta_ms()
    # 312 MiB left at 48 - 4 = 44 MiB/s; no RAM data (all zero pages, ~0.1 s of them).
    assert eta is not None
    assert 7_000 < eta < 7_400, eta


def _idle(ram_gib: int, resident_gib: float | None) -> Measurement:
    return Measurement(
        ram_bytes=ram_gib << 30, zero_fraction=0.91, compress_ratio=1.0, dirty_rate_bps=0,
        bandwidth_bps=50_000_000,
        resident_bytes=None if resident_gib is None else int(resident_gib * (1 << 30)),
    )  # fmt: skip


def test_a_plan_prices_zero_pages_with_their_first_touches() -> None:
    cal = Calibration.default()
    # A freshly booted 2 GiB guest: its zero pages are holes on both sides, and a touch
    # costs more the larger the guest (what the predictor counts).
    fresh = zero_page_s(_idle(2, 0.2), "precopy", cal)
    allocated = zero_page_s(_idle(2, None), "precopy", cal)  # the source ran a while
    small = zero_page_s(_idle(1, None), "precopy", cal)
    assert fresh is not None
    assert allocated is not None
    assert small is not None
    assert fresh > allocated > small > 1e-6
    assert 2e-6 < allocated < 5e-6  # the recordings: ~3 us a page on the idle 2 GiB guest
    # Multifd's destination stays sparse: an allocated source leaves only the check.
    assert zero_page_s(_idle(2, None), "multifd", cal) == pytest.approx(1e-6)
    hints = EtaHints.planned(_idle(2, None), "precopy", cal)
    assert hints.zero_page_s == allocated
    assert hints.zero_fraction == pytest.approx(0.91)


def test_the_planned_zero_page_cost_stands_until_the_pages_tell() -> None:
    """Early in a first pass of data, the zero pages still to come cost what the plan says."""
    stats = [
        MigrationStats(
            status=MigrationStatus.ACTIVE,
            total_ms=ms,
            transferred_bytes=ms * 50_000,
            remaining_bytes=(2 << 30) - ms * 50_000,
            total_bytes=2 << 30,
            dirty_pages_rate=0,
            page_size=PAGE,
            iterations=1,
            throughput_bps=50_000_000,
            expected_downtime_ms=None,
            downtime_ms=None,
            normal_pages=ms * 50_000 // PAGE,
            zero_pages=0,
        )
        for ms in range(100, 1600, 100)
    ]
    plain, planned = EtaEstimator(EtaHints(0.91)), EtaEstimator(EtaHints(0.91, zero_page_s=3e-6))
    for sample in stats:
        plain.add(sample)
        planned.add(sample)
    plain_ms, planned_ms = plain.eta_ms(), planned.eta_ms()
    assert plain_ms is not None
    assert planned_ms is not None
    zero_pages = 0.91 * (2 << 30) / PAGE
    assert planned_ms - plain_ms == pytest.approx(zero_pages * 2e-6 * 1000, rel=0.05)
