"""Fixtures that boot real QEMU guests (every QEMU a test starts is ended by its fixture), and
the suite's order for parallel runs (``pytest -n 3 --dist loadgroup``, as ``make test``).

xdist hands tests to its workers in collection order: first the ``solo`` tests (timing-sensitive:
they run while no other test does, see :class:`_SoloLock`) while the other workers run the unit
and fuzz tests (seconds in all), then the ``netns`` group (every test that makes network
namespaces; one worker runs them one after the other), then the integration modules, heaviest
first. Without xdist only the order changes.
"""

from __future__ import annotations

import fcntl
from collections.abc import AsyncIterator, Generator
from pathlib import Path

import pytest
import pytest_asyncio
from labcli import lab_dir

from vmferry.guest.image import GuestImage, build_image, default_cache_dir
from vmferry.lab.local import LocalLab

__all__ = ["lab_dir"]  # the CLI tests' lab fixture, registered here for every module

# Heaviest first (tests/DURATIONS.md: list scheduling over the workers); modules not named here
# come after these.
_MODULE_ORDER = (
    "test_own_guest_cli.py",
    "test_debian_guest.py",
    "test_faults.py",
    "test_evacuation_cli.py",
    "test_reconcile.py",
    "test_job_resume_cli.py",
    "test_serve_failover.py",
    "test_disk_migration.py",
    "test_cli.py",
    "test_cluster_cli.py",
    "test_balance_cli.py",
    "test_migration_tls.py",
    "test_own_guest_input.py",
    "test_verified_handoff.py",
    "test_dashboard.py",
    "test_profile.py",
    "test_serve_cli.py",
    "test_agent_tls.py",
    "test_migration.py",
    "test_guest_disk.py",
    "test_measure.py",
    "test_guest_boot.py",
)


def _rank(item: pytest.Item) -> tuple[int, int]:
    if item.get_closest_marker("solo") is not None:
        return (0, 0)  # first: the other worker waits on short tests, not on a long one
    if "integration" not in item.path.parts:
        return (1, 0)  # fuzz and unit tests: seconds in all
    if item.get_closest_marker("xdist_group") is not None:
        return (2, 0)
    name = item.path.name
    if name in _MODULE_ORDER:
        return (3, _MODULE_ORDER.index(name))
    return (4, 0)


class _SoloLock:
    """Under xdist, a ``solo`` test runs while no other test does (on any worker).

    Every test holds a lock shared by the run's workers; a ``solo`` test holds it alone. A gate
    in front of the lock stops tests from slipping in while a ``solo`` test waits for the
    running ones to end. Registered as a plugin, so it wraps every test of the run, also those
    outside this directory.
    """

    def __init__(self, base: Path) -> None:
        self.gate = base.with_suffix(".gate")
        self.lock = base.with_suffix(".lock")

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item) -> Generator[None, object, object]:
        solo = item.get_closest_marker("solo") is not None
        with self.gate.open("a") as gate, self.lock.open("a") as lock:
            fcntl.flock(gate, fcntl.LOCK_EX)
            fcntl.flock(lock, fcntl.LOCK_EX if solo else fcntl.LOCK_SH)
            fcntl.flock(gate, fcntl.LOCK_UN)
            return (yield)  # closing the file releases the lock


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput") and not config.pluginmanager.has_plugin("vmferry-solo"):
        # The workers' temporary directories share a parent for the run (pytest prunes old ones).
        base = Path(config.option.basetemp).parent / "vmferry-solo"
        config.pluginmanager.register(_SoloLock(base), "vmferry-solo")


@pytest.hookimpl(trylast=True)  # after xdist's own hook, which tags the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=_rank)  # stable: within a rank, the collection order stays
    if getattr(config.option, "loadgroup", False):  # an xdist worker under --dist loadgroup
        lost = [
            i.nodeid for i in items if i.get_closest_marker("xdist_group") and "@" not in i.nodeid
        ]
        if lost:
            # Grouped tests spread over workers would collide on machine-wide namespaces.
            raise pytest.UsageError(f"xdist did not group {lost[:3]}… (pytest-xdist#1386)")


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    """The lab guest, built (or found in the cache) before anything boots it.

    One build per run: xdist workers take turns on a lock beside the cache, so the second finds
    the first one's image instead of building its own beside it.
    """
    cache = default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / ".build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return build_image()


@pytest.fixture(autouse=True)
def _image_first(request: pytest.FixtureRequest) -> None:
    """Every QEMU test gets the image from :func:`guest_image`, not from a parallel build."""
    if request.node.get_closest_marker("qemu") is not None:
        request.getfixturevalue("guest_image")


@pytest_asyncio.fixture
async def lab() -> AsyncIterator[LocalLab]:
    """A fresh one-machine lab (own run directory under /tmp; short socket paths)."""
    opened = await LocalLab.open()
    try:
        yield opened
    finally:
        await opened.close()
