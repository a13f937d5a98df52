"""Workload specs: the CLI syntax, its errors, and the kernel arguments the guest reads."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmferry.core.errors import ConfigError
from vmferry.core.workload import (
    DEFAULT_DISK_SIZE_BYTES,
    Mode,
    Pattern,
    WorkloadSpec,
    format_size,
    parse_size,
    parse_workload,
)

MiB = 1 << 20


@pytest.mark.parametrize(
    ("text", "size_bytes"),
    [
        ("0", 0),
        ("4096", 4096),
        ("4096B", 4096),
        ("64K", 64 << 10),
        ("64k", 64 << 10),
        ("64KiB", 64 << 10),
        ("256M", 256 * MiB),
        ("256MiB", 256 * MiB),
        ("256mib", 256 * MiB),
        ("1G", 1 << 30),
        ("2GiB", 2 << 30),
        ("1T", 1 << 40),
        (" 50M ", 50 * MiB),
    ],
)
def test_parse_size(text: str, size_bytes: int) -> None:
    assert parse_size(text) == size_bytes


@pytest.mark.parametrize(
    "text", ["", "M", "-1M", "1.5G", "10MB", "10 X", "10iB", "10Mi", "0x10", "ten", "1e6"]
)
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="bad size"):
        parse_size(text)


@given(st.integers(min_value=0, max_value=1 << 50))
def test_format_size_round_trips(size_bytes: int) -> None:
    assert parse_size(format_size(size_bytes)) == size_bytes


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("idle", WorkloadSpec(64 * MiB, 0, "random", "idle")),
        ("IDLE", WorkloadSpec(64 * MiB, 0, "random", "idle")),
        ("idle:size=128M", WorkloadSpec(128 * MiB, 0, "random", "idle")),
        ("idle:size=128M,pattern=zero,hz=50", WorkloadSpec(128 * MiB, 0, "zero", "idle", 50)),
        ("dirty", WorkloadSpec(256 * MiB, 50 * MiB, "random", "paced")),
        (
            "dirty:rate=50M,size=256M,pattern=random,mode=paced",
            WorkloadSpec(256 * MiB, 50 * MiB, "random", "paced"),
        ),
        (
            "dirty: size = 1G , pattern=compressible , mode=cpu",
            WorkloadSpec(1 << 30, 0, "compressible", "cpu"),
        ),
        ("dirty:rate=100K,pattern=zero", WorkloadSpec(256 * MiB, 100 << 10, "zero", "paced")),
        ("dirty:mode=paced,hz=1000", WorkloadSpec(256 * MiB, 50 * MiB, "random", "paced", 1000)),
        (
            "idle:disk-rate=2M",
            WorkloadSpec(64 * MiB, 0, "random", "idle", disk_rate_bps=2 * MiB),
        ),
        (
            "idle:disk-size=1M",
            WorkloadSpec(64 * MiB, 0, "random", "idle", disk_size_bytes=MiB),
        ),
        (
            "idle:size=32M,DISK-SIZE=1G,disk-rate=512K",
            WorkloadSpec(32 * MiB, 0, "random", "idle", 200, 512 << 10, 1 << 30),
        ),
        (
            "dirty:rate=20M,size=128M,disk-rate=4M,disk-size=256M",
            WorkloadSpec(128 * MiB, 20 * MiB, "random", "paced", 200, 4 * MiB, 256 * MiB),
        ),
        (
            "dirty:mode=cpu,disk-size=3000000",
            WorkloadSpec(256 * MiB, 0, "random", "cpu", disk_size_bytes=3_000_000),
        ),
    ],
)
def test_parse_workload(spec: str, expected: WorkloadSpec) -> None:
    assert parse_workload(spec) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "unknown workload"),
        ("busy", "unknown workload"),
        ("idle:", "no options"),
        ("idle:rate=5M", "unknown idle option 'rate'"),
        ("idle:mode=cpu", "unknown idle option 'mode'"),
        ("dirty:speed=5M", "unknown dirty option 'speed'"),
        ("dirty:rate", "expected key=value"),
        ("dirty:rate=", "expected key=value"),
        ("dirty:rate=5M,,size=1M", "expected key=value"),
        ("dirty:rate=5M,rate=6M", "given twice"),
        ("dirty:rate=fast", "bad size"),
        ("dirty:rate=0", "rate must be positive"),
        ("dirty:size=0", "must be positive"),
        ("dirty:size=-4K", "bad size"),
        ("dirty:size=5000", "multiple of the 4 KiB"),
        ("dirty:size=1024T", "larger than"),
        ("dirty:pattern=ones", "unknown pattern"),
        ("dirty:mode=idle", "unknown mode"),
        ("dirty:mode=cpu,rate=5M", "mode=cpu"),
        ("dirty:hz=0", "heartbeat rate"),
        ("dirty:hz=20000", "heartbeat rate"),
        ("dirty:hz=fast", "heartbeat rate"),
        ("idle:disk-rate=0", "disk-rate must be positive"),
        ("dirty:disk-rate=0K", "disk-rate must be positive"),
        ("idle:disk-rate=fast", "bad size"),
        ("idle:disk-rate=-1M", "bad size"),
        ("idle:disk-rate=2M,disk-rate=3M", "given twice"),
        ("idle:disk-size=0", "at least 1M"),
        ("idle:disk-size=1023K", "at least 1M"),
        ("idle:disk-size=1.5G", "bad size"),
        ("dirty:disk-size=32T", "out of range"),
        ("idle:disk=1M", "unknown idle option 'disk'"),
        ("dirty:disk_rate=1M", "unknown dirty option 'disk_rate'"),
        ("idle:disk-rate=", "expected key=value"),
    ],
)
def test_parse_workload_rejects(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_workload(spec)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"size_bytes": 4096, "rate_bps": 0, "pattern": "random", "mode": "paced"}, "positive"),
        ({"size_bytes": 4096, "rate_bps": 5, "pattern": "random", "mode": "cpu"}, "only applies"),
        ({"size_bytes": 4096, "rate_bps": 5, "pattern": "random", "mode": "idle"}, "only applies"),
        ({"size_bytes": 4096, "rate_bps": 0, "pattern": "ones", "mode": "idle"}, "pattern"),
        ({"size_bytes": 4096, "rate_bps": 0, "pattern": "zero", "mode": "spin"}, "mode"),
        (
            {
                "size_bytes": 4096,
                "rate_bps": 0,
                "pattern": "zero",
                "mode": "idle",
                "disk_rate_bps": -1,
            },
            "disk rate",
        ),
        (
            {
                "size_bytes": 4096,
                "rate_bps": 0,
                "pattern": "zero",
                "mode": "idle",
                "disk_size_bytes": 4096,
            },
            "disk region",
        ),
    ],
)
def test_constructor_validates(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        WorkloadSpec(**fields)  # type: ignore[arg-type]


def test_kernel_args() -> None:
    spec = parse_workload("dirty:rate=50M,size=256M,pattern=compressible,mode=paced")
    assert spec.kernel_args() == [
        "vmferry.ws=268435456",
        "vmferry.rate=52428800",
        "vmferry.pattern=compressible",
        "vmferry.mode=paced",
        "vmferry.hz=200",
    ]
    assert spec.pages == 65536


def test_kernel_args_with_disk_keys() -> None:
    spec = parse_workload("dirty:rate=20M,size=128M,disk-rate=4M,disk-size=256M")
    assert spec.kernel_args()[-2:] == ["vmferry.disk_rate=4194304", "vmferry.disk_ws=268435456"]
    assert parse_workload("idle:disk-rate=2M").kernel_args()[-1] == "vmferry.disk_rate=2097152"
    assert parse_workload("idle:disk-size=8M").kernel_args()[-1] == "vmferry.disk_ws=8388608"
    # Defaults are not rendered: the guest's own defaults apply.
    assert not any("disk" in arg for arg in parse_workload("idle").kernel_args())


@pytest.mark.parametrize(
    ("spec", "disk_bytes", "region_bytes"),
    [
        ("idle", 256 * MiB, DEFAULT_DISK_SIZE_BYTES),
        ("idle", 16 * MiB, 16 * MiB),
        ("idle", 10_000_000, 10_000_000 // 4096 * 4096),
        ("idle:disk-size=256M", 100 * MiB, 100 * MiB),
        ("idle:disk-size=256M", 1 << 30, 256 * MiB),
        ("idle:disk-size=3000000", 1 << 30, 3_000_000 // 4096 * 4096),
        ("idle:disk-size=1M", 0, 0),
    ],
)
def test_disk_region_bytes(spec: str, disk_bytes: int, region_bytes: int) -> None:
    assert parse_workload(spec).disk_region_bytes(disk_bytes) == region_bytes


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("idle", ["idle", "64 MiB", "random", "200 Hz"]),
        ("dirty:rate=50M,size=256M", ["paced", "50 MiB/s", "256 MiB"]),
        ("dirty:mode=cpu,size=1G,pattern=zero", ["cpu", "1 GiB", "zero"]),
        ("dirty:rate=1536K", ["1.5 MiB/s"]),
        ("idle:disk-rate=2M", ["disk", "64 MiB region", "2 MiB/s of writes"]),
        ("idle:disk-size=1G", ["disk", "1 GiB region", "no writes"]),
    ],
)
def test_describe(spec: str, words: list[str]) -> None:
    text = parse_workload(spec).describe()
    for word in words:
        assert word in text


@st.composite
def specs(draw: st.DrawFn) -> WorkloadSpec:
    mode: Mode = draw(st.sampled_from(["idle", "paced", "cpu"]))
    pattern: Pattern = draw(st.sampled_from(["zero", "compressible", "random"]))
    rate_bps = draw(st.integers(1, 1 << 34)) if mode == "paced" else 0
    return WorkloadSpec(
        size_bytes=4096 * draw(st.integers(1, 1 << 24)),
        rate_bps=rate_bps,
        pattern=pattern,
        mode=mode,
        heartbeat_hz=draw(st.integers(1, 10_000)),
        disk_rate_bps=draw(st.just(0) | st.integers(1, 1 << 34)),
        disk_size_bytes=draw(st.none() | st.integers(MiB, 1 << 44)),
    )


@given(specs())
def test_to_spec_round_trips(spec: WorkloadSpec) -> None:
    assert parse_workload(spec.to_spec()) == spec


@given(specs())
def test_kernel_args_carry_every_field(spec: WorkloadSpec) -> None:
    args = dict(arg.removeprefix("vmferry.").split("=") for arg in spec.kernel_args())
    expected = {
        "ws": str(spec.size_bytes),
        "rate": str(spec.rate_bps),
        "pattern": spec.pattern,
        "mode": spec.mode,
        "hz": str(spec.heartbeat_hz),
    }
    if spec.disk_rate_bps:
        expected["disk_rate"] = str(spec.disk_rate_bps)
    if spec.disk_size_bytes is not None:
        expected["disk_ws"] = str(spec.disk_size_bytes)
    assert args == expected


@given(specs(), st.integers(0, 1 << 45))
def test_disk_region_is_whole_blocks_within_both_limits(spec: WorkloadSpec, disk: int) -> None:
    region = spec.disk_region_bytes(disk)
    limit = min(disk, spec.disk_size_bytes or DEFAULT_DISK_SIZE_BYTES)
    assert region % 4096 == 0
    assert limit - 4096 < region <= limit


@given(st.text(max_size=60))
def test_parse_workload_only_raises_config_error(text: str) -> None:
    with contextlib.suppress(ConfigError):
        parse_workload(text)
