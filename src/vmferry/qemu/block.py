"""Moving a VM's disk live: an NBD export on the destination, ``blockdev-mirror`` on the source.

QEMU >= 9.1 has no block migration in the migration stream any more; a disk on local storage
moves the way libvirt and Proxmox move it:

1. the destination QEMU (``-incoming defer``) opens a fresh target image and exports its disk
   node over NBD (:func:`export_disk`; QEMU activates the node for the export);
2. the source attaches that export as a block node and mirrors its disk into it
   (:func:`start_mirror`, ``sync=full``, background copy: only allocated data travels, zero
   areas become NBD write-zeroes commands);
3. once the mirror is in sync (``ready``) the source switches it to ``write-blocking``
   (:func:`make_write_blocking`): every guest write completes on both sides, so the copy stays
   in sync whatever the guest writes while RAM moves (Proxmox does the same before its RAM
   phase);
4. RAM migrates with ``pause-before-switchover``: at ``pre-switchover`` the guest is paused
   and its disk still active on the source; :func:`finish_mirror` cancels the ready mirror,
   which QEMU turns into a consistent point-in-time copy (``BLOCK_JOB_COMPLETED``), and only
   then does the migration continue and the destination start the guest. This ordering is
   what keeps a late mirror write from overwriting what the guest already wrote on the
   destination;
5. the destination drops its export (:func:`unexport_disk`) once the guest runs there.

On any failure the source calls :func:`abort_mirror` and keeps running; the destination QEMU
and its target image are removed by their agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vmferry.core.errors import FerryError, MigrationFailed, QMPCommandError, QMPTimeout
from vmferry.core.model import DISK_NODE, NbdTarget
from vmferry.qemu.session import QmpSession

__all__ = [
    "MIRROR_JOB",
    "MirrorStatus",
    "abort_mirror",
    "export_disk",
    "finish_mirror",
    "make_write_blocking",
    "mirror_status",
    "set_mirror_speed",
    "start_mirror",
    "unexport_disk",
]

logger = logging.getLogger(__name__)

MIRROR_JOB = f"{DISK_NODE}-mirror"
_TARGET_NODE = f"{DISK_NODE}-target"
_EXPORT_ID = f"{DISK_NODE}-export"
_NBD_FD_NAME = "nbd-listen"
_JOB_EVENTS = ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED", "BLOCK_JOB_ERROR")


@dataclass(frozen=True, slots=True)
class MirrorStatus:
    """One sample of the disk mirror (``query-block-jobs``).

    Attributes:
        copied_bytes: QEMU's ``offset``: progress so far.
        total_bytes: QEMU's ``len``: offset plus what is still dirty (it grows as the guest
            writes during a background copy).
        ready: source and target are in sync (``BLOCK_JOB_READY`` was sent).
        status: the job's state (``running``, ``ready``, ``concluded``, ...) or ``gone``.
        error: why it failed, if it did.
    """

    copied_bytes: int
    total_bytes: int
    ready: bool
    status: str
    error: str | None = None

    @property
    def remaining_bytes(self) -> int:
        return max(0, self.total_bytes - self.copied_bytes)


def _parse_job(job: Mapping[str, Any]) -> MirrorStatus:
    return MirrorStatus(
        copied_bytes=int(job.get("offset", 0)),
        total_bytes=int(job.get("len", 0)),
        ready=bool(job.get("ready", False)),
        status=str(job.get("status", "unknown")),
        error=str(job["error"]) if "error" in job else None,
    )


async def export_disk(
    dst: QmpSession, listen_host: str, *, tls_creds: str | None = None
) -> NbdTarget:
    """Export the destination's disk node over NBD on ``listen_host`` (writable).

    The listening socket is bound here (port 0: the kernel picks a free port) and handed to
    QEMU as a file descriptor, so no port is ever guessed. With ``tls_creds`` (an
    endpoint=server ``tls-creds-x509`` object) the NBD server speaks only TLS and, as the
    object verifies peers, only to clients with a certificate of its CA.

    Raises:
        QMPCommandError, QMPTimeout, QMPConnectError: QEMU refused or did not answer.
        OSError: the address cannot be bound.
    """
    family = socket.AF_INET6 if ":" in listen_host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((listen_host, 0))
        listener.listen(8)
        port = int(listener.getsockname()[1])
        await dst.pass_fd(_NBD_FD_NAME, listener.fileno())
    # QEMU holds its own copy of the socket now; ours is closed by the with-block.
    server: dict[str, object] = {"addr": {"type": "fd", "data": {"str": _NBD_FD_NAME}}}
    if tls_creds is not None:
        server["tls-creds"] = tls_creds
    await dst.execute("nbd-server-start", server)
    try:
        await dst.execute(
            "block-export-add",
            {
                "type": "nbd",
                "id": _EXPORT_ID,
                "node-name": DISK_NODE,
                "name": DISK_NODE,
                "writable": True,
            },
        )
    except BaseException:
        with contextlib.suppress(FerryError):
            await dst.execute("nbd-server-stop")
        raise
    target = NbdTarget(listen_host, port)
    dst.logger.info("disk.exported %s at %s:%d", DISK_NODE, listen_host, port)
    return target


async def unexport_disk(dst: QmpSession) -> None:
    """Remove the NBD export and stop the NBD server (nothing to do when there is none)."""
    with contextlib.suppress(QMPCommandError):
        await dst.execute("block-export-del", {"id": _EXPORT_ID, "mode": "hard"})
    with contextlib.suppress(QMPCommandError):
        await dst.execute("nbd-server-stop")
    dst.logger.info("disk.unexported %s", DISK_NODE)


async def set_mirror_speed(src: QmpSession, speed_bps: int) -> None:
    """Change the disk mirror's bandwidth cap (``block-job-set-speed``)."""
    await src.execute("block-job-set-speed", {"device": MIRROR_JOB, "speed": speed_bps})


async def start_mirror(
    src: QmpSession, target: NbdTarget, *, speed_bps: int | None, tls_creds: str | None = None
) -> None:
    """Attach the destination's export and start mirroring the disk into it (background copy).

    Args:
        src: the source VM's session.
        target: the destination's export.
        speed_bps: bandwidth cap for the copy (None: as fast as the link goes).
        tls_creds: an endpoint=client ``tls-creds-x509`` object: the NBD connection runs over
            TLS and the export's certificate must name ``target.host``. None: in clear.

    Raises:
        QMPCommandError: the export cannot be reached or the job cannot start (nothing is left
            attached then).
        QMPTimeout, QMPConnectError: QEMU did not answer.
    """
    node: dict[str, object] = {
        "driver": "nbd",
        "node-name": _TARGET_NODE,
        "server": {"type": "inet", "host": target.host, "port": str(target.port)},
        "export": target.export,
    }
    if tls_creds is not None:
        node["tls-creds"] = tls_creds
        node["tls-hostname"] = target.host
    await src.execute("blockdev-add", node, timeout_s=30.0)
    arguments: dict[str, object] = {
        "job-id": MIRROR_JOB,
        "device": DISK_NODE,
        "target": _TARGET_NODE,
        "sync": "full",
        "copy-mode": "background",
        # A failed target write ends the job with an error we report, instead of pausing it.
        "on-target-error": "report",
        "on-source-error": "report",
    }
    if speed_bps is not None:
        arguments["speed"] = speed_bps
    try:
        await src.execute("blockdev-mirror", arguments)
    except BaseException:
        with contextlib.suppress(FerryError):
            await src.execute("blockdev-del", {"node-name": _TARGET_NODE})
        raise
    src.logger.info("disk.mirror_started -> %s:%d", target.host, target.port)


async def mirror_status(src: QmpSession) -> MirrorStatus:
    """The mirror job's progress; ``status="gone"`` when the job no longer exists."""
    jobs = await src.execute("query-block-jobs")
    for job in jobs:
        if job.get("device") == MIRROR_JOB:
            return _parse_job(job)
    return MirrorStatus(0, 0, False, "gone")


async def make_write_blocking(src: QmpSession) -> None:
    """Switch the mirror to write-blocking: from now on each guest write reaches both sides
    before it completes, so the copy cannot fall behind (guest writes slow to the link)."""
    await src.execute(
        "block-job-change", {"id": MIRROR_JOB, "type": "mirror", "copy-mode": "write-blocking"}
    )
    src.logger.info("disk.write_blocking")


async def _end_job(src: QmpSession, *, force: bool, timeout_s: float) -> Mapping[str, Any]:
    """Cancel the mirror job and return the event that ended it."""
    with src.listener(*_JOB_EVENTS) as listener:
        await src.execute("block-job-cancel", {"device": MIRROR_JOB, "force": force})
        async with asyncio.timeout(timeout_s):
            while True:
                event = await src.next_event(listener, timeout_s)
                data = event.get("data", {})
                if data.get("device") == MIRROR_JOB and event["event"] != "BLOCK_JOB_ERROR":
                    return event


async def _detach_target(src: QmpSession) -> None:
    with contextlib.suppress(QMPCommandError):
        await src.execute("blockdev-del", {"node-name": _TARGET_NODE})


async def finish_mirror(src: QmpSession, timeout_s: float = 60.0) -> MirrorStatus:
    """End a ready mirror with the target a consistent copy, then detach the target.

    Call it with the guest paused (at ``pre-switchover``): cancelling a ready mirror makes QEMU
    copy what is still dirty and end with ``BLOCK_JOB_COMPLETED``, a point-in-time copy.

    Returns:
        The final progress.

    Raises:
        MigrationFailed: the mirror was not in sync, or ended with an error or cancelled.
        QMPTimeout: it did not end within ``timeout_s``.
    """
    status = await mirror_status(src)
    if not status.ready:
        raise MigrationFailed(src.name, "disk", f"disk mirror not in sync ({status.status})")
    try:
        event = await _end_job(src, force=False, timeout_s=timeout_s)
    except TimeoutError as err:
        raise QMPTimeout("disk mirror completion", timeout_s) from err
    data = event.get("data", {})
    if event["event"] != "BLOCK_JOB_COMPLETED" or "error" in data:
        raise MigrationFailed(
            src.name, "disk", f"disk mirror ended with {event['event']}: {data.get('error')}"
        )
    await _detach_target(src)
    final = MirrorStatus(int(data.get("offset", 0)), int(data.get("len", 0)), True, "completed")
    src.logger.info("disk.mirror_complete %d bytes", final.copied_bytes)
    return final


async def abort_mirror(src: QmpSession, timeout_s: float = 30.0) -> None:
    """Stop the mirror (if any) without caring about the target, and detach the target.

    Never raises for a job that is already gone; the source disk is untouched either way.
    """
    status = await mirror_status(src)
    if status.status not in ("gone", "concluded", "null"):
        with contextlib.suppress(QMPCommandError, TimeoutError, QMPTimeout):
            await _end_job(src, force=True, timeout_s=timeout_s)
    elif status.status == "concluded":
        with contextlib.suppress(QMPCommandError):
            await src.execute("job-dismiss", {"id": MIRROR_JOB})
    await _detach_target(src)
    src.logger.info("disk.mirror_aborted")
