"""Finding the QEMU binary and checking that it is recent enough and has our machine type."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from dataclasses import dataclass

from vmferry.core.errors import QEMUNotFound
from vmferry.qemu.argv import SANDBOX_OPTION

__all__ = ["MIN_QEMU_VERSION", "QemuBinary", "find_qemu"]

# QEMU 7.2 (Debian 12's own) corrupted dirtying guests in TCG live migration on this kind of
# machine; 10.0 (bookworm-backports) did not. See DESIGN.md.
MIN_QEMU_VERSION = (10, 0)
_VERSION_RE = re.compile(r"version (\d+)\.(\d+)(?:\.(\d+))?")
_PROBE_TIMEOUT_S = 20.0


@dataclass(frozen=True, slots=True)
class QemuBinary:
    """A checked ``qemu-system-x86_64``."""

    path: str
    version: tuple[int, int, int]
    machine_types: frozenset[str]
    cpu_models: frozenset[str]

    @property
    def version_text(self) -> str:
        return ".".join(str(part) for part in self.version)


async def _run(argv: list[str], stdin: bytes | None = None) -> tuple[int | None, str]:
    """Run ``argv`` (fed ``stdin``, if any) within the probe deadline.

    Returns:
        Its exit status and output (stdout and stderr together).

    Raises:
        QEMUNotFound: it did not end in time (it is killed).
    """
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL if stdin is None else asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with asyncio.timeout(_PROBE_TIMEOUT_S):
            out, _ = await proc.communicate(stdin)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise QEMUNotFound(
            f"{argv[0]} did not answer {argv[1:]} within {_PROBE_TIMEOUT_S:g} s"
        ) from None
    except BaseException:
        # Cancelled (the caller gave up meanwhile, e.g. on bad arguments): the probe ends with
        # it, never outlives its event loop.
        if proc.returncode is None:
            proc.kill()
            await asyncio.shield(proc.wait())
        raise
    return proc.returncode, out.decode(errors="replace")


async def _output(argv: list[str]) -> str:
    return (await _run(argv))[1]


async def find_qemu(path: str | None = None) -> QemuBinary:
    """Locate and check QEMU (``$VMFERRY_QEMU``, else ``qemu-system-x86_64`` on PATH).

    Raises:
        QEMUNotFound: when it is missing, too old, lacks the machine types we need, or cannot
            run under its seccomp sandbox.
    """
    wanted = path or os.environ.get("VMFERRY_QEMU") or "qemu-system-x86_64"
    found = shutil.which(wanted)
    if found is None:
        raise QEMUNotFound(
            f"{wanted} not found; install QEMU >= {MIN_QEMU_VERSION[0]}.{MIN_QEMU_VERSION[1]} "
            "(on Debian 12: apt-get install -t bookworm-backports qemu-system-x86, or `make setup`)"
        )
    text = await _output([found, "--version"])
    match = _VERSION_RE.search(text)
    if match is None:
        raise QEMUNotFound(f"cannot read the version of {found}: {text.strip()[:200]!r}")
    version = (int(match[1]), int(match[2]), int(match[3] or 0))
    if version[:2] < MIN_QEMU_VERSION:
        raise QEMUNotFound(
            f"{found} is QEMU {'.'.join(map(str, version))}; vmferry needs >= "
            f"{MIN_QEMU_VERSION[0]}.{MIN_QEMU_VERSION[1]} (older releases corrupted guests "
            "during live migration). On Debian 12 install it from bookworm-backports."
        )
    machines = await _output([found, "-machine", "help"])
    types = frozenset(line.split()[0] for line in machines.splitlines()[1:] if line.strip())
    cpus = await _output([found, "-cpu", "help"])
    # "Available CPUs:" then one indented model per line, then a blank line and CPUID flags.
    listing = cpus.split("\n\n", 1)[0].splitlines()[1:]
    models = frozenset(line.split()[0] for line in listing if line.startswith("  "))
    await _probe_sandbox(found)
    return QemuBinary(path=found, version=version, machine_types=types, cpu_models=models)


async def _probe_sandbox(found: str) -> None:
    """Start QEMU (no machine) with our seccomp sandbox and have its monitor quit at once.

    Help texts do not prove the filter can be installed, so it is really started; a build
    without seccomp fails at option parsing. vmferry never runs guests unsandboxed.

    Raises:
        QEMUNotFound: this QEMU cannot run with ``-sandbox SANDBOX_OPTION``.
    """
    argv = [found, "-sandbox", SANDBOX_OPTION, "-machine", "none", "-nodefaults"]
    argv += ["-display", "none", "-S", "-monitor", "stdio"]
    returncode, out = await _run(argv, b"quit\n")
    if returncode != 0:
        raise QEMUNotFound(
            f"{found} cannot run with -sandbox {SANDBOX_OPTION} (is it built with seccomp? "
            f"Debian's qemu-system-x86 is): {out.strip()[-300:]}"
        )
