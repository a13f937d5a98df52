"""Fixtures that boot real QEMU guests (every QEMU a test starts is ended by its fixture), and
the suite's order for parallel runs (``pytest -n 2 --dist loadgroup``, as ``make test``).

xdist hands tests to its workers in collection order, so the longest work goes first and the
short tests fill the gaps at the end: the ``netns`` group (every test that makes network
namespaces; one worker runs them one after the other), then the integration modules, heaviest
first, then the fuzz and unit tests. Without xdist only the order changes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from labcli import lab_dir

from vmferry.lab.local import LocalLab

__all__ = ["lab_dir"]  # the CLI tests' lab fixture, registered here for every module

# Heaviest first (tests/DURATIONS.md); modules not named here come after these.
_MODULE_ORDER = (
    "test_faults.py",
    "test_disk_migration.py",
    "test_reconcile.py",
    "test_cluster_cli.py",
    "test_migration_tls.py",
    "test_cli.py",
    "test_agent_tls.py",
    "test_migration.py",
    "test_guest_disk.py",
    "test_measure.py",
    "test_guest_boot.py",
)


def _rank(item: pytest.Item) -> tuple[int, int]:
    if item.get_closest_marker("xdist_group") is not None:
        return (0, 0)
    name = item.path.name
    if name in _MODULE_ORDER:
        return (1, _MODULE_ORDER.index(name))
    if "integration" in item.path.parts:
        return (2, 0)
    return (3, 0)  # fuzz and unit tests: seconds in all


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=_rank)  # stable: within a rank, the collection order stays


@pytest_asyncio.fixture
async def lab() -> AsyncIterator[LocalLab]:
    """A fresh one-machine lab (own run directory under /tmp; short socket paths)."""
    opened = await LocalLab.open()
    try:
        yield opened
    finally:
        await opened.close()
