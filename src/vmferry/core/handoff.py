"""Verified handoff: which chunks of guest RAM or a disk to hash, what two digests say (pure).

After a pre-copy move both copies are stopped; each side's agent hashes the same chunks of its
copy (:class:`ChunkPlan`), sends the :class:`Digests` over HTTP, and the controller compares them
(:func:`compare`) before the destination runs. A chunk's digest is xxh3_128 of its guest-visible
bytes, so a never-written region (a hole in a memfd, an unallocated qcow2 cluster) hashes like the
zeros it reads as, and two layouts of the same content hash alike.

``full`` hashes every chunk. ``sample`` hashes one small chunk at a seeded random place in each of
``k`` equal strata of the region, always the first and the last chunk: it costs a few ms, and any
damaged run of at least two strata (``2 * size / k`` bytes) is found whatever the seed. The
defaults come from ``bench/digest.py`` (see ``bench/README.md``).

Usage::

    plan = plan_chunks(VerifyMode.SAMPLE, size_bytes=1 << 30, seed=seed)
    # each agent: Digests(DigestKind.RAM, plan, values)  ->  to_json() over HTTP
    result = compare(Digests.from_json(src), Digests.from_json(dst))
    verdict = handoff_verdict(VerifyMode.SAMPLE, ram=result, disk=None)
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from vmferry.core.errors import ConfigError

__all__ = [
    "ALGORITHM",
    "DIGEST_BYTES",
    "FULL_CHUNK_BYTES",
    "SAMPLE_BUDGET_BYTES",
    "SAMPLE_CHUNK_BYTES",
    "ByteRange",
    "ChunkPlan",
    "Comparison",
    "DigestKind",
    "Digests",
    "HandoffStatus",
    "HandoffVerdict",
    "RegionCheck",
    "VerifyMode",
    "compare",
    "handoff_verdict",
    "plan_chunks",
]

ALGORITHM = "xxh3_128"
DIGEST_BYTES = 16

# Chosen with bench/digest.py on this machine kind (2 cores): see bench/README.md. A sample
# runs while the guest is paused: 256 chunks of 16 KiB cost ~1.7 ms per side for 1 GiB (each
# chunk has a fixed ~5 us cost, so fewer, larger chunks than pages; 64 KiB chunks cost twice).
FULL_CHUNK_BYTES = 2 << 20
SAMPLE_CHUNK_BYTES = 16 << 10
SAMPLE_BUDGET_BYTES = 4 << 20

_MAX_REPORTED_RANGES = 10
_E = TypeVar("_E", bound=enum.StrEnum)
_MASK64 = (1 << 64) - 1


class VerifyMode(enum.StrEnum):
    """How much of both copies to compare before the destination runs."""

    FULL = "full"
    SAMPLE = "sample"
    OFF = "off"


class DigestKind(enum.StrEnum):
    """What was hashed: guest RAM or a disk's guest-visible content."""

    RAM = "ram"
    DISK = "disk"


class HandoffStatus(enum.StrEnum):
    """The outcome of a handoff check."""

    VERIFIED = "verified"  # every compared chunk equal
    DIFFERS = "differs"  # some chunk differed: the destination must not run
    SKIPPED = "skipped"  # nothing compared (``--verify off``, post-copy)


@dataclass(frozen=True, slots=True)
class ByteRange:
    """A run of bytes ``[start_bytes, end_bytes)`` of a region."""

    start_bytes: int
    end_bytes: int

    @property
    def length_bytes(self) -> int:
        return self.end_bytes - self.start_bytes

    def to_json(self) -> dict[str, object]:
        return {"start_bytes": self.start_bytes, "end_bytes": self.end_bytes}


@dataclass(frozen=True, slots=True)
class ChunkPlan:
    """Which chunks of a region of ``size_bytes`` to hash.

    Chunk ``i`` covers ``[i * chunk_bytes, min((i + 1) * chunk_bytes, size_bytes))``; the last chunk
    may be short. ``indexes`` is strictly increasing.

    Raises:
        ConfigError: sizes not positive, or indexes out of order or out of range.
    """

    mode: VerifyMode
    size_bytes: int
    chunk_bytes: int
    indexes: tuple[int, ...]
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.mode is VerifyMode.OFF:
            raise ConfigError("verify mode 'off' hashes nothing: there is no plan to make")
        if self.size_bytes <= 0 or self.chunk_bytes <= 0:
            raise ConfigError(
                f"a chunk plan needs positive sizes (size {self.size_bytes} bytes, "
                f"chunk {self.chunk_bytes} bytes)"
            )
        count = self.chunk_count
        previous = -1
        for index in self.indexes:
            if not previous < index < count:
                raise ConfigError(
                    f"chunk index {index} out of order or outside 0..{count - 1} in a chunk plan"
                )
            previous = index

    @property
    def chunk_count(self) -> int:
        """Chunks in the whole region (hashed or not)."""
        return -(-self.size_bytes // self.chunk_bytes)

    def chunk_range(self, index: int) -> ByteRange:
        """The bytes chunk ``index`` covers."""
        start = index * self.chunk_bytes
        return ByteRange(start, min(start + self.chunk_bytes, self.size_bytes))

    @property
    def planned_bytes(self) -> int:
        """Bytes the plan hashes."""
        return sum(self.chunk_range(i).length_bytes for i in self.indexes)


def plan_chunks(
    mode: VerifyMode,
    size_bytes: int,
    seed: int,
    *,
    chunk_bytes: int | None = None,
    budget_bytes: int | None = None,
) -> ChunkPlan:
    """The chunks both sides hash for ``mode`` over a region of ``size_bytes``.

    Args:
        mode: ``full`` (every chunk of ``chunk_bytes``, default :data:`FULL_CHUNK_BYTES`) or
            ``sample`` (chunks of ``chunk_bytes``, default :data:`SAMPLE_CHUNK_BYTES`, as many as
            ``budget_bytes`` holds, default :data:`SAMPLE_BUDGET_BYTES`, at least two).
        size_bytes: the region's size (guest RAM, a disk's virtual size).
        seed: chooses the sampled chunks (the controller draws it; both sides get the same plan).
            Full plans ignore it.
        chunk_bytes: overrides the mode's chunk size.
        budget_bytes: overrides the sample's byte budget.

    Raises:
        ConfigError: mode ``off``, or a size or budget not positive.
    """
    if mode is VerifyMode.OFF:
        raise ConfigError("verify mode 'off' hashes nothing: there is no plan to make")
    if mode is VerifyMode.FULL:
        chunk = FULL_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
        if chunk <= 0 or size_bytes <= 0:
            raise ConfigError(f"bad sizes for a chunk plan: {size_bytes} / {chunk} bytes")
        return ChunkPlan(mode, size_bytes, chunk, tuple(range(-(-size_bytes // chunk))))
    chunk = SAMPLE_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    budget = SAMPLE_BUDGET_BYTES if budget_bytes is None else budget_bytes
    if chunk <= 0 or size_bytes <= 0 or budget <= 0:
        raise ConfigError(f"bad sizes for a sample plan: {size_bytes} / {chunk} / {budget} bytes")
    count = -(-size_bytes // chunk)
    strata = min(count, max(2, budget // chunk))
    seed64 = seed & _MASK64
    indexes = []
    for stratum in range(strata):
        low, high = stratum * count // strata, (stratum + 1) * count // strata
        if stratum == 0:
            indexes.append(0)
        elif stratum == strata - 1:
            indexes.append(count - 1)
        else:
            indexes.append(
                low + _splitmix64(seed64 ^ (stratum * 0x9E3779B97F4A7C15)) % (high - low)
            )
    return ChunkPlan(mode, size_bytes, chunk, tuple(indexes), seed64)


def _splitmix64(x: int) -> int:
    # Our own generator: the plan must be the same on two hosts whatever Python they run.
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


@dataclass(frozen=True, slots=True)
class Digests:
    """One side's digests of one region: ``values[j]`` is the digest of chunk ``plan.indexes[j]``.

    Attributes:
        kind: guest RAM or a disk.
        plan: what was hashed.
        values: xxh3_128 digests (16 bytes, canonical big-endian), one per planned chunk.
        elapsed_ms: how long hashing took on that side (not part of what is compared).
        algorithm: the hash function's name.

    Raises:
        ConfigError: not one 16-byte digest per planned chunk, or an unknown algorithm.
    """

    kind: DigestKind
    plan: ChunkPlan
    values: tuple[bytes, ...]
    elapsed_ms: float = 0.0
    algorithm: str = ALGORITHM

    def __post_init__(self) -> None:
        if self.algorithm != ALGORITHM:
            raise ConfigError(f"unknown digest algorithm {self.algorithm!r} (need {ALGORITHM})")
        if len(self.values) != len(self.plan.indexes):
            raise ConfigError(
                f"{len(self.values)} digests for {len(self.plan.indexes)} planned chunks"
            )
        if any(len(value) != DIGEST_BYTES for value in self.values):
            raise ConfigError(f"every digest must be {DIGEST_BYTES} bytes")

    def to_json(self) -> dict[str, object]:
        plan = self.plan
        return {
            "kind": str(self.kind),
            "algorithm": self.algorithm,
            "mode": str(plan.mode),
            "size_bytes": plan.size_bytes,
            "chunk_bytes": plan.chunk_bytes,
            "seed": plan.seed,
            "indexes": [list(run) for run in _runs(plan.indexes)],
            "digests": [value.hex() for value in self.values],
            "elapsed_ms": self.elapsed_ms,
        }

    @classmethod
    def from_json(cls, data: object) -> Digests:
        """Raises: ConfigError on missing, mistyped or inconsistent fields."""
        if not isinstance(data, dict):
            raise ConfigError("digests must be a JSON object")
        kind = _enum(DigestKind, data.get("kind"), "digest kind")
        mode = _enum(VerifyMode, data.get("mode"), "verify mode")
        size, chunk = _int(data, "size_bytes"), _int(data, "chunk_bytes")
        seed = data.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ConfigError("digests 'seed' must be an integer or null")
        elapsed, algorithm = data.get("elapsed_ms", 0.0), data.get("algorithm")
        if isinstance(elapsed, bool) or not isinstance(elapsed, int | float) or elapsed < 0:
            raise ConfigError("digests 'elapsed_ms' must be a non-negative number")
        if not isinstance(algorithm, str):
            raise ConfigError("digests need an 'algorithm'")
        values = _hex_values(data.get("digests"))
        plan = ChunkPlan(mode, size, chunk, _unruns(data.get("indexes"), len(values)), seed)
        return cls(kind, plan, values, float(elapsed), algorithm)


def _enum(kind: type[_E], value: object, what: str) -> _E:
    for member in kind:
        if value == member.value:
            return member
    raise ConfigError(f"unknown {what} {value!r}: use {', '.join(m.value for m in kind)}")


def _int(data: dict[object, object], key: str) -> int:
    value = data.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"digests need an integer {key!r}")
    return value


def _runs(indexes: Sequence[int]) -> list[tuple[int, int]]:
    """Consecutive indexes as ``[start, stop)`` runs (a full plan is one run)."""
    runs: list[tuple[int, int]] = []
    for index in indexes:
        if runs and runs[-1][1] == index:
            runs[-1] = (runs[-1][0], index + 1)
        else:
            runs.append((index, index + 1))
    return runs


def _unruns(data: object, count: int) -> tuple[int, ...]:
    """The runs' indexes; ``count`` (the number of digests) bounds what a bad run may expand to."""
    if not isinstance(data, list):
        raise ConfigError("digests 'indexes' must be a list of [start, stop] runs")
    indexes: list[int] = []
    for run in data:
        if not (
            isinstance(run, list)
            and len(run) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) for x in run)
            and 0 <= run[0] < run[1]
        ):
            raise ConfigError(f"bad index run {run!r}: need [start, stop] with start < stop")
        if len(indexes) + run[1] - run[0] > count:
            raise ConfigError(f"the index runs name more chunks than the {count} digests")
        indexes.extend(range(run[0], run[1]))
    return tuple(indexes)


def _hex_values(data: object) -> tuple[bytes, ...]:
    if not isinstance(data, list):
        raise ConfigError("digests 'digests' must be a list of hex strings")
    values: list[bytes] = []
    for text in data:
        if not isinstance(text, str) or len(text) != 2 * DIGEST_BYTES:
            raise ConfigError(f"bad digest {text!r}: need {2 * DIGEST_BYTES} hex digits")
        try:
            values.append(bytes.fromhex(text))
        except ValueError as err:
            raise ConfigError(f"bad digest {text!r}: not hex") from err
    return tuple(values)


@dataclass(frozen=True, slots=True)
class Comparison:
    """Both sides' digests of one region, chunk by chunk.

    Attributes:
        kind: guest RAM or a disk.
        plan: the plan both sides hashed.
        differing: the indexes of the chunks whose digests differ (increasing).
        source_ms: the source's hashing time.
        destination_ms: the destination's hashing time.
    """

    kind: DigestKind
    plan: ChunkPlan
    differing: tuple[int, ...]
    source_ms: float = 0.0
    destination_ms: float = 0.0

    @property
    def is_equal(self) -> bool:
        return not self.differing

    @property
    def compared_chunks(self) -> int:
        return len(self.plan.indexes)

    @property
    def compared_bytes(self) -> int:
        return self.plan.planned_bytes

    @property
    def differing_ranges(self) -> tuple[ByteRange, ...]:
        """The differing chunks as byte ranges, adjacent chunks merged into one range."""
        return tuple(
            ByteRange(
                self.plan.chunk_range(start).start_bytes, self.plan.chunk_range(stop - 1).end_bytes
            )
            for start, stop in _runs(self.differing)
        )


def compare(source: Digests, destination: Digests) -> Comparison:
    """Compare two sides' digests of the same region.

    Raises:
        ConfigError: the two were not hashed over the same plan (kind, size, chunk size, indexes)
            or with the same algorithm: nothing can be concluded from them.
    """
    if source.kind is not destination.kind:
        raise ConfigError(f"cannot compare {source.kind} digests with {destination.kind} digests")
    if source.algorithm != destination.algorithm:
        raise ConfigError(
            f"cannot compare {source.algorithm} digests with {destination.algorithm} digests"
        )
    a, b = source.plan, destination.plan
    if (a.size_bytes, a.chunk_bytes, a.indexes) != (b.size_bytes, b.chunk_bytes, b.indexes):
        raise ConfigError(
            f"the two {source.kind} digests were not hashed over the same plan "
            f"(source {a.size_bytes} bytes in {len(a.indexes)} chunks of {a.chunk_bytes}, "
            f"destination {b.size_bytes} bytes in {len(b.indexes)} chunks of {b.chunk_bytes})"
        )
    differing = tuple(
        index
        for index, x, y in zip(a.indexes, source.values, destination.values, strict=True)
        if x != y
    )
    return Comparison(source.kind, a, differing, source.elapsed_ms, destination.elapsed_ms)


@dataclass(frozen=True, slots=True)
class RegionCheck:
    """What the report says about one compared region."""

    kind: DigestKind
    chunks_compared: int
    bytes_compared: int
    differing_chunks: int
    differing_ranges: tuple[ByteRange, ...]  # the first few only
    source_ms: float
    destination_ms: float

    @property
    def ok(self) -> bool:
        return self.differing_chunks == 0

    @classmethod
    def of(cls, comparison: Comparison) -> RegionCheck:
        return cls(
            kind=comparison.kind,
            chunks_compared=comparison.compared_chunks,
            bytes_compared=comparison.compared_bytes,
            differing_chunks=len(comparison.differing),
            differing_ranges=comparison.differing_ranges[:_MAX_REPORTED_RANGES],
            source_ms=comparison.source_ms,
            destination_ms=comparison.destination_ms,
        )

    def to_json(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "chunks_compared": self.chunks_compared,
            "bytes_compared": self.bytes_compared,
            "differing_chunks": self.differing_chunks,
            "differing_ranges": [r.to_json() for r in self.differing_ranges],
            "source_ms": round(self.source_ms, 1),
            "destination_ms": round(self.destination_ms, 1),
        }


@dataclass(frozen=True, slots=True)
class HandoffVerdict:
    """The report's ``handoff`` entry: what was compared and whether the copies agreed.

    Attributes:
        mode: the verify mode asked for.
        ram: the RAM comparison, None when nothing was compared.
        disk: the local disk's comparison, None without a local disk (or nothing compared).
        note: why nothing was compared, or what else vouched for the guest (e.g. post-copy).
    """

    mode: VerifyMode
    ram: RegionCheck | None
    disk: RegionCheck | None
    note: str | None = None

    @property
    def status(self) -> HandoffStatus:
        checks = [c for c in (self.ram, self.disk) if c is not None]
        if not checks:
            return HandoffStatus.SKIPPED
        return HandoffStatus.VERIFIED if all(c.ok for c in checks) else HandoffStatus.DIFFERS

    @property
    def ok(self) -> bool:
        """False only when some chunk differed (a skipped check is not a failed one)."""
        return self.status is not HandoffStatus.DIFFERS

    def to_json(self) -> dict[str, object]:
        return {
            "mode": str(self.mode),
            "status": str(self.status),
            "ok": self.ok,
            "ram": None if self.ram is None else self.ram.to_json(),
            "disk": None if self.disk is None else self.disk.to_json(),
            "note": self.note,
        }


def handoff_verdict(
    mode: VerifyMode,
    *,
    ram: Comparison | None,
    disk: Comparison | None,
    note: str | None = None,
) -> HandoffVerdict:
    """The verdict of a handoff from its comparisons (None where nothing was compared)."""
    return HandoffVerdict(
        mode,
        None if ram is None else RegionCheck.of(ram),
        None if disk is None else RegionCheck.of(disk),
        note,
    )
