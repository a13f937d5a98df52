"""Debian's archive as the image builder sees it: a private apt state holding the mirror's
package lists, and apt's answer to "which package versions would this image get?".

The apt state lives beside the cached images and ignores the host's apt configuration and
sources, so the answer is the same on any Debian-family host. Its lists are what mmdebstrap
installs from (copied into the build), so the versions that name an image are the versions
inside it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from vmferry.guest.hosttools import run_tool
from vmferry.guest.modules import ImageBuildError

__all__ = [
    "APT_SOURCES",
    "KEYRING",
    "parse_dpkg_status",
    "parse_simulated_installs",
    "resolve_packages",
]

APT_SOURCES = (
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
)
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")

_INST = re.compile(r"^Inst (\S+) (?:\[[^\]]*\] )?\((\S+)", re.MULTILINE)


def parse_simulated_installs(text: str) -> tuple[tuple[str, str], ...]:
    """The (package, version) pairs of ``apt-get --simulate install`` output, sorted."""
    return tuple(sorted((m[1].removesuffix(":amd64"), m[2]) for m in _INST.finditer(text)))


def parse_dpkg_status(text: str) -> dict[str, str]:
    """Installed packages and their versions, from a dpkg ``status`` file."""
    installed: dict[str, str] = {}
    for stanza in text.split("\n\n"):
        fields = dict(re.findall(r"^([A-Za-z-]+): ?(.*)$", stanza, re.MULTILINE))
        if fields.get("Status", "").endswith(" installed") and "Package" in fields:
            installed[fields["Package"]] = fields.get("Version", "")
    return installed


def _write_apt_config(apt_dir: Path) -> Path:
    """A private apt state (lists, cache, an empty dpkg status) that ignores the host's apt."""
    for sub in ("etc/apt.conf.d", "etc/preferences.d", "lists/partial", "cache/archives/partial"):
        (apt_dir / sub).mkdir(parents=True, exist_ok=True)
    (apt_dir / "status").touch()
    signed = f"[signed-by={KEYRING}] "
    (apt_dir / "etc/sources.list").write_text(
        "".join(line.replace("deb ", f"deb {signed}", 1) + "\n" for line in APT_SOURCES)
    )
    config = apt_dir / "apt.conf"
    config.write_text(
        f'Dir::Etc "{apt_dir}/etc";\n'
        'Dir::Etc::Parts "apt.conf.d";\n'
        f'Dir::State "{apt_dir}";\n'
        f'Dir::State::Lists "{apt_dir}/lists";\n'
        f'Dir::State::status "{apt_dir}/status";\n'
        f'Dir::Cache "{apt_dir}/cache";\n'
        'APT::Architecture "amd64";\nAPT::Architectures { "amd64"; };\n'
        'Acquire::Languages "none";\nAcquire::GzipIndexes "true";\n'
        'APT::Install-Recommends "false";\nAPT::Sandbox::User "root";\n'
        # No binary caches (~70 MB): apt reads these lists only when they change.
        'Dir::Cache::pkgcache "";\nDir::Cache::srcpkgcache "";\n'
    )
    return config


def resolve_packages(
    apt_dir: Path, selection: Sequence[str], say: Callable[[str], None]
) -> tuple[tuple[str, str], ...]:
    """Every package (and version) apt installs for ``selection`` on an empty system.

    The lists are refreshed first (a few small requests when nothing changed); without network
    the last lists are used. The answer is kept beside them while they are unchanged (apt takes
    ~2.5 s to compute it).

    Args:
        apt_dir: the private apt state (created if missing).
        selection: package names and apt patterns (e.g. ``?essential``).
        say: progress lines.

    Returns:
        (name, version) pairs, sorted.

    Raises:
        ImageBuildError: no lists (never refreshed and no network), or apt fails.
    """
    env = {**os.environ, "APT_CONFIG": str(_write_apt_config(apt_dir))}
    lists = apt_dir / "lists"
    try:
        run_tool(["apt-get", "-q", "update"], what="refreshing Debian's package lists", env=env)
    except ImageBuildError as err:
        if not any(lists.glob("*_InRelease")):
            raise
        say(f"cannot refresh Debian's package lists, using the last ones: {err}")
    digest = hashlib.sha256()
    for part in (*APT_SOURCES, *selection):
        digest.update(part.encode() + b"\0")
    for release in sorted(lists.glob("*_InRelease")):
        digest.update(release.read_bytes())
    saved = apt_dir / "resolved.json"
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        cached = json.loads(saved.read_text())
        if cached["lists"] == digest.hexdigest():
            return tuple((str(name), str(version)) for name, version in cached["packages"])
    out = run_tool(
        ["apt-get", "--simulate", "-q", "install", *selection],
        what="resolving the image's packages",
        env=env,
    )
    resolved = parse_simulated_installs(out)
    if not resolved:
        raise ImageBuildError(f"apt resolved no packages for the image:\n{out[-2000:]}")
    saved.write_text(json.dumps({"lists": digest.hexdigest(), "packages": resolved}))
    return resolved
