"""Fuzz the parsers of user input with Hypothesis: whatever the text, they return a value or
raise ConfigError — never another exception."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from vmferry.core.errors import ConfigError
from vmferry.core.model import VmSpec, spec_from_json, spec_to_json, validate_name
from vmferry.core.workload import parse_size, parse_workload

_SIZES = st.sampled_from(["", "0", "1", "512M", "1G", "2GiB", "-1M", "1.5G", "10MB", "9" * 40])
sizes = _SIZES | st.text(max_size=24) | st.from_regex(r"[0-9]{0,25}[KMGTPkmgtpi]{0,4}B?")
workloads = (
    st.sampled_from(["idle", "dirty", "dirty:", "idle:size=8M", ":", "dirty:rate=50M,size=256M"])
    | st.text(max_size=60)
    | st.builds(
        lambda kind, opts: f"{kind}:" + ",".join(f"{k}={v}" for k, v in opts),
        st.sampled_from(["idle", "dirty", "x"]),
        st.lists(
            st.tuples(
                st.sampled_from(
                    ["rate", "size", "pattern", "mode", "disk-rate", "disk-size", "", "=x"]
                ),
                sizes | st.sampled_from(["random", "compressible", "zero", "paced", "cpu"]),
            ),
            max_size=5,
        ),
    )
)

_FUZZ = settings(max_examples=500, deadline=None)


def _only_config_errors(call: Any, *args: Any, **kwargs: Any) -> object:
    try:
        return call(*args, **kwargs)
    except ConfigError:
        return None


@_FUZZ
@given(sizes)
def test_parse_size(text: str) -> None:
    value = _only_config_errors(parse_size, text)
    assert value is None or (isinstance(value, int) and value >= 0)


@_FUZZ
@given(workloads)
def test_parse_workload(text: str) -> None:
    _only_config_errors(parse_workload, text)


@_FUZZ
@given(st.text(max_size=80) | st.from_regex(r"[A-Za-z0-9_.\-/ ]{0,70}", fullmatch=True))
def test_validate_name(name: str) -> None:
    accepted = _only_config_errors(validate_name, name)
    if accepted is not None:
        assert accepted == name
        assert "/" not in name
        assert not name.startswith((".", "-"))
        assert 1 <= len(name) <= 63


@_FUZZ
@given(
    name=st.text(max_size=20) | st.just("vm1"),
    memory=sizes,
    vcpus=st.integers(min_value=-(2**40), max_value=2**40),
    workload=st.none() | workloads,
    disk=st.none() | sizes,
    disk_bus=st.sampled_from(["virtio-blk", "virtio-scsi", "ide", ""]) | st.text(max_size=8),
    storage=st.sampled_from(["local", "shared", "nfs", ""]) | st.text(max_size=8),
)
def test_vmspec_build(
    name: str,
    memory: str,
    vcpus: int,
    workload: str | None,
    disk: str | None,
    disk_bus: str,
    storage: str,
) -> None:
    def build() -> VmSpec:
        parsed = None if workload is None else parse_workload(workload)
        return VmSpec.build(
            name, memory, vcpus, parsed, disk=disk, disk_bus=disk_bus, storage=storage
        )

    spec = _only_config_errors(build)
    if isinstance(spec, VmSpec):
        # What the CLI accepts travels to an agent and back unchanged.
        assert spec_from_json(spec_to_json(spec)) == spec


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["name", "memory_bytes", "vcpus", "workload", "disk", "kind"])
            | st.text(max_size=6),
            children,
            max_size=6,
        )
    ),
    max_leaves=15,
)


@_FUZZ
@given(json_values)
def test_spec_from_json(data: object) -> None:
    _only_config_errors(spec_from_json, data)


_VALID = spec_to_json(VmSpec.build("vm1", "256M", 1, parse_workload("dirty:rate=8M,size=64M")))


@_FUZZ
@given(key=st.sampled_from(sorted(_VALID)) | st.text(max_size=6), value=json_values)
def test_spec_from_json_with_one_field_wrong(key: str, value: object) -> None:
    # One field replaced in an otherwise valid spec, so the fuzz reaches every field's check.
    data = dict(_VALID)
    data[key] = value
    _only_config_errors(spec_from_json, data)
