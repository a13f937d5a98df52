"""The service's ``vm create``: a new VM of the lab guest as a job, placed as the in-process
command places it (on the host asked for, checked against maintenance and the anti-affinity
group, or where placement finds room), with ``vm create --json``'s output as result.

Only the lab guest: your own image (``--image``) is a file on the client's machine, so that
stays an in-process command.
"""

from __future__ import annotations

import logging
from pathlib import Path

from vmferry.controller.cluster import Cluster
from vmferry.controller.jobs import JobStore
from vmferry.controller.placing import VmPlacement, live_cluster, place_vm
from vmferry.core.cluster_model import PlacementError
from vmferry.core.errors import ConfigError
from vmferry.core.model import VmSpec
from vmferry.core.workload import parse_workload
from vmferry.service.api import CreateBody, JobState
from vmferry.service.supervisor import JobContext, Outcome, Work
from vmferry.service.work import lab_cluster

__all__ = ["create_spec", "create_work"]

logger = logging.getLogger(__name__)


def create_spec(body: CreateBody) -> VmSpec:
    """Raises: ConfigError: a bad size, count or workload."""
    return VmSpec.build(
        body.name,
        memory=body.memory,
        vcpus=body.vcpus,
        workload=parse_workload(body.workload),
        disk=body.disk,
        disk_bus=body.disk_bus,
        storage=body.storage,
    )


async def _where(cluster: Cluster, store: JobStore, spec: VmSpec, body: CreateBody) -> VmPlacement:
    """The host ``body.host`` names (checked), or the one placement chooses.

    Raises:
        ConfigError: the host named is unknown or in maintenance.
        PlacementError: no room, or the host holds a VM of the group.
    """
    disk = spec.disk.size_bytes if spec.disk is not None and spec.disk.storage == "local" else 0
    if body.host is None:
        live = await live_cluster(cluster, store)
        return place_vm(live, spec, group=body.group, disk_bytes=disk)
    cluster.inventory.host(body.host)
    mark = store.marks().get(body.host)
    if mark is not None:
        raise ConfigError(f"{body.host} is {mark.describe}: no new VM goes there")
    if body.group is not None:
        groups = store.groups()
        listing = await cluster.list_vms()
        mates = [
            v.name for v in listing.vms if v.host == body.host and groups.get(v.name) == body.group
        ]
        if mates:
            raise PlacementError(
                f"{body.host} already runs {', '.join(mates)} of group {body.group!r}"
            )
    return VmPlacement(body.host, "given with --host", ())


def create_work(lab_dir: Path | None, body: CreateBody, spec: VmSpec) -> Work:
    """``vm create``: the VM's record as result (``dry_run``: where it would go and why)."""

    async def work(ctx: JobContext) -> Outcome:
        store = ctx.store.job_store()
        async with lab_cluster(lab_dir) as cluster:
            await cluster.check_new_name(spec.name)
            placed = await _where(cluster, store, spec, body)
            if body.dry_run:
                return Outcome(
                    JobState.COMPLETED, {"dry_run": True, "vm": spec.name, **placed.to_json()}
                )
            client = cluster.client(placed.host)
            offered = await client.host_info()
            if spec.machine_type not in offered.machine_types:
                raise ConfigError(
                    f"{placed.host}'s QEMU cannot build machine type {spec.machine_type}"
                )
            if spec.cpu_model not in offered.cpu_models:
                raise ConfigError(f"{placed.host}'s QEMU has no CPU model {spec.cpu_model}")
            info = await client.create_vm(spec, None)
            store.set_group(spec.name, body.group)
        logger.info("vm.created %s on %s (%s), asked by %s", info.name, info.host, placed.reason,
                    ctx.who.asked_by)  # fmt: skip
        return Outcome(JobState.COMPLETED, info.to_json())

    return work
