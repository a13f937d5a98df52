"""Workload specs for the lab guest: parse the CLI syntax, render the kernel arguments.

A spec says how the guest's workload program treats its working set::

    idle                                   # heartbeats only; 64 MiB working set to verify
    idle:size=128M,pattern=zero
    idle:disk-rate=2M                      # plus 2 MiB/s of disk writes when the VM has a disk
    dirty:rate=50M,size=256M,pattern=random,mode=paced
    dirty:size=256M,pattern=compressible,mode=cpu
    dirty:rate=20M,size=128M,disk-rate=4M,disk-size=256M

Sizes and rates take binary suffixes (``K``/``M``/``G``/``T``, also ``KiB``/``MiB``/``GiB``/
``TiB``, case-insensitive); a rate is bytes per second. Decisions taken here:

* ``mode=cpu`` dirties as fast as the vCPU allows, so giving it a ``rate`` is an error rather
  than silently ignored.
* ``dirty`` without ``mode`` is ``paced``; ``paced`` without ``rate`` is 50 MiB/s.
* ``idle`` accepts ``size``, ``pattern``, ``hz`` and the disk keys only.
* ``disk-size`` (default 64 MiB, at least 1 MiB) is the disk region the guest fills with
  self-checking 4 KiB blocks before it reports ready, clamped to the disk; ``disk-rate``
  (default none) is how many bytes/s of it are rewritten afterwards. Both are inert for a VM
  without a disk, so a spec does not need to know whether its VM has one.

Example:
    >>> spec = parse_workload("dirty:rate=50M,size=256M,pattern=random")
    >>> spec.kernel_args()[:2]
    ['vmferry.ws=268435456', 'vmferry.rate=52428800']
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, get_args

from vmferry.core.errors import ConfigError

__all__ = [
    "DEFAULT_DIRTY_RATE_BPS",
    "DEFAULT_DIRTY_SIZE_BYTES",
    "DEFAULT_DISK_SIZE_BYTES",
    "DEFAULT_IDLE_SIZE_BYTES",
    "GUEST_PAGE_SIZE_BYTES",
    "Mode",
    "Pattern",
    "WorkloadSpec",
    "check_heartbeat_hz",
    "format_size",
    "parse_size",
    "parse_workload",
]

Pattern = Literal["zero", "compressible", "random"]
Mode = Literal["idle", "paced", "cpu"]

GUEST_PAGE_SIZE_BYTES = 4096
DEFAULT_IDLE_SIZE_BYTES = 64 << 20
DEFAULT_DIRTY_SIZE_BYTES = 256 << 20
DEFAULT_DIRTY_RATE_BPS = 50 << 20
DEFAULT_DISK_SIZE_BYTES = 64 << 20
MIN_DISK_SIZE_BYTES = 1 << 20
DEFAULT_HEARTBEAT_HZ = 200
MAX_HEARTBEAT_HZ = 10_000
# Far beyond any lab VM; keeps page counts comfortably inside the guest's 64-bit arithmetic.
MAX_SIZE_BYTES = 1 << 44

_PATTERN_CHOICES: tuple[Pattern, ...] = ("zero", "compressible", "random")
_PATTERNS: tuple[str, ...] = get_args(Pattern)
_MODES: tuple[str, ...] = get_args(Mode)
_DISK_KEYS = ("disk-rate", "disk-size")
_IDLE_KEYS = ("size", "pattern", "hz", *_DISK_KEYS)
_DIRTY_KEYS = ("rate", "size", "pattern", "mode", "hz", *_DISK_KEYS)
_SUFFIX_SHIFT = {"": 0, "b": 0, "k": 10, "m": 20, "g": 30, "t": 40}
_SIZE_RE = re.compile(r"\s*([0-9]+)\s*([kmgt]?)(i?b?)\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Parse a byte count with an optional binary suffix.

    Args:
        text: e.g. ``"4096"``, ``"64K"``, ``"256M"``, ``"256MiB"``, ``"1G"``, ``"2GiB"``.

    Returns:
        The number of bytes.

    Raises:
        ConfigError: not a non-negative integer with a known suffix (``"1.5G"``, ``"-1M"``,
            ``"10MB"`` — write ``10M`` or ``10MiB``, both mean 10 MiB).
    """
    match = _SIZE_RE.fullmatch(text)
    if match is None:
        raise ConfigError(f"bad size {text!r}: expected an integer with K, M, G or T (e.g. 256M)")
    digits, unit, tail = match.groups()
    unit = unit.lower()
    tail = tail.lower()
    # "iB" needs a unit ("MiB"); a bare "B" is bytes; "MB" is refused as ambiguous (10^6 or 2^20?).
    if (tail == "ib" and not unit) or (tail == "b" and unit) or tail == "i":
        raise ConfigError(f"bad size {text!r}: use K/M/G/T or KiB/MiB/GiB/TiB (binary units)")
    return int(digits) << _SUFFIX_SHIFT[unit]


def format_size(size_bytes: int) -> str:
    """Render a byte count exactly, with the largest binary suffix that divides it.

    ``parse_size(format_size(n)) == n`` for every ``n >= 0``.

    Args:
        size_bytes: a non-negative byte count.

    Returns:
        e.g. ``"256M"``, ``"1G"``, ``"4100"``.
    """
    for suffix, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if size_bytes and size_bytes % (1 << shift) == 0:
            return f"{size_bytes >> shift}{suffix}"
    return str(size_bytes)


def _human(size_bytes: int) -> str:
    for suffix, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size_bytes >= 1 << shift:
            value = size_bytes / (1 << shift)
            return f"{value:.0f} {suffix}" if value.is_integer() else f"{value:.1f} {suffix}"
    return f"{size_bytes} B"


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    """What the guest's workload program does with its working set.

    Attributes:
        size_bytes: working-set size, a positive multiple of 4 KiB.
        rate_bps: target dirty rate in bytes per second; 0 unless ``mode == "paced"``.
        pattern: page contents (zero pages, ~1/8-entropy pages, or random pages).
        mode: ``idle`` (no dirtying), ``paced`` (token bucket at ``rate_bps``) or ``cpu``
            (as fast as the vCPU can).
        heartbeat_hz: heartbeats per second on the guest channel.
        disk_rate_bps: bytes per second of disk blocks rewritten after the initial fill
            (0: none); only used when the VM has a disk.
        disk_size_bytes: the disk region the guest writes and verifies, before clamping to
            the disk (None: `DEFAULT_DISK_SIZE_BYTES`); see `disk_region_bytes`.

    Raises:
        ConfigError: on construction, if the fields contradict each other.
    """

    size_bytes: int
    rate_bps: int
    pattern: Pattern
    mode: Mode
    heartbeat_hz: int = DEFAULT_HEARTBEAT_HZ
    disk_rate_bps: int = 0
    disk_size_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.size_bytes <= 0:
            raise ConfigError(f"working-set size must be positive, got {self.size_bytes}")
        if self.size_bytes % GUEST_PAGE_SIZE_BYTES:
            raise ConfigError(
                f"working-set size {self.size_bytes} is not a multiple of the 4 KiB page size"
            )
        if self.size_bytes > MAX_SIZE_BYTES:
            raise ConfigError(f"working-set size {self.size_bytes} is larger than 16 TiB")
        if self.pattern not in _PATTERNS:
            raise ConfigError(f"unknown pattern {self.pattern!r}: use {', '.join(_PATTERNS)}")
        if self.mode not in _MODES:
            raise ConfigError(f"unknown mode {self.mode!r}: use {', '.join(_MODES)}")
        if self.mode == "paced" and self.rate_bps <= 0:
            raise ConfigError("mode=paced needs a positive rate (e.g. rate=50M)")
        if self.mode != "paced" and self.rate_bps != 0:
            raise ConfigError(f"a rate only applies to mode=paced, not mode={self.mode}")
        check_heartbeat_hz(self.heartbeat_hz)
        if self.disk_rate_bps < 0:
            raise ConfigError(f"disk rate must not be negative, got {self.disk_rate_bps}")
        if self.disk_size_bytes is not None and not (
            MIN_DISK_SIZE_BYTES <= self.disk_size_bytes <= MAX_SIZE_BYTES
        ):
            raise ConfigError(
                f"disk region {self.disk_size_bytes} bytes out of range (1 MiB .. 16 TiB)"
            )

    def disk_region_bytes(self, disk_bytes: int) -> int:
        """The part of a ``disk_bytes`` disk the guest writes and verifies.

        Args:
            disk_bytes: the disk's virtual size.

        Returns:
            ``min(disk_size_bytes, disk_bytes)`` rounded down to whole 4 KiB blocks (the
            guest's own rule), with the default region when ``disk_size_bytes`` is None.
        """
        size = DEFAULT_DISK_SIZE_BYTES if self.disk_size_bytes is None else self.disk_size_bytes
        region = min(size, disk_bytes)
        return region - region % GUEST_PAGE_SIZE_BYTES

    @property
    def pages(self) -> int:
        """Number of 4 KiB pages in the working set."""
        return self.size_bytes // GUEST_PAGE_SIZE_BYTES

    def kernel_args(self) -> list[str]:
        """Kernel command-line arguments the guest's init hands to the workload program.

        Returns:
            ``["vmferry.ws=<bytes>", "vmferry.rate=<bytes/s>", "vmferry.pattern=<p>",
            "vmferry.mode=<m>", "vmferry.hz=<n>"]``, then ``vmferry.disk_rate=<bytes/s>``
            when a disk rate is set and ``vmferry.disk_ws=<bytes>`` when a disk size is. The
            disk device itself (``vmferry.disk_dev=``) comes from the VM, not the workload.
        """
        args = [
            f"vmferry.ws={self.size_bytes}",
            f"vmferry.rate={self.rate_bps}",
            f"vmferry.pattern={self.pattern}",
            f"vmferry.mode={self.mode}",
            f"vmferry.hz={self.heartbeat_hz}",
        ]
        if self.disk_rate_bps:
            args.append(f"vmferry.disk_rate={self.disk_rate_bps}")
        if self.disk_size_bytes is not None:
            args.append(f"vmferry.disk_ws={self.disk_size_bytes}")
        return args

    def describe(self) -> str:
        """One line for humans, e.g. ``paced dirtying at 50 MiB/s of a 256 MiB random set``."""
        where = f"a {_human(self.size_bytes)} {self.pattern} working set"
        if self.mode == "idle":
            what = f"idle (no dirtying) with {where}"
        elif self.mode == "paced":
            what = f"paced dirtying at {_human(self.rate_bps)}/s of {where}"
        else:
            what = f"unpaced (cpu-bound) dirtying of {where}"
        text = f"{what}, {self.heartbeat_hz} Hz heartbeat"
        if self.disk_rate_bps or self.disk_size_bytes is not None:
            region = _human(
                DEFAULT_DISK_SIZE_BYTES if self.disk_size_bytes is None else self.disk_size_bytes
            )
            writes = (
                f"{_human(self.disk_rate_bps)}/s of writes"
                if self.disk_rate_bps
                else "no writes after the fill"
            )
            text += f"; disk (if any): {region} region, {writes}"
        return text

    def to_spec(self) -> str:
        """Render back to the CLI syntax; ``parse_workload(s.to_spec()) == s``."""
        parts = [f"size={format_size(self.size_bytes)}", f"pattern={self.pattern}"]
        if self.mode == "idle":
            head = "idle"
        else:
            head = "dirty"
            parts.append(f"mode={self.mode}")
            if self.mode == "paced":
                parts.insert(0, f"rate={format_size(self.rate_bps)}")
        if self.heartbeat_hz != DEFAULT_HEARTBEAT_HZ:
            parts.append(f"hz={self.heartbeat_hz}")
        if self.disk_rate_bps:
            parts.append(f"disk-rate={format_size(self.disk_rate_bps)}")
        if self.disk_size_bytes is not None:
            parts.append(f"disk-size={format_size(self.disk_size_bytes)}")
        return f"{head}:{','.join(parts)}"


def _parse_options(kind: str, body: str, allowed: tuple[str, ...]) -> dict[str, str]:
    options: dict[str, str] = {}
    for item in body.split(","):
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        value = value.strip()
        if not sep or not key or not value:
            raise ConfigError(f"bad {kind} option {item.strip()!r}: expected key=value")
        if key not in allowed:
            raise ConfigError(f"unknown {kind} option {key!r}: {kind} takes {', '.join(allowed)}")
        if key in options:
            raise ConfigError(f"{kind} option {key!r} given twice")
        options[key] = value
    return options


def check_heartbeat_hz(hz: int) -> int:
    """``hz`` if it is a heartbeat rate the guest workload takes.

    Raises:
        ConfigError: outside 1..MAX_HEARTBEAT_HZ.
    """
    if not 1 <= hz <= MAX_HEARTBEAT_HZ:
        raise ConfigError(f"heartbeat rate must be 1..{MAX_HEARTBEAT_HZ} Hz, got {hz}")
    return hz


def _parse_hz(text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise ConfigError(f"bad heartbeat rate {text!r}: expected a whole number of Hz")
    return int(text)


def _parse_pattern(text: str) -> Pattern:
    for pattern in _PATTERN_CHOICES:
        if text.lower() == pattern:
            return pattern
    raise ConfigError(f"unknown pattern {text!r}: use {', '.join(_PATTERNS)}")


def _parse_dirty_mode(text: str) -> Mode:
    value = text.lower()
    if value == "paced":
        return "paced"
    if value == "cpu":
        return "cpu"
    raise ConfigError(f"unknown mode {text!r}: dirty takes mode=paced or mode=cpu")


def parse_workload(spec: str) -> WorkloadSpec:
    """Parse a workload spec (see the module docstring for the syntax).

    Args:
        spec: e.g. ``"idle"``, ``"idle:size=128M"``, ``"dirty:rate=50M,size=256M"``.

    Returns:
        The validated spec.

    Raises:
        ConfigError: unknown kind or option, bad number, zero or unaligned size, a rate with
            ``mode=cpu`` or ``idle``, and so on; the message names the offending part.
    """
    head, sep, body = spec.strip().partition(":")
    kind = head.strip().lower()
    if kind not in ("idle", "dirty"):
        raise ConfigError(f"unknown workload {head!r}: use 'idle' or 'dirty:rate=50M,size=256M'")
    if sep and not body.strip():
        raise ConfigError(f"workload {spec!r} has a ':' but no options")
    if kind == "idle":
        options = _parse_options(kind, body, _IDLE_KEYS) if sep else {}
        mode: Mode = "idle"
        size_bytes = parse_size(options.get("size", str(DEFAULT_IDLE_SIZE_BYTES)))
        rate_bps = 0
    else:
        options = _parse_options(kind, body, _DIRTY_KEYS) if sep else {}
        mode = _parse_dirty_mode(options.get("mode", "paced"))
        size_bytes = parse_size(options.get("size", str(DEFAULT_DIRTY_SIZE_BYTES)))
        if mode == "cpu":
            if "rate" in options:
                raise ConfigError("mode=cpu dirties as fast as it can: drop rate= or use paced")
            rate_bps = 0
        else:
            rate_bps = parse_size(options.get("rate", str(DEFAULT_DIRTY_RATE_BPS)))
            if rate_bps <= 0:
                raise ConfigError("rate must be positive (use 'idle' for no dirtying)")
    pattern = _parse_pattern(options.get("pattern", "random"))
    hz = _parse_hz(options["hz"]) if "hz" in options else DEFAULT_HEARTBEAT_HZ
    disk_rate_bps = 0
    if "disk-rate" in options:
        disk_rate_bps = parse_size(options["disk-rate"])
        if disk_rate_bps <= 0:
            raise ConfigError("disk-rate must be positive (leave it out for no disk writes)")
    disk_size_bytes = None
    if "disk-size" in options:
        disk_size_bytes = parse_size(options["disk-size"])
        if disk_size_bytes < MIN_DISK_SIZE_BYTES:
            raise ConfigError(f"disk-size must be at least 1M, got {options['disk-size']!r}")
    return WorkloadSpec(
        size_bytes=size_bytes,
        rate_bps=rate_bps,
        pattern=pattern,
        mode=mode,
        heartbeat_hz=hz,
        disk_rate_bps=disk_rate_bps,
        disk_size_bytes=disk_size_bytes,
    )
