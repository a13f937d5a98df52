"""ZeroPricing: what a pre-copy tells QEMU its switchover bandwidth is, from its progress."""

from __future__ import annotations

from vmferry.core.blind import ZeroPricing
from vmferry.core.model import MigrationOptions, MigrationStats
from vmferry.core.status import MigrationStatus
from vmferry.qemu.migration import source_parameters_for

_LINK_BPS = 25_000_000  # 200 Mbit/s
_PAGE = 4096


def _sample(
    ms: int, syncs: int, zero_pages: int, normal_pages: int, rate_bps: int = 0
) -> MigrationStats:
    return MigrationStats(
        status=MigrationStatus.ACTIVE, total_ms=ms, transferred_bytes=0, remaining_bytes=0,
        total_bytes=1 << 30, dirty_pages_rate=0, page_size=_PAGE, iterations=syncs,
        throughput_bps=rate_bps, expected_downtime_ms=None, downtime_ms=None,
        normal_pages=normal_pages, zero_pages=zero_pages,
    )  # fmt: skip


def _rounds(
    pricing: ZeroPricing, start_ms: int, rounds: int, zero_per_round: int, data_per_round: int
) -> list[int]:
    """Feed 100 ms samples of ~4 rounds each (27 ms rounds, as measured); what was told."""
    told, syncs, zeros, normal = [], 3, 0, 0
    for step in range(rounds):
        syncs += 4
        zeros += 4 * zero_per_round // _PAGE
        normal += 4 * data_per_round // _PAGE
        answer = pricing.feed(_sample(start_ms + 100 * step, syncs, zeros, normal))
        if answer is not None:
            told.append(answer)
    return told


def _after_first_pass(limit_ms: int = 150) -> ZeroPricing:
    pricing = ZeroPricing(limit_ms)
    for ms in range(0, 4000, 100):  # the first pass: data at the link's rate
        assert pricing.feed(_sample(ms, 1, 0, ms * 6, _LINK_BPS)) is None
    return pricing


def test_rounds_of_zero_pages_are_priced_once_three_syncs_and_300_ms_show_them() -> None:
    pricing = _after_first_pass()
    told = _rounds(pricing, 4000, 10, zero_per_round=19_000_000, data_per_round=8192)
    # The link's rate plus two rounds of zero pages per 150 ms limit, told once.
    assert len(told) == 1
    expected = _LINK_BPS + 2 * 19_000_000 / 0.150
    assert abs(told[0] - expected) / expected < 0.01
    # QEMU's threshold then covers the data it would switch with anyway and those pages.
    assert told[0] * 0.150 > _LINK_BPS * 0.150 + 19_000_000


def test_more_zero_pages_per_round_raise_it_again_and_growing_data_sets_it_back() -> None:
    pricing = _after_first_pass()
    first = _rounds(pricing, 4000, 6, zero_per_round=10_000_000, data_per_round=0)
    more = _rounds(pricing, 5000, 6, zero_per_round=40_000_000, data_per_round=0)
    assert len(first) == 1
    assert len(more) == 1
    assert more[0] > 1.5 * first[0]
    # The guest now re-sends data that does not fit half the limit at the link's rate.
    back = _rounds(pricing, 6000, 6, zero_per_round=40_000_000, data_per_round=5_000_000)
    assert back == [_LINK_BPS]


def test_a_guest_that_rewrites_few_zero_pages_is_left_to_qemu() -> None:
    pricing = _after_first_pass()
    assert _rounds(pricing, 4000, 20, zero_per_round=40_000, data_per_round=100_000) == []


def test_data_that_does_not_fit_the_limit_is_never_priced_away() -> None:
    pricing = _after_first_pass()
    # 4 MB of data a round at 25 MB/s is 160 ms: over a 150 ms limit.
    assert _rounds(pricing, 4000, 20, zero_per_round=19_000_000, data_per_round=4_000_000) == []


def test_a_paced_writer_whose_zero_pages_and_data_together_miss_the_threshold_is_priced() -> None:
    # Measured: ~760 kB of zero pages and ~690 kB of data a round, a 50 ms limit at 25 MB/s.
    pricing = _after_first_pass(limit_ms=50)
    [told] = _rounds(pricing, 4000, 6, zero_per_round=760_000, data_per_round=690_000)
    assert told * 0.050 > 760_000 + 690_000  # QEMU's threshold now takes a round of both


def test_a_capped_stream_takes_its_cap_as_the_link() -> None:
    pricing = ZeroPricing(300, 10_000_000.0, capped=True)
    pricing.feed(_sample(0, 1, 0, 0, 90_000_000))  # a burst into the socket's buffers
    [told] = _rounds(pricing, 4000, 6, zero_per_round=6_000_000, data_per_round=0)
    assert abs(told - (10_000_000 + 2 * 6_000_000 / 0.3)) < 10_000  # whole pages a round


def test_every_move_starts_from_qemus_own_estimate() -> None:
    # A source whose cancelled attempt was told a figure keeps it: each start resets it.
    for mechanism in ("precopy", "multifd", "hybrid"):
        params = source_parameters_for(MigrationOptions(mechanism=mechanism))
        assert params["avail-switchover-bandwidth"] == 0
