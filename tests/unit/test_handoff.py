"""Verified handoff (pure): chunk plans, digests over the wire, comparisons and the verdict."""

from __future__ import annotations

import copy
from collections.abc import Set

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmferry.core.errors import ConfigError
from vmferry.core.handoff import (
    FULL_CHUNK_BYTES,
    SAMPLE_BUDGET_BYTES,
    SAMPLE_CHUNK_BYTES,
    ByteRange,
    ChunkPlan,
    DigestKind,
    Digests,
    HandoffStatus,
    VerifyMode,
    compare,
    handoff_verdict,
    plan_chunks,
)

GIB, MIB, KIB = 1 << 30, 1 << 20, 1 << 10


def digests(
    plan: ChunkPlan, kind: DigestKind = DigestKind.RAM, flip: Set[int] = frozenset()
) -> Digests:
    """Digests whose value depends on the chunk index only (``flip``: these chunks differ)."""
    values = tuple(
        (index ^ (0xFF if index in flip else 0)).to_bytes(16, "big") for index in plan.indexes
    )
    return Digests(kind, plan, values)


@pytest.mark.parametrize(
    ("size", "chunk", "count", "last_range"),
    [
        (GIB, None, GIB // FULL_CHUNK_BYTES, ByteRange(GIB - FULL_CHUNK_BYTES, GIB)),
        (10 * MIB + 1, 4 * MIB, 3, ByteRange(8 * MIB, 10 * MIB + 1)),
        (1, 4 * MIB, 1, ByteRange(0, 1)),
        (4 * MIB, 4 * MIB, 1, ByteRange(0, 4 * MIB)),
    ],
)
def test_full_plan_covers_every_byte(
    size: int, chunk: int | None, count: int, last_range: ByteRange
) -> None:
    plan = plan_chunks(VerifyMode.FULL, size, seed=99, chunk_bytes=chunk)
    assert plan.indexes == tuple(range(count))
    assert plan.chunk_range(plan.indexes[-1]) == last_range
    assert plan.planned_bytes == size


@pytest.mark.parametrize(
    ("size", "chunk", "budget", "count"),
    [
        (GIB, None, None, SAMPLE_BUDGET_BYTES // SAMPLE_CHUNK_BYTES),
        (GIB, 64 * KIB, 64 * KIB, 2),  # a tiny budget still takes the first and last chunk
        (GIB, 4 * KIB, 4 * MIB, 1024),
        (256 * KIB, 64 * KIB, 16 * MIB, 4),  # budget beyond the region: every chunk
        (64 * KIB, 64 * KIB, 16 * MIB, 1),
    ],
)
def test_sample_plan_size_and_ends(
    size: int, chunk: int | None, budget: int | None, count: int
) -> None:
    plan = plan_chunks(VerifyMode.SAMPLE, size, seed=5, chunk_bytes=chunk, budget_bytes=budget)
    assert len(plan.indexes) == count
    assert plan.indexes[0] == 0
    assert plan.indexes[-1] == plan.chunk_count - 1
    assert list(plan.indexes) == sorted(set(plan.indexes))


def test_sample_plan_is_a_function_of_its_seed() -> None:
    a = plan_chunks(VerifyMode.SAMPLE, GIB, seed=1)
    assert a == plan_chunks(VerifyMode.SAMPLE, GIB, seed=1)
    assert a.indexes != plan_chunks(VerifyMode.SAMPLE, GIB, seed=2).indexes
    # Pinned: two hosts (any Python) must draw the same chunks from the same seed.
    pinned = plan_chunks(
        VerifyMode.SAMPLE, 64 * MIB, seed=1, chunk_bytes=64 * KIB, budget_bytes=8 * 64 * KIB
    )
    assert pinned.indexes == (
        0, 201, 350, 466, 569, 691, 805, 1023
    )  # fmt: skip


@pytest.mark.parametrize(
    ("mode", "size", "chunk", "budget"),
    [
        (VerifyMode.OFF, GIB, None, None),
        (VerifyMode.FULL, 0, None, None),
        (VerifyMode.FULL, GIB, 0, None),
        (VerifyMode.SAMPLE, GIB, None, 0),
        (VerifyMode.SAMPLE, -1, None, None),
    ],
)
def test_bad_plans_are_refused(
    mode: VerifyMode, size: int, chunk: int | None, budget: int | None
) -> None:
    with pytest.raises(ConfigError):
        plan_chunks(mode, size, 0, chunk_bytes=chunk, budget_bytes=budget)


@pytest.mark.parametrize("indexes", [(1, 1), (2, 1), (-1,), (4,)])
def test_plan_indexes_must_increase_within_the_region(indexes: tuple[int, ...]) -> None:
    with pytest.raises(ConfigError):
        ChunkPlan(VerifyMode.SAMPLE, 4 * MIB, MIB, indexes)


def test_compare_names_differing_chunks_and_merges_their_ranges() -> None:
    plan = plan_chunks(VerifyMode.FULL, 10 * MIB, 0, chunk_bytes=MIB)
    result = compare(digests(plan), digests(plan, flip={2, 3, 7, 9}))
    assert result.differing == (2, 3, 7, 9)
    assert not result.is_equal
    assert result.differing_ranges == (
        ByteRange(2 * MIB, 4 * MIB),
        ByteRange(7 * MIB, 8 * MIB),
        ByteRange(9 * MIB, 10 * MIB),
    )
    assert (result.compared_chunks, result.compared_bytes) == (10, 10 * MIB)


def test_compare_refuses_digests_of_different_plans() -> None:
    full = plan_chunks(VerifyMode.FULL, GIB, 0)
    cases = [
        (digests(full), digests(plan_chunks(VerifyMode.FULL, 2 * GIB, 0))),
        (digests(full), digests(plan_chunks(VerifyMode.FULL, GIB, 0, chunk_bytes=MIB))),
        (
            digests(plan_chunks(VerifyMode.SAMPLE, GIB, 1)),
            digests(plan_chunks(VerifyMode.SAMPLE, GIB, 2)),
        ),
        (digests(full), digests(full, DigestKind.DISK)),
    ]
    for source, destination in cases:
        with pytest.raises(ConfigError, match=r"compare|plan"):
            compare(source, destination)


def test_digests_travel_as_json() -> None:
    plan = plan_chunks(VerifyMode.SAMPLE, GIB, seed=3)
    sent = Digests(DigestKind.DISK, plan, digests(plan).values, elapsed_ms=4.5)
    data = sent.to_json()
    assert data["indexes"][0] == [0, 1]  # type: ignore[index]
    assert Digests.from_json(data) == sent
    full = digests(plan_chunks(VerifyMode.FULL, GIB, 0))
    assert full.to_json()["indexes"] == [[0, GIB // FULL_CHUNK_BYTES]]  # one run
    assert Digests.from_json(full.to_json()) == full


def _broken(**changes: object) -> dict[str, object]:
    data = copy.deepcopy(digests(plan_chunks(VerifyMode.FULL, 16 * MIB, 0)).to_json())
    data.update(changes)
    return data


@pytest.mark.parametrize(
    "data",
    [
        [],
        "digests",
        _broken(kind="swap"),
        _broken(mode="off"),
        _broken(mode=None),
        _broken(size_bytes="1G"),
        _broken(size_bytes=True),
        _broken(chunk_bytes=None),
        _broken(seed="x"),
        _broken(elapsed_ms=-1),
        _broken(algorithm="md5"),
        _broken(algorithm=None),
        _broken(indexes="0-3"),
        _broken(indexes=[[0, 2], [2, 4], [4, 5]]),  # more runs than digests
        _broken(indexes=[[0, 10**12]]),  # must not expand before checking
        _broken(indexes=[[3, 1]]),
        _broken(indexes=[[0, 2, 4]]),
        _broken(indexes=[[2, 4], [0, 2]]),  # out of order
        _broken(digests=["00" * 16] * 3),  # fewer digests than chunks
        _broken(digests=["zz" * 16] * 4),
        _broken(digests=["00" * 8] * 4),
        _broken(digests=[0, 1, 2, 3]),
        _broken(digests=None),
    ],
)
def test_malformed_digests_are_config_errors(data: object) -> None:
    with pytest.raises(ConfigError):
        Digests.from_json(data)


def test_verdict_of_equal_differing_and_skipped_handoffs() -> None:
    ram = plan_chunks(VerifyMode.FULL, 64 * MIB, 0, chunk_bytes=MIB)
    disk = plan_chunks(VerifyMode.FULL, GIB, 0)
    equal = handoff_verdict(VerifyMode.FULL, ram=compare(digests(ram), digests(ram)), disk=None)
    assert (equal.status, equal.ok) == (HandoffStatus.VERIFIED, True)
    assert equal.to_json() == {
        "mode": "full",
        "status": "verified",
        "ok": True,
        "ram": {
            "ok": True,
            "chunks_compared": 64,
            "bytes_compared": 64 * MIB,
            "differing_chunks": 0,
            "differing_ranges": [],
            "source_ms": 0.0,
            "destination_ms": 0.0,
        },
        "disk": None,
        "note": None,
    }
    every_other = set(range(0, 64, 2))
    bad = handoff_verdict(
        VerifyMode.FULL,
        ram=compare(digests(ram), digests(ram, flip=every_other)),
        disk=compare(digests(disk, DigestKind.DISK), digests(disk, DigestKind.DISK)),
    )
    assert (bad.status, bad.ok) == (HandoffStatus.DIFFERS, False)
    assert bad.ram is not None
    assert bad.ram.differing_chunks == 32
    assert len(bad.ram.differing_ranges) == 10  # the report keeps the first few
    assert bad.disk is not None
    assert bad.disk.ok
    skipped = handoff_verdict(VerifyMode.FULL, ram=None, disk=None, note="post-copy")
    assert (skipped.status, skipped.ok, skipped.to_json()["note"]) == (
        HandoffStatus.SKIPPED,
        True,
        "post-copy",
    )


sizes = st.integers(min_value=1, max_value=64 * GIB)
chunks = st.sampled_from([4 * KIB, 64 * KIB, MIB, 4 * MIB])
seeds = st.integers(min_value=0, max_value=(1 << 64) - 1)


@given(
    mode=st.sampled_from([VerifyMode.FULL, VerifyMode.SAMPLE]),
    size=st.integers(min_value=1, max_value=64 * GIB),
    seed=seeds,
)
def test_a_side_never_differs_from_itself(mode: VerifyMode, size: int, seed: int) -> None:
    plan = plan_chunks(mode, size, seed)
    assert compare(digests(plan), digests(plan)).is_equal
    assert Digests.from_json(digests(plan).to_json()) == digests(plan)


@given(size=st.integers(min_value=1, max_value=64 * MIB), chunk=chunks, data=st.data())
def test_full_mode_finds_any_single_flipped_chunk(
    size: int, chunk: int, data: st.DataObject
) -> None:
    plan = plan_chunks(VerifyMode.FULL, size, 0, chunk_bytes=chunk)
    flipped = data.draw(st.integers(min_value=0, max_value=plan.chunk_count - 1))
    result = compare(digests(plan), digests(plan, flip={flipped}))
    assert result.differing == (flipped,)
    assert result.differing_ranges == (plan.chunk_range(flipped),)


@given(size=sizes, seed=seeds, data=st.data())
def test_sample_mode_always_hits_a_long_damaged_run(
    size: int, seed: int, data: st.DataObject
) -> None:
    """Any damaged run of at least two strata meets a sampled chunk, whatever the seed."""
    plan = plan_chunks(VerifyMode.SAMPLE, size, seed)
    count, strata = plan.chunk_count, len(plan.indexes)
    run = min(count, 2 * -(-count // strata))
    start = data.draw(st.integers(min_value=0, max_value=count - run))
    assert any(start <= index < start + run for index in plan.indexes)
    assert plan.planned_bytes <= max(SAMPLE_BUDGET_BYTES, 2 * SAMPLE_CHUNK_BYTES)
