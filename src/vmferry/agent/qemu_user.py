"""Running QEMU without root: which user it becomes, and the files it opens after that.

An agent started as root has its QEMUs drop to an unprivileged system user (default
``vmferry-qemu``, made by ``scripts/setup-host.sh``) with ``-run-with user=``. QEMU opens its
kernel, initrd, disk image, log and sockets while still root; what it opens later must be
readable (or writable) by that user:

* the TLS credentials, loaded when a migration starts (``object-add``);
* the scratch directory ``pmemsave`` writes memory samples to (pre-flight measurement);
* ``/dev/userfaultfd``, which post-copy needs (opened when post-copy is enabled): with
  ``vm.unprivileged_userfaultfd=0`` an unprivileged QEMU has no other way to handle faults of
  kernel accesses. ``scripts/setup-host.sh`` gives QEMU's group access to it; ``auto`` does not
  pick a user that lacks it (QEMU then keeps running as root rather than lose post-copy).

Both live in the agent's :class:`QemuArea`, a directory under the system temp dir (the state
directory may sit under a home directory QEMU's user cannot enter): mode 0750, group = QEMU's
group, keys 0640 — readable by QEMU, never by others. The credentials are copied there from
``--qemu-tls-dir`` at every migration, so rotated files take effect on the next one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pwd
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from vmferry.core.errors import ConfigError
from vmferry.qemu.tls import CREDS_FILES, check_creds_dir

__all__ = [
    "DEFAULT_QEMU_USER",
    "QemuArea",
    "QemuUser",
    "can_use_userfaultfd",
    "resolve_qemu_user",
]

logger = logging.getLogger(__name__)

DEFAULT_QEMU_USER = "vmferry-qemu"
_AREA_PARENT = "vmferry-qemu"
_USERFAULTFD = Path("/dev/userfaultfd")
_UNPRIVILEGED_UFFD = Path("/proc/sys/vm/unprivileged_userfaultfd")


@dataclass(frozen=True, slots=True)
class QemuUser:
    """The unprivileged user QEMU runs as after start-up."""

    name: str
    uid: int
    gid: int


def resolve_qemu_user(requested: str = "auto") -> QemuUser | None:
    """Which user the agent's QEMUs drop to.

    Args:
        requested: ``auto`` (``vmferry-qemu`` if it exists and we are root, else none),
            ``none`` (QEMU runs as the agent does), or a user name (needs root).

    Raises:
        ConfigError: the named user does not exist, or we are not root to switch to it.
    """
    if requested == "none":
        return None
    name = DEFAULT_QEMU_USER if requested == "auto" else requested
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        if requested == "auto":
            return None
        raise ConfigError(
            f"no user {name!r} for QEMU (scripts/setup-host.sh creates one)"
        ) from None
    if os.geteuid() != 0:
        if requested == "auto":
            return None
        raise ConfigError(f"only root can run QEMU as {name!r}")
    if entry.pw_uid == 0:
        raise ConfigError(f"QEMU's user {name!r} is root: nothing would be dropped")
    user = QemuUser(name, entry.pw_uid, entry.pw_gid)
    if not can_use_userfaultfd(user):
        if requested == "auto":
            logger.warning(
                "qemu_user.skipped %s cannot open /dev/userfaultfd (post-copy); QEMU runs as "
                "root (run scripts/setup-host.sh)",
                name,
            )
            return None
        logger.warning("qemu_user %s cannot open /dev/userfaultfd: post-copy will fail", name)
    return user


def can_use_userfaultfd(
    user: QemuUser, device: Path = _USERFAULTFD, sysctl: Path = _UNPRIVILEGED_UFFD
) -> bool:
    """Whether QEMU running as ``user`` can create a userfaultfd for post-copy: the sysctl
    lets everyone, or ``device`` (``/dev/userfaultfd``) is open to the user or its group."""
    try:
        if sysctl.read_text().strip() == "1":
            return True
    except OSError:
        pass
    try:
        info = device.stat()
    except OSError:
        return False
    if info.st_uid == user.uid:
        return info.st_mode & 0o600 == 0o600
    if info.st_gid == user.gid:
        return info.st_mode & 0o060 == 0o060
    return info.st_mode & 0o006 == 0o006


class QemuArea:
    """Where an agent keeps the files its QEMUs open after dropping root.

    Without a QEMU user there is none: QEMU runs as the agent, the TLS credentials are used
    where they are and memory samples go to the VM's directory.
    """

    def __init__(self, state_dir: Path, user: QemuUser | None) -> None:
        self.user = user
        if user is None:
            self.root = state_dir / "qemu"
        else:
            digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:16]
            self.root = Path(tempfile.gettempdir()) / _AREA_PARENT / digest

    @property
    def scratch_dir(self) -> Path:
        """Where ``pmemsave`` may write (group-writable for QEMU's group)."""
        return self.root / "scratch"

    def prepare(self) -> None:
        """Create the area (0750, QEMU's group) and its scratch directory (0770).

        Raises:
            ConfigError: the shared parent directory is not ours (another user made it, or
                it is a symlink).
            OSError: it cannot be created.
        """
        if self.user is None:
            return  # nothing to share: QEMU reads the agent's own files
        parent = self.root.parent
        parent.mkdir(mode=0o711, exist_ok=True)
        info = parent.lstat()
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
            raise ConfigError(f"{parent} is not a directory of ours: refusing to use it")
        os.chmod(parent, 0o711)
        for directory, mode in ((self.root, 0o750), (self.scratch_dir, 0o770)):
            directory.mkdir(mode=mode, exist_ok=True)
            os.chown(directory, -1, self.user.gid)
            os.chmod(directory, mode)

    def stage_tls(self, source: Path) -> Path:
        """The credential directory QEMU should load: ``source`` itself without a QEMU user,
        else a fresh copy in the area readable by QEMU's group.

        Raises:
            ConfigError: ``source`` lacks files QEMU needs.
            OSError: copying failed.
        """
        source = check_creds_dir(source)
        if self.user is None:
            return source
        target = self.root / "tls"
        if all(
            (target / name).is_file()
            and (target / name).read_bytes() == (source / name).read_bytes()
            for name in CREDS_FILES
        ):
            return target  # unchanged: a QEMU loading them right now keeps its files
        staging = self.root / "tls.new"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(mode=0o750)
        os.chown(staging, -1, self.user.gid)
        for name in CREDS_FILES:
            fd = os.open(staging / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as handle:
                os.fchown(handle.fileno(), -1, self.user.gid)
                os.fchmod(handle.fileno(), 0o640)
                handle.write((source / name).read_bytes())
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
        return target

    def remove(self) -> None:
        """Remove the area (the agent exits; running QEMUs loaded what they needed)."""
        if self.user is not None:
            shutil.rmtree(self.root, ignore_errors=True)
