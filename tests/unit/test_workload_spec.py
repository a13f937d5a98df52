"""Workload specs: the CLI syntax, its errors, and the kernel arguments the guest reads."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmferry.core.errors import ConfigError
from vmferry.core.workload import (
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


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("idle", ["idle", "64 MiB", "random", "200 Hz"]),
        ("dirty:rate=50M,size=256M", ["paced", "50 MiB/s", "256 MiB"]),
        ("dirty:mode=cpu,size=1G,pattern=zero", ["cpu", "1 GiB", "zero"]),
        ("dirty:rate=1536K", ["1.5 MiB/s"]),
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
    )


@given(specs())
def test_to_spec_round_trips(spec: WorkloadSpec) -> None:
    assert parse_workload(spec.to_spec()) == spec


@given(specs())
def test_kernel_args_carry_every_field(spec: WorkloadSpec) -> None:
    args = dict(arg.removeprefix("vmferry.").split("=") for arg in spec.kernel_args())
    assert args == {
        "ws": str(spec.size_bytes),
        "rate": str(spec.rate_bps),
        "pattern": spec.pattern,
        "mode": spec.mode,
        "hz": str(spec.heartbeat_hz),
    }


@given(st.text(max_size=60))
def test_parse_workload_only_raises_config_error(text: str) -> None:
    with contextlib.suppress(ConfigError):
        parse_workload(text)
