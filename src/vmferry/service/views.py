"""Read-only views of the cluster as the API and the CLI show them (one definition for both:
``vmferry host list --json`` prints these rows in-process and through the service alike)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from vmferry.controller.placing import LiveCluster

__all__ = ["host_row", "host_rows"]


def host_row(live: LiveCluster, host: str) -> dict[str, Any]:
    """One host: its state (``active``, ``entering``, ``maintenance``, ``unreachable``), its
    VMs, its room and its capacity (``memory_bytes``, ``vcpus``: what the room is out of)."""
    info = live.hosts.get(host)
    mark = live.marks.get(host)
    state = "unreachable" if info is None else (mark.state if mark else "active")
    return {
        "host": host,
        "state": state,
        "vms": sorted(v.name for v in live.vms_on(host)),
        "memory_free_bytes": None if info is None else info.memory_free_bytes,
        "vcpus_free": None if info is None or info.vcpus is None else info.vcpus - info.vcpus_used,
        "disk_free_bytes": None if info is None else info.disk_free_bytes,
        "memory_bytes": None if info is None else info.memory_bytes,
        "vcpus": None if info is None else info.vcpus,
    }


def host_rows(live: LiveCluster, hosts: Iterable[str]) -> list[dict[str, Any]]:
    """The rows of ``hosts`` (the inventory's, in its order)."""
    return [host_row(live, host) for host in hosts]
