"""This host's side of a verified handoff: digests of a stopped copy of a guest (its RAM read
straight from QEMU's memfd, its local disk's guest-visible content), and the release of a
held destination when a move turns to post-copy.

Both copies are stopped while they are hashed: the source in ``postmigrate`` after QEMU
completed, the destination ``paused`` (held, see ``MigrationOptions.hold``) before it ever ran.
"""

from __future__ import annotations

import asyncio
import logging

from vmferry.agent.adopt import Spawn
from vmferry.agent.api import HandoffDigests
from vmferry.agent.digest import DigestError, digest_image, digest_ram, find_ram_fd
from vmferry.agent.slots import Slot, VmState
from vmferry.agent.store import Marker, VmStore
from vmferry.core.errors import FerryError, StateError
from vmferry.core.handoff import VerifyMode, plan_chunks
from vmferry.core.status import RunState
from vmferry.qemu.image_map import ImageMap, map_image
from vmferry.qemu.migration import run_state, wait_arrived
from vmferry.qemu.session import QmpSession

__all__ = ["handoff_digests", "premap_disk", "release_hold"]

logger = logging.getLogger(__name__)

# Which QEMU run state each side must be in for its copy to be a stopped, final one.
_STOPPED = {VmState.MIGRATED: RunState.POSTMIGRATE, VmState.INCOMING: RunState.PAUSED}
_ARRIVAL_S = 30.0
_MAP_S = 60.0


async def handoff_digests(
    slot: Slot, store: VmStore, mode: VerifyMode, seed: int, timeout_s: float
) -> HandoffDigests:
    """Digests of this host's stopped copy of ``slot``'s guest, over the plan ``mode`` and
    ``seed`` give (both sides derive the same plan from them).

    Raises:
        StateError: the copy is not stopped (not a completed source, nor a held destination
            that has received the whole guest).
        DigestError: guest RAM or the disk image could not be read.
    """
    vm, spec = slot.vm, slot.spec
    wanted = _STOPPED.get(slot.state)
    if vm is None or vm.process.pid is None or wanted is None:
        raise StateError(f"VM {spec.name}", slot.state.value, "migrated or incoming")
    await _wait_stopped(vm.qmp, spec.name, wanted)
    ram_plan = plan_chunks(mode, spec.memory_bytes, seed)
    # Every memfd backend's memfd has the same name: the guest RAM is the one of its size.
    ram_fd = find_ram_fd(vm.process.pid, spec.memory_bytes)
    ram = await digest_ram(ram_fd, ram_plan, timeout_s=timeout_s)
    disk = None
    image = store.owned_disk(spec)
    if image is not None and spec.disk is not None:
        disk_plan = plan_chunks(mode, spec.disk.size_bytes, seed)
        taken = await _premapped(slot)
        disk = await digest_image(
            image, disk_plan, timeout_s=timeout_s, fmt="qcow2", image_map=taken
        )
    logger.info(
        "handoff.digests %s@%s %s: RAM %.0f ms, disk %s",
        spec.name,
        vm.role,
        mode,
        ram.elapsed_ms,
        "-" if disk is None else f"{disk.elapsed_ms:.0f} ms",
    )
    return HandoffDigests(ram, disk)


def premap_disk(slot: Slot, store: VmStore, spawn: Spawn) -> None:
    """Start mapping ``slot``'s local disk in the background now that it is final — a source
    at the switchover pause once its mirror completed, a destination once that mirror's last
    write was flushed to it and its export is gone — so the comparison at the handoff finds
    the map (~15-30 ms of qemu-img) taken while QEMU still sends the last of the guest."""
    image = store.owned_disk(slot.spec)
    if image is None:
        return
    taken: asyncio.Future[ImageMap] = asyncio.get_running_loop().create_future()
    taken.add_done_callback(lambda done: done.cancelled() or done.exception())  # (retrieved)
    slot.disk_map = taken

    async def take() -> None:
        try:
            taken.set_result(await map_image(image, fmt="qcow2", timeout_s=_MAP_S))
        except FerryError as err:
            taken.set_exception(err)
        finally:
            if not taken.done():
                taken.set_exception(DigestError(f"the map of {image} was interrupted"))

    spawn(take(), f"premap-{slot.spec.name}")


async def _premapped(slot: Slot) -> ImageMap | None:
    """The map :func:`premap_disk` took (None: none, or it failed: map it afresh)."""
    taken, slot.disk_map = slot.disk_map, None
    if taken is None:
        return None
    try:
        return await asyncio.wait_for(asyncio.shield(taken), _MAP_S)
    except (FerryError, TimeoutError) as err:
        logger.warning("handoff.premap_failed %s: %s", slot.spec.name, err)
        return None


async def _wait_stopped(qmp: QmpSession, name: str, wanted: RunState) -> None:
    """Until QEMU has settled in ``wanted`` (see :func:`wait_arrived`).

    Raises:
        StateError: it is in another state, or still on its way after a while.
    """
    try:
        status = await wait_arrived(qmp, _ARRIVAL_S)
    except TimeoutError:
        status = await run_state(qmp)
    if status is not wanted:
        raise StateError(f"VM {name}'s QEMU", str(status), str(wanted))


async def release_hold(slot: Slot, store: VmStore) -> None:
    """Let a held destination run the guest as soon as it arrives (QEMU's ``cont`` during an
    incoming migration turns autostart back on): a post-copy runs the guest there at once.

    Raises:
        StateError: not an incoming VM still receiving.
    """
    vm = slot.vm
    if slot.state is not VmState.INCOMING or vm is None:
        raise StateError(f"VM {slot.spec.name}", slot.state.value, VmState.INCOMING.value)
    status = await run_state(vm.qmp)
    if status is not RunState.INMIGRATE:
        raise StateError(f"VM {slot.spec.name}'s QEMU", str(status), str(RunState.INMIGRATE))
    await vm.qmp.execute("cont")
    store.unmark(store.directory(slot.spec.name), Marker.HELD)
    logger.info("handoff.released %s@%s: it runs once it arrives", slot.spec.name, vm.role)
