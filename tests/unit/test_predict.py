"""The migration predictor against the facts measured on this machine kind, plus invariants."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmferry.core.errors import ConfigError
from vmferry.core.felt import drain_ms
from vmferry.core.model import Prediction
from vmferry.core.predict import (
    STRATEGY_NAMES,
    Calibration,
    CalibrationSample,
    Measurement,
    StrategyPrediction,
    format_bytes,
    format_ms,
    predict,
    predict_all,
)
from vmferry.core.strategy import Goal, choose

GIB = 1 << 30
MIB = 1 << 20
CAL = Calibration.default()
LIMIT_MS = 300  # vmferry's default downtime limit, used in every measured run
# What the lab guest holds besides its working set (kernel, initramfs, page cache): an idle
# 1 GiB guest with the default 64 MiB working set sends ~164 MB.
BASE_BYTES = 97_000_000


def lab_guest(
    ws_bytes: int,
    rate_bps: int,
    bandwidth_bps: int,
    *,
    ratio: float = 1.2,
    cpu_bound: bool = False,
) -> Measurement:
    """A 1 GiB lab guest whose working set is dirtied at random at ``rate_bps``."""
    nonzero = BASE_BYTES + ws_bytes
    return Measurement(
        ram_bytes=GIB,
        zero_fraction=1 - nonzero / GIB,
        compress_ratio=ratio,
        dirty_rate_bps=rate_bps,
        bandwidth_bps=bandwidth_bps,
        dirty_set_bytes=ws_bytes if rate_bps else None,
        dirty_is_cpu_bound=cpu_bound,
    )


LOOPBACK_BPS = 10_000_000_000  # loopback is never the limit: QEMU's thread is
SHAPED_200MBIT_BPS = 23_500_000  # TCP goodput through a 200 Mbit/s tbf
IDLE = lab_guest(64 * MIB, 500_000, LOOPBACK_BPS)
BUSY_LOOPBACK = lab_guest(256 * MIB, 50 * MIB, LOOPBACK_BPS)
SHAPED = lab_guest(256 * MIB, 4 * MIB, SHAPED_200MBIT_BPS)
# 80 MB/s over a 50 MB/s cap. The facts do not record its working set; 128 MiB makes the
# non-zero memory (~230 MB) consistent with the measured post-copy time.
OVERRUN = lab_guest(128 * MIB, 80 * MIB, 50_000_000, ratio=6.0)
OVERRUN_RANDOM = lab_guest(128 * MIB, 80 * MIB, 50_000_000, ratio=1.0)


def _p(strategy: str, m: Measurement, limit_ms: int = LIMIT_MS) -> StrategyPrediction:
    return predict(strategy, m, downtime_limit_ms=limit_ms, cal=CAL)


def _within(value: int | None, expected: float, tolerance: float = 0.15) -> bool:
    return value is not None and abs(value - expected) <= tolerance * expected


@dataclass(frozen=True)
class Fact:
    """One measured migration (QEMU 10, TCG, 2 cores) and the ranges it showed."""

    name: str
    strategy: str
    guest: Measurement
    total_ms: tuple[int, int]
    downtime_ms: tuple[int, int]
    transferred_bytes: float | None
    iterations: tuple[int, int] | None


FACTS = [
    # idle 1 GiB over loopback: ~1.0 s, 13-60 ms downtime, 164 MB, 3 syncs.
    Fact("idle-loopback", "precopy", IDLE, (850, 1150), (13, 60), 164e6, (3, 3)),
    # 256 MiB random at 50 MiB/s over loopback: 1.0-1.5 s, 20-90 ms, ~420 MB, 3-4 syncs.
    Fact("busy-loopback", "precopy", BUSY_LOOPBACK, (1000, 1500), (20, 90), 420e6, (3, 4)),
    # 4 MiB/s over 200 Mbit/s: ~19 s, 200-263 ms (15 % slack), ~445 MB, 6-7 syncs.
    Fact("shaped-200mbit", "precopy", SHAPED, (16_150, 21_850), (170, 300), 445e6, (5, 8)),
    # 80 MB/s over 50 MB/s: post-copy ~5.7 s with ~1 ms downtime.
    Fact("overrun-postcopy", "postcopy", OVERRUN, (4845, 6555), (0, 5), None, None),
]


@pytest.mark.parametrize("fact", FACTS, ids=lambda f: f.name)
def test_reproduces_measured_facts(fact: Fact) -> None:
    p = _p(fact.strategy, fact.guest)
    assert p.converges
    assert p.total_ms is not None
    assert fact.total_ms[0] <= p.total_ms <= fact.total_ms[1]
    assert p.downtime_ms is not None
    assert fact.downtime_ms[0] <= p.downtime_ms <= fact.downtime_ms[1]
    if fact.transferred_bytes is not None:
        assert _within(p.transferred_bytes, fact.transferred_bytes)
    if fact.iterations is not None:
        assert p.iterations is not None
        assert fact.iterations[0] <= p.iterations <= fact.iterations[1]


def test_idle_precopy_within_15_percent_of_one_second() -> None:
    assert _within(_p("precopy", IDLE).total_ms, 1000)


def test_shaped_precopy_within_15_percent_of_19_seconds() -> None:
    assert _within(_p("precopy", SHAPED).total_ms, 19_000)


@pytest.mark.parametrize("strategy", ["precopy", "auto-converge"])
def test_overrun_precopy_and_paced_auto_converge_never_finish(strategy: str) -> None:
    p = _p(strategy, OVERRUN)
    assert not p.converges
    assert (p.total_ms, p.downtime_ms, p.transferred_bytes, p.iterations) == (None,) * 4
    assert "never converges" in p.note
    assert "84 MB/s" in p.note
    assert "50 MB/s" in p.note


def test_paced_dirtier_is_not_slowed_by_throttling_but_a_cpu_bound_one_is() -> None:
    paced = _p("auto-converge", OVERRUN)
    cpu = _p("auto-converge", lab_guest(128 * MIB, 80 * MIB, 50_000_000, cpu_bound=True))
    assert not paced.converges
    assert "paced" in paced.note
    assert cpu.converges
    assert cpu.risk is not None
    assert "slower" in cpu.risk
    assert "throttles" in cpu.note


def test_overrun_postcopy_switches_at_once_with_its_risk() -> None:
    p = _p("postcopy", OVERRUN)
    assert p.downtime_ms == CAL.postcopy_switchover_ms
    assert p.risk is not None
    assert "network failure" in p.risk


def test_overrun_multifd_on_compressible_pages_finishes_fast() -> None:
    # Measured ~1 s; the model says ~1.6 s (see the module docs: zero-page detection runs in
    # the multifd threads, which the model does not credit).
    multifd = _p("multifd", OVERRUN)
    assert multifd.converges
    assert multifd.total_ms is not None
    assert multifd.total_ms <= 2000
    postcopy = _p("postcopy", OVERRUN)
    assert postcopy.total_ms is not None
    assert multifd.total_ms < postcopy.total_ms


def test_overrun_xbzrle_finishes_on_compressible_pages_but_slower_than_multifd() -> None:
    xbzrle, multifd = _p("xbzrle", OVERRUN), _p("multifd", OVERRUN)
    assert xbzrle.converges
    assert xbzrle.total_ms is not None
    assert multifd.total_ms is not None
    assert xbzrle.total_ms > multifd.total_ms


def test_random_pages_gain_nothing_from_compression() -> None:
    for strategy in ("multifd", "xbzrle"):
        assert not _p(strategy, OVERRUN_RANDOM).converges, strategy


def test_hybrid_is_one_pass_then_postcopy() -> None:
    hybrid, postcopy = _p("hybrid", OVERRUN_RANDOM), _p("postcopy", OVERRUN_RANDOM)
    assert hybrid.converges
    assert hybrid.downtime_ms == CAL.postcopy_switchover_ms
    assert hybrid.total_ms is not None
    assert postcopy.total_ms is not None
    assert hybrid.total_ms > postcopy.total_ms  # the pass, then the dirtied pages again
    assert hybrid.risk is not None


def test_hybrid_whose_first_pass_fits_finishes_as_precopy() -> None:
    hybrid, precopy = _p("hybrid", IDLE), _p("precopy", IDLE)
    assert (hybrid.total_ms, hybrid.downtime_ms, hybrid.transferred_bytes) == (
        precopy.total_ms,
        precopy.downtime_ms,
        precopy.transferred_bytes,
    )
    assert "finishes as a pre-copy" in hybrid.note


def test_cold_pauses_for_the_whole_copy() -> None:
    cold = _p("cold", SHAPED)
    assert cold.downtime_ms == cold.total_ms
    assert cold.transferred_bytes == round(SHAPED.nonzero_bytes)
    assert "paused" in cold.note


def test_predict_all_covers_every_strategy_in_order() -> None:
    predictions = predict_all(SHAPED, downtime_limit_ms=LIMIT_MS, cal=CAL)
    assert tuple(p.strategy for p in predictions) == STRATEGY_NAMES
    assert all(p.note for p in predictions)


def test_to_prediction() -> None:
    p = _p("precopy", SHAPED)
    assert p.to_prediction() == Prediction(
        p.total_ms or 0, p.downtime_ms or 0, p.transferred_bytes or 0, p.guest_downtime_ms
    )
    felt_ms = (p.downtime_ms or 0) + CAL.resume_felt_ms + drain_ms(SHAPED, CAL)
    assert p.guest_downtime_ms == round(felt_ms)
    assert _p("precopy", OVERRUN).to_prediction() is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ram_bytes": 0},
        {"zero_fraction": 1.5},
        {"zero_fraction": -0.1},
        {"compress_ratio": 0.5},
        {"dirty_rate_bps": -1},
        {"bandwidth_bps": 0},
        {"dirty_set_bytes": -1},
    ],
)
def test_bad_measurements_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        dataclasses.replace(IDLE, **kwargs)


def test_unknown_strategy_and_bad_limit_are_refused() -> None:
    with pytest.raises(ConfigError, match="unknown strategy"):
        _p("teleport", IDLE)
    with pytest.raises(ConfigError):
        _p("precopy", IDLE, limit_ms=0)


def test_bad_calibration_is_refused() -> None:
    with pytest.raises(ConfigError):
        Calibration(qemu_throughput_bps=0)
    with pytest.raises(ConfigError):
        Calibration(postcopy_fault_overhead=0.5)


def _sample(p: StrategyPrediction, slower: float) -> CalibrationSample:
    prediction = p.to_prediction()
    assert prediction is not None
    actual = round(CAL.setup_ms + (prediction.total_ms - CAL.setup_ms) * slower)
    return CalibrationSample(p.strategy, prediction, actual, prediction.downtime_ms + 10)


def test_refined_learns_a_slower_machine_gradually() -> None:
    precopy = _p("precopy", SHAPED)
    samples = [_sample(precopy, 2.0)] * 6
    refined = CAL.refined(samples)
    assert 1.5 < refined.time_scale < 2.0  # shrunk towards 1 by 6 / (6 + 2)
    assert refined.switchover_ms > CAL.switchover_ms
    again = predict("precopy", SHAPED, downtime_limit_ms=LIMIT_MS, cal=refined)
    assert again.total_ms is not None
    assert precopy.total_ms is not None
    assert again.total_ms > 1.4 * precopy.total_ms
    assert CAL.refined(samples[:1]).time_scale < refined.time_scale  # one run moves it less


def test_refined_postcopy_moves_the_fault_overhead_only() -> None:
    postcopy = _p("postcopy", OVERRUN)
    refined = CAL.refined([_sample(postcopy, 1.5)] * 4)
    assert refined.time_scale == CAL.time_scale
    assert refined.postcopy_fault_overhead > CAL.postcopy_fault_overhead
    again = predict("postcopy", OVERRUN, downtime_limit_ms=LIMIT_MS, cal=refined)
    assert again.total_ms is not None
    assert postcopy.total_ms is not None
    assert again.total_ms > postcopy.total_ms


def test_refined_without_samples_changes_nothing() -> None:
    assert CAL.refined([]) == CAL


def test_human_formats() -> None:
    assert format_bytes(420e6) == "420 MB"
    assert format_bytes(1.5e9) == "1.5 GB"
    assert format_bytes(512) == "512 B"
    assert format_ms(85) == "85 ms"
    assert format_ms(1600) == "1.6 s"
    assert format_ms(19_000) == "19 s"
    assert format_ms(300_000) == "5.0 min"


# --- disk -------------------------------------------------------------------------------------

GB = 1_000_000_000
LINK_BPS = 50_000_000  # under QEMU's thread cap, so the link is the limit


def disk_guest(
    copy_bytes: int, write_bps: int, bandwidth_bps: int = LINK_BPS, *, rate_bps: int = 0
) -> Measurement:
    """The idle lab guest with a local disk: ``copy_bytes`` allocated, written at ``write_bps``."""
    return dataclasses.replace(
        lab_guest(64 * MIB, rate_bps, bandwidth_bps),
        disk_copy_bytes=copy_bytes,
        disk_write_bps=write_bps,
    )


def _no_disk(m: Measurement, **changes: Any) -> Measurement:
    return dataclasses.replace(m, disk_copy_bytes=0, disk_write_bps=0, **changes)


def _extra(with_disk: int | None, without: int | None) -> int:
    assert with_disk is not None
    assert without is not None
    return with_disk - without


@pytest.mark.parametrize(
    ("write_bps", "disk_ms", "disk_sent", "throttled"),
    [
        (0, 20_000, 1 * GB, False),  # D / L
        (10_000_000, 25_000, 1.25 * GB, False),  # D / (L - w), re-copies D * w / (L - w)
        (25_000_000, 40_000, 2 * GB, False),  # re-copy reaches D: (D + D) / L
        (40_000_000, 40_000, 2 * GB, False),  # re-copy bounded by what was copied
        (50_000_000, 20_000, 1 * GB, True),  # w >= L: write-blocking from the start, D / L
        (80_000_000, 20_000, 1 * GB, True),
    ],
)
def test_disk_phase_on_a_50mb_link(
    write_bps: int, disk_ms: int, disk_sent: float, throttled: bool
) -> None:
    m = disk_guest(GB, write_bps)
    # Post-copy switches right after the disk phase: its RAM part does not see the mirror.
    with_disk, without = _p("postcopy", m), _p("postcopy", _no_disk(m))
    assert with_disk.disk_ms == disk_ms
    assert abs(_extra(with_disk.total_ms, without.total_ms) - disk_ms) <= 1
    assert abs(_extra(with_disk.transferred_bytes, without.transferred_bytes) - disk_sent) <= 1
    assert with_disk.note.startswith("mirrors 1.0 GB of disk first")
    assert ("throttled" in with_disk.note) == throttled
    assert without.disk_ms == 0


@pytest.mark.parametrize(
    ("write_bps", "ram_link_bps"),
    [
        (0, LINK_BPS),
        (20_000_000, 30_000_000),  # write-blocking mirrors the guest's writes over the link
        (80_000_000, 5_000_000),  # the RAM stream keeps at least 10 % of it
    ],
)
def test_mirrored_writes_take_their_share_of_the_link_until_the_switch(
    write_bps: int, ram_link_bps: int
) -> None:
    m = disk_guest(GB, write_bps)
    # Nothing is dirty in RAM, so the paused copy is empty and the RAM phase is one pass.
    as_if = _p("precopy", _no_disk(m, bandwidth_bps=ram_link_bps))
    with_disk = _p("precopy", m)
    assert abs(_extra(with_disk.total_ms, as_if.total_ms) - with_disk.disk_ms) <= 1
    assert as_if.total_ms is not None
    ram_s = (as_if.total_ms - CAL.setup_ms - CAL.switchover_ms) / 1000.0
    disk_sent = _extra(
        _p("postcopy", m).transferred_bytes, _p("postcopy", _no_disk(m)).transferred_bytes
    )
    mirrored = min(write_bps, 0.9 * LINK_BPS) * ram_s
    assert _within(
        _extra(with_disk.transferred_bytes, as_if.transferred_bytes), disk_sent + mirrored, 0.001
    )


def test_multifd_does_not_compress_the_disk() -> None:
    m = dataclasses.replace(disk_guest(GB, 5_000_000), compress_ratio=6.0)
    multifd, precopy = _p("multifd", m), _p("precopy", m)
    assert multifd.disk_ms == precopy.disk_ms > 0
    assert multifd.total_ms is not None
    assert precopy.total_ms is not None
    assert multifd.total_ms < precopy.total_ms  # RAM still gains


def test_cold_copies_the_disk_while_paused() -> None:
    m = disk_guest(GB, 80_000_000)  # nothing writes while paused: the rate does not matter
    cold, bare = _p("cold", m), _p("cold", _no_disk(m))
    assert cold.downtime_ms == cold.total_ms
    assert cold.disk_ms == 20_000  # the paused rate, capped by the 50 MB/s link
    assert abs(_extra(cold.downtime_ms, bare.downtime_ms) - 20_000) <= 1
    assert _extra(cold.transferred_bytes, bare.transferred_bytes) == GB
    assert "1.0 GB of disk" in cold.note


def test_live_strategies_keep_their_downtime_with_a_disk() -> None:
    m = disk_guest(GB, 10_000_000, rate_bps=2 * MIB)
    for strategy in ("precopy", "multifd", "xbzrle", "auto-converge", "postcopy", "hybrid"):
        p = _p(strategy, m)
        assert p.converges, strategy
        assert p.downtime_ms is not None
        assert p.downtime_ms <= LIMIT_MS + CAL.switchover_ms, strategy
        assert p.disk_ms == 25_000, strategy


def test_a_disk_can_break_a_deadline_the_ram_alone_meets() -> None:
    goal = Goal(max_downtime_ms=LIMIT_MS, deadline_ms=15_000)
    m = disk_guest(GB, 0)
    assert choose(predict_all(_no_disk(m), downtime_limit_ms=LIMIT_MS, cal=CAL), goal).meets_goal
    choice = choose(predict_all(m, downtime_limit_ms=LIMIT_MS, cal=CAL), goal)
    assert not choice.meets_goal
    assert "deadline" in choice.reason


def test_bad_disk_figures_are_refused() -> None:
    with pytest.raises(ConfigError):
        dataclasses.replace(IDLE, disk_copy_bytes=-1)
    with pytest.raises(ConfigError):
        dataclasses.replace(IDLE, disk_write_bps=-1)


# --- properties -------------------------------------------------------------------------------

measurements = st.builds(
    Measurement,
    ram_bytes=st.integers(128 * MIB, 64 * GIB),
    zero_fraction=st.floats(0.0, 0.99),
    compress_ratio=st.floats(1.0, 20.0),
    dirty_rate_bps=st.integers(0, 4_000_000_000),
    bandwidth_bps=st.integers(1_000_000, 20_000_000_000),
    dirty_set_bytes=st.none() | st.integers(0, 64 * GIB),
    dirty_is_cpu_bound=st.booleans(),
)
limits = st.integers(1, 5000)


@settings(max_examples=300, deadline=None)
@given(m=measurements, limit=limits, factor=st.floats(1.0, 100.0))
def test_more_bandwidth_never_predicts_a_longer_precopy(
    m: Measurement, limit: int, factor: float
) -> None:
    slow = predict("precopy", m, downtime_limit_ms=limit, cal=CAL)
    faster = Measurement(
        m.ram_bytes,
        m.zero_fraction,
        m.compress_ratio,
        m.dirty_rate_bps,
        round(m.bandwidth_bps * factor),
        m.dirty_set_bytes,
        m.dirty_is_cpu_bound,
    )
    fast = predict("precopy", faster, downtime_limit_ms=limit, cal=CAL)
    if slow.converges:
        assert fast.converges
        assert fast.total_ms is not None
        assert slow.total_ms is not None
        assert fast.total_ms <= slow.total_ms


@settings(max_examples=300, deadline=None)
@given(m=measurements, limit=limits, factor=st.floats(1.0, 100.0))
def test_a_higher_dirty_rate_never_makes_precopy_converge(
    m: Measurement, limit: int, factor: float
) -> None:
    calm = predict("precopy", m, downtime_limit_ms=limit, cal=CAL)
    busier = Measurement(
        m.ram_bytes,
        m.zero_fraction,
        m.compress_ratio,
        round(m.dirty_rate_bps * factor),
        m.bandwidth_bps,
        m.dirty_set_bytes,
        m.dirty_is_cpu_bound,
    )
    busy = predict("precopy", busier, downtime_limit_ms=limit, cal=CAL)
    if not calm.converges:
        assert not busy.converges


@settings(max_examples=200, deadline=None)
@given(m=measurements, limit=limits)
def test_every_prediction_is_consistent(m: Measurement, limit: int) -> None:
    for p in predict_all(m, downtime_limit_ms=limit, cal=CAL):
        assert p.note
        if p.strategy in ("postcopy", "cold"):
            assert p.converges
        if p.strategy == "cold":
            assert p.downtime_ms == p.total_ms
        if not p.converges:
            assert p.total_ms is None
            assert p.downtime_ms is None
            continue
        assert p.total_ms is not None
        assert p.downtime_ms is not None
        assert p.transferred_bytes is not None
        assert p.iterations is not None
        assert 0 <= p.downtime_ms <= p.total_ms
        assert p.transferred_bytes >= 0.99 * m.nonzero_bytes
        if p.strategy in ("precopy", "multifd", "xbzrle", "auto-converge"):
            # QEMU only switches over once the remainder fits its downtime limit.
            assert p.downtime_ms <= limit + CAL.switchover_ms + 1
            assert p.dirty_headroom is not None
            assert p.dirty_headroom >= 1.0


disk_measurements = st.builds(
    dataclasses.replace,
    measurements,
    disk_copy_bytes=st.integers(0, 256 * GIB),
    disk_write_bps=st.integers(0, 4_000_000_000),
)


@settings(max_examples=200, deadline=None)
@given(m=disk_measurements, limit=limits)
def test_every_prediction_with_a_disk_is_consistent(m: Measurement, limit: int) -> None:
    for p in predict_all(m, downtime_limit_ms=limit, cal=CAL):
        assert p.disk_ms >= 0
        assert (p.disk_ms > 0) <= (m.disk_copy_bytes > 0)
        if p.strategy in ("postcopy", "hybrid", "cold"):
            assert p.converges  # the disk phase always ends
        if not p.converges:
            continue
        assert p.total_ms is not None
        assert p.downtime_ms is not None
        assert p.transferred_bytes is not None
        assert p.total_ms >= p.disk_ms + CAL.setup_ms - 1
        assert p.transferred_bytes >= 0.99 * (m.nonzero_bytes + m.disk_copy_bytes)
        if p.strategy == "cold":
            assert p.downtime_ms == p.total_ms >= p.disk_ms
        else:
            assert p.downtime_ms < max(limit, CAL.postcopy_switchover_ms) + CAL.switchover_ms + 2


@settings(max_examples=200, deadline=None)
@given(m=disk_measurements, limit=limits, more=st.integers(0, 256 * GIB))
def test_more_disk_bytes_never_predict_a_shorter_migration(
    m: Measurement, limit: int, more: int
) -> None:
    bigger = dataclasses.replace(m, disk_copy_bytes=m.disk_copy_bytes + more)
    small = predict_all(m, downtime_limit_ms=limit, cal=CAL)
    big = predict_all(bigger, downtime_limit_ms=limit, cal=CAL)
    for a, b in zip(small, big, strict=True):
        assert b.disk_ms >= a.disk_ms
        if b.converges:
            assert a.converges
            assert a.total_ms is not None
            assert b.total_ms is not None
            assert a.transferred_bytes is not None
            assert b.transferred_bytes is not None
            assert b.total_ms >= a.total_ms
            assert b.transferred_bytes >= a.transferred_bytes


@settings(max_examples=100, deadline=None)
@given(m=disk_measurements, limit=limits)
def test_shared_storage_predicts_as_without_a_disk(m: Measurement, limit: int) -> None:
    # measure_path passes disk_copy_bytes=0 on shared storage, with the write rate as measured.
    shared = dataclasses.replace(m, disk_copy_bytes=0)
    bare = dataclasses.replace(m, disk_copy_bytes=0, disk_write_bps=0)
    assert predict_all(shared, downtime_limit_ms=limit, cal=CAL) == predict_all(
        bare, downtime_limit_ms=limit, cal=CAL
    )


@settings(max_examples=200, deadline=None)
@given(m=disk_measurements, limit=limits, factor=st.floats(1.0, 100.0))
def test_writing_at_least_the_link_rate_still_finishes_live(
    m: Measurement, limit: int, factor: float
) -> None:
    heavy = dataclasses.replace(
        m,
        disk_copy_bytes=max(1, m.disk_copy_bytes),
        disk_write_bps=round(m.bandwidth_bps * factor),
    )
    for strategy in ("postcopy", "hybrid"):
        p = predict(strategy, heavy, downtime_limit_ms=limit, cal=CAL)
        assert p.converges
        assert p.total_ms is not None
        assert math.isfinite(p.total_ms)
        assert "throttled" in p.note


def test_hot_pages_keep_a_slow_links_precopy_from_converging_but_not_multifds() -> None:
    # The matrix's stalled cell: 1.56 MB/s of fresh pages plus ~340 KiB of hot ones, over a
    # 50 Mbit/s link, QEMU's limit 49 ms (a 100 ms goal): every sync of the last rounds finds
    # the hot pages dirty again, above the ~280 KB threshold.
    calm = lab_guest(47 * MIB, 1_560_000, 5_800_000, ratio=1.0)
    hot = dataclasses.replace(calm, hot_bytes=340 << 10)

    assert _p("precopy", calm, 49).converges
    assert not _p("precopy", hot, 49).converges
    assert not _p("xbzrle", hot, 49).converges
    multifd = _p("multifd", hot, 49)
    assert multifd.converges
    assert multifd.total_ms == _p("multifd", calm, 49).total_ms


def test_hot_pages_go_in_the_last_round_of_a_converging_precopy() -> None:
    # Twice the limit (a 100 ms limit, threshold ~580 KB) converges anyway: most hot pages are
    # still unsent at each sync. They lengthen the pause and the rounds.
    calm = lab_guest(47 * MIB, 1_560_000, 5_800_000, ratio=1.0)
    hot = dataclasses.replace(calm, hot_bytes=340 << 10)

    with_hot, without = _p("precopy", hot, 100), _p("precopy", calm, 100)
    assert with_hot.converges
    assert with_hot.downtime_ms is not None
    assert without.downtime_ms is not None
    assert with_hot.downtime_ms > without.downtime_ms
    assert with_hot.total_ms is not None
    assert without.total_ms is not None
    assert with_hot.total_ms > without.total_ms
