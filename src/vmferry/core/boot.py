"""How a user's own guest boots (as opposed to the lab guest vmferry builds itself).

A VM whose spec has a :class:`GuestBoot` runs the user's disk image: through the firmware
(SeaBIOS, or OVMF for UEFI images), or with a kernel, initrd and command line given directly.
vmferry knows nothing of what runs inside; it talks to the guest only through
qemu-guest-agent, when the guest runs one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vmferry.core.errors import ConfigError

__all__ = ["FIRMWARES", "Firmware", "GuestBoot"]

Firmware = Literal["bios", "uefi"]
FIRMWARES: tuple[Firmware, ...] = ("bios", "uefi")
_MAX_APPEND = 4096


def _checked_path(path: Path | None, what: str) -> None:
    if path is None:
        return
    if not path.is_absolute():
        raise ConfigError(f"{what} path must be absolute: {path}")
    if "," in str(path) or "\n" in str(path):
        raise ConfigError(f"{what} path must not contain ',' or a newline: {path}")


@dataclass(frozen=True, slots=True)
class GuestBoot:
    """Boot of a user's guest. Kernel and initrd, when given, must be at the same absolute
    path on every host the VM may run on (QEMU needs them on the destination too: the
    option ROM that loads them is part of the migrated machine).

    Attributes:
        firmware: ``bios`` (SeaBIOS) or ``uefi`` (OVMF; needs Debian's ``ovmf`` package).
        kernel, initrd, append: direct kernel boot (initrd and append need the kernel).
        nic: one virtio NIC (QEMU user networking: outbound only, nothing to configure).
        heartbeat: the guest runs vmferry's workload program on its second serial port
            (``/dev/ttyS1``, wired to the agent as for the lab guest): its heartbeats give
            the downtime the guest felt. Nothing else is asked of it (its moves are verified
            as any own guest's are); the Debian image starts the program when the kernel
            command line has ``vmferry.mode=``.
    """

    firmware: Firmware = "bios"
    kernel: Path | None = None
    initrd: Path | None = None
    append: str | None = None
    nic: bool = False
    heartbeat: bool = False

    def __post_init__(self) -> None:
        if self.firmware not in FIRMWARES:
            raise ConfigError(f"unknown firmware {self.firmware!r}: use bios or uefi")
        if self.kernel is None and self.initrd is not None:
            raise ConfigError("--initrd needs --kernel (direct kernel boot)")
        if self.kernel is None and self.append is not None:
            raise ConfigError("--append needs --kernel (direct kernel boot)")
        _checked_path(self.kernel, "kernel")
        _checked_path(self.initrd, "initrd")
        if self.append is not None and (
            len(self.append) > _MAX_APPEND or any(c in self.append for c in "\n\r\0")
        ):
            raise ConfigError(f"kernel command line: at most {_MAX_APPEND} characters, one line")

    def to_json(self) -> dict[str, object]:
        return {
            "firmware": self.firmware,
            "kernel": None if self.kernel is None else str(self.kernel),
            "initrd": None if self.initrd is None else str(self.initrd),
            "append": self.append,
            "nic": self.nic,
            "heartbeat": self.heartbeat,
        }

    @classmethod
    def from_json(cls, data: object) -> GuestBoot:
        """Raises: ConfigError on missing or mistyped fields."""
        if not isinstance(data, dict):
            raise ConfigError("'boot' must be a JSON object")
        firmware = next((f for f in FIRMWARES if f == data.get("firmware", "bios")), None)
        if firmware is None:
            raise ConfigError(f"unknown firmware {data.get('firmware')!r}: use bios or uefi")
        paths: list[Path | None] = []
        for key in ("kernel", "initrd"):
            value = data.get(key)
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"boot '{key}' must be a path string or null")
            paths.append(None if value is None else Path(value))
        append, nic = data.get("append"), data.get("nic", False)
        heartbeat = data.get("heartbeat", False)
        if append is not None and not isinstance(append, str):
            raise ConfigError("boot 'append' must be a string or null")
        if not isinstance(nic, bool) or not isinstance(heartbeat, bool):
            raise ConfigError("boot 'nic' and 'heartbeat' must be booleans")
        return cls(firmware, paths[0], paths[1], append, nic, heartbeat)
