"""Guest-felt downtime: the model, its place in every prediction, and learning it from history."""

from __future__ import annotations

import dataclasses

import pytest

from vmferry.core.calibration import Calibration, CalibrationSample
from vmferry.core.errors import ConfigError
from vmferry.core.felt import (
    MULTIFD_STREAMS,
    NOTSENT_LOWAT_BYTES,
    drain_ms,
    fault_latency_ms,
    postcopy_felt_ms,
    precopy_felt_ms,
)
from vmferry.core.measurement import Measurement
from vmferry.core.model import Prediction
from vmferry.core.predict import predict, predict_all

GIB = 1 << 30
MIB = 1 << 20
CAL = Calibration.default()
LINK_BPS = 25_000_000  # 200 Mbit/s


def guest(
    *, rate_bps: int = 0, queue_ms: float | None = None, cpu_bound: bool = False
) -> Measurement:
    return Measurement(
        ram_bytes=GIB,
        zero_fraction=0.7,
        compress_ratio=1.0,
        dirty_rate_bps=rate_bps,
        bandwidth_bps=LINK_BPS,
        dirty_set_bytes=256 * MIB if rate_bps else None,
        dirty_is_cpu_bound=cpu_bound,
        link_queue_ms=queue_ms,
    )


def test_precopy_felt_adds_the_drain_and_the_resume() -> None:
    m = guest()
    one = (NOTSENT_LOWAT_BYTES + CAL.link_queue_bytes) / (LINK_BPS / 1000)
    assert drain_ms(m, CAL) == pytest.approx(one)
    assert precopy_felt_ms(m, downtime_ms=40, cal=CAL) == round(40 + CAL.resume_felt_ms + one)
    # Multifd waits for both channels' unsent bytes and its flush.
    both = drain_ms(m, CAL, streams=MULTIFD_STREAMS)
    assert precopy_felt_ms(m, downtime_ms=40, cal=CAL, multifd=True) == round(
        40 + CAL.resume_felt_ms + both + CAL.multifd_flush_ms
    )
    # On a link faster than QEMU sends the drain is nothing to speak of.
    fast = dataclasses.replace(m, bandwidth_bps=10_000_000_000)
    assert precopy_felt_ms(fast, downtime_ms=40, cal=CAL) == 40 + CAL.resume_felt_ms


def test_fault_latency_is_service_wire_and_queue() -> None:
    bytes_per_ms = LINK_BPS / 1000
    assert fault_latency_ms(guest(queue_ms=10.0), CAL) == pytest.approx(
        CAL.fault_service_ms + 4096 / bytes_per_ms + 10.0
    )
    # Not measured: the bytes TCP keeps queued at the sending link, at the link's rate.
    assert fault_latency_ms(guest(), CAL) == pytest.approx(
        CAL.fault_service_ms + (CAL.link_queue_bytes + 4096) / bytes_per_ms
    )
    # A link faster than QEMU sends keeps no queue.
    fast = dataclasses.replace(guest(), bandwidth_bps=10_000_000_000)
    assert fault_latency_ms(fast, CAL) < CAL.fault_service_ms + 0.01


def test_postcopy_stall_grows_with_the_queue_and_a_cpu_bound_writer() -> None:
    shallow = postcopy_felt_ms(guest(queue_ms=1.0), CAL, missing_share=1.0)
    deep = postcopy_felt_ms(guest(queue_ms=50.0), CAL, missing_share=1.0)
    assert shallow < deep
    writer = postcopy_felt_ms(
        guest(rate_bps=40_000_000, queue_ms=50.0, cpu_bound=True), CAL, missing_share=1.0
    )
    assert writer > deep
    # Hybrid leaves only the re-dirtied share of the hot set missing.
    assert postcopy_felt_ms(guest(queue_ms=50.0), CAL, missing_share=0.1) < deep


def test_every_prediction_carries_both_figures() -> None:
    m = guest(rate_bps=4_000_000, queue_ms=20.0)
    for p in predict_all(m, downtime_limit_ms=70, cal=CAL):
        assert p.felt_ms is not None
        assert p.downtime_ms is not None
        assert p.felt_ms >= p.downtime_ms
        prediction = p.to_prediction()
        assert prediction is not None
        assert prediction.guest_downtime_ms == p.guest_downtime_ms
        assert prediction.to_json()["guest_downtime_ms"] == p.guest_downtime_ms
    postcopy = predict("postcopy", m, downtime_limit_ms=70, cal=CAL)
    assert postcopy.downtime_ms == CAL.postcopy_switchover_ms
    assert postcopy.felt_ms is not None
    assert postcopy.felt_ms > 20 * CAL.fault_chain  # each of the chain waits in a 20 ms queue
    # A pre-copy knows what a switch to post-copy would cost the guest.
    precopy = predict("precopy", m, downtime_limit_ms=70, cal=CAL)
    assert precopy.switch_felt_ms is not None
    assert precopy.switch_felt_ms <= postcopy.felt_ms
    assert postcopy.switch_felt_ms is None


def test_a_precopy_that_never_converges_has_no_felt_figure_but_a_switch_one() -> None:
    m = guest(rate_bps=80_000_000, queue_ms=5.0)
    p = predict("precopy", m, downtime_limit_ms=70, cal=CAL)
    assert not p.converges
    assert p.guest_downtime_ms is None
    assert p.switch_felt_ms is not None


def _sample(strategy: str, predicted_felt: int, felt: int, qemu: int = 20) -> CalibrationSample:
    return CalibrationSample(
        strategy="postcopy" if strategy == "postcopy" else "precopy",
        predicted=Prediction(10_000, qemu, 1 << 30, predicted_felt),
        actual_total_ms=10_000,
        actual_downtime_ms=qemu,
        actual_guest_downtime_ms=felt,
    )


def test_refined_learns_the_resume_from_precopy_moves() -> None:
    samples = [_sample("precopy", 50, 20 + 70) for _ in range(8)]  # 70 ms felt beyond QEMU
    refined = CAL.refined(samples)
    assert CAL.resume_felt_ms < refined.resume_felt_ms < 70
    assert refined.fault_chain == CAL.fault_chain


def test_refined_scales_the_fault_chain_from_postcopy_stalls() -> None:
    base = CAL.postcopy_switchover_ms + CAL.resume_felt_ms
    samples = [_sample("postcopy", base + 500, base + 250, qemu=1) for _ in range(8)]
    refined = CAL.refined(samples)
    assert 0.5 * CAL.fault_chain < refined.fault_chain < CAL.fault_chain
    assert refined.resume_felt_ms == CAL.resume_felt_ms
    # Records from before felt downtime was predicted teach nothing about it.
    old = dataclasses.replace(samples[0], predicted=Prediction(10_000, 1, 1 << 30))
    assert CAL.refined([old] * 8).fault_chain == CAL.fault_chain


def test_bad_felt_constants_are_refused() -> None:
    with pytest.raises(ConfigError):
        Calibration(fault_chain=-1.0)
    with pytest.raises(ConfigError):
        Calibration(link_queue_bytes=-1)
    with pytest.raises(ConfigError):
        dataclasses.replace(guest(), link_queue_ms=-1.0)


def test_refined_learns_multifd_flush_apart_from_the_resume() -> None:
    flushed = dataclasses.replace(_sample("precopy", 200, 20 + 30 + 400), strategy="multifd")
    refined = CAL.refined([flushed] * 8)
    assert CAL.multifd_flush_ms < refined.multifd_flush_ms < 400
    assert refined.resume_felt_ms == CAL.resume_felt_ms
    p = predict("multifd", guest(), downtime_limit_ms=70, cal=refined)
    assert p.downtime_ms is not None
    beyond_ms = refined.resume_felt_ms + refined.multifd_flush_ms
    drained_ms = drain_ms(guest(), refined, streams=MULTIFD_STREAMS)
    assert p.guest_downtime_ms == round(p.downtime_ms + beyond_ms + drained_ms)


def test_refined_learns_what_each_kind_of_guest_feels_apart() -> None:
    base = CAL.postcopy_switchover_ms + CAL.resume_felt_ms
    lab = dataclasses.replace(_sample("postcopy", base + 500, base + 250, qemu=1), guest="lab")
    own = dataclasses.replace(_sample("postcopy", base + 500, base + 1000, qemu=1), guest="own")
    history = [lab] * 6 + [own] * 6
    assert CAL.refined(history, guest="lab").fault_chain < CAL.fault_chain
    assert CAL.refined(history, guest="own").fault_chain > CAL.fault_chain
    # Too few of its own kind: learnt from every move, as for an unknown kind.
    few = [lab] * 6 + [own] * 2
    assert CAL.refined(few, guest="own").fault_chain == CAL.refined(few).fault_chain
