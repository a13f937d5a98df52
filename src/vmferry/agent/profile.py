"""Rolling profiles: what an agent keeps measuring of its VMs and its paths, so that a plan
can be made from what it already knows instead of a 2 s pre-flight.

* **Guests.** Every running VM is measured in the background at a low duty cycle: the same
  measurement as a pre-flight (:meth:`Preflight.measure`: QEMU's ``calc-dirty-rate`` page
  sampling, a ``pmemsave`` sample of RAM for zero and compressible pages, vCPU load from
  ``/proc``, the disk write rate), once ``settle_s`` after the VM starts running here and then
  every ``interval_s``. One task per VM, owned by the :class:`Profiler`'s task group (itself a
  task of the agent's group); a VM that stops running here (a migration starts, it is deleted
  or forgotten, its QEMU dies) loses its task and its profile at once.
* **Paths.** Per destination migration address: the bandwidth a probe measured (the sink's
  figure, recorded by the controller) and the throughput this host's outgoing migrations
  achieved. A plan probes only when neither is recent.

A profile only answers what was measured and how long ago; whether that is fresh enough is the
controller's decision (:mod:`vmferry.controller.plan`).

Example:
    >>> profiler = Profiler(preflight, slots, interval_s=10.0)        # doctest: +SKIP
    >>> spawn(profiler.run(), "profiler")                             # doctest: +SKIP
    >>> profiler.profile("vm1", "10.0.0.2").guest_age_s               # doctest: +SKIP
    3.2
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vmferry.agent.api import GuestMeasurement, PathSample, Profile
from vmferry.agent.config import DEFAULT_PROFILE_INTERVAL_S
from vmferry.agent.preflight import Preflight
from vmferry.agent.slots import Slots, VmState
from vmferry.core.errors import FerryError
from vmferry.core.model import MigrationStats

__all__ = [
    "DEFAULT_INTERVAL_S",
    "PathBook",
    "Profiler",
    "migration_throughput_bps",
    "uri_address",
]

logger = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = DEFAULT_PROFILE_INTERVAL_S
# After a VM starts running here (boot, arrival): let its workload and any post-arrival check
# (the lab guest's page verification keeps its vCPU busy) pass before the first measurement.
SETTLE_S = 2.0
_MEASURE_TIMEOUT_S = 20.0
_TICK_S = 0.5
# A migration's throughput says something about the path only when it moved this much.
_MIGRATION_MIN_BYTES = 32 << 20
# A migration that achieved less than this share of a probe's figure means the path changed
# (or is shared now): the probe's figure is dropped.
_PROBE_DISAGREES = 0.5


def uri_address(uri: str) -> str | None:
    """The host part of a QEMU migration URI (``tcp:ADDR:PORT``, ``tcp:[v6]:PORT``)."""
    kind, _, rest = uri.partition(":")
    if kind != "tcp" or ":" not in rest:
        return None
    return rest.rpartition(":")[0].strip("[]") or None


def migration_throughput_bps(samples: Sequence[MigrationStats]) -> float | None:
    """What a finished migration says of its path's bandwidth: the best throughput QEMU
    reported while it copied RAM (QEMU's per-pass figure), None when it moved too little to
    tell (a mostly-zero guest is bound by QEMU's scan, not by the link)."""
    if not samples or samples[-1].transferred_bytes < _MIGRATION_MIN_BYTES:
        return None
    best = max((s.throughput_bps for s in samples), default=0)
    return float(best) if best > 0 else None


@dataclass(slots=True)
class _Seen:
    bandwidth_bps: float
    at_s: float


class PathBook:
    """Bandwidth seen per migration address: the last probe and the last migration."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._probes: dict[str, _Seen] = {}
        self._migrations: dict[str, _Seen] = {}

    def record_probe(self, address: str, bandwidth_bps: float) -> None:
        if bandwidth_bps > 0:
            self._probes[address] = _Seen(bandwidth_bps, self._clock())

    def record_migration(self, address: str, bandwidth_bps: float) -> None:
        """A migration to ``address`` achieved ``bandwidth_bps``."""
        if bandwidth_bps <= 0:
            return
        self._migrations[address] = _Seen(bandwidth_bps, self._clock())
        probe = self._probes.get(address)
        if probe is not None and bandwidth_bps < probe.bandwidth_bps * _PROBE_DISAGREES:
            del self._probes[address]

    def sample(self, address: str) -> PathSample | None:
        """The probe's figure if there is one (plans were calibrated on probes), else the
        last migration's; None when neither was seen."""
        now = self._clock()
        for source, book in (("probe", self._probes), ("migration", self._migrations)):
            seen = book.get(address)
            if seen is not None:
                return PathSample(seen.bandwidth_bps, round(now - seen.at_s, 3), source)
        return None


@dataclass(slots=True)
class _GuestSeen:
    measurement: GuestMeasurement
    at_s: float


class Profiler:
    """Rolling profiles of this host's running VMs and of its paths.

    Args:
        preflight: measures one VM (the same measurement a pre-flight makes).
        slots: this host's VMs.
        interval_s: time between two measurements of one VM; None: no background profiling
            (profiles then come only from explicit measurements).
        settle_s: wait after a VM starts running here before its first measurement.
    """

    def __init__(
        self,
        preflight: Preflight,
        slots: Slots,
        interval_s: float | None = DEFAULT_INTERVAL_S,
        settle_s: float = SETTLE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.preflight = preflight
        self.slots = slots
        self.interval_s = interval_s
        self.settle_s = settle_s
        self.paths = PathBook(clock)
        self._clock = clock
        self._guests: dict[str, _GuestSeen] = {}
        self._followers: dict[str, asyncio.Task[None]] = {}
        # One measurement of a VM at a time: QEMU runs one calc-dirty-rate per VM.
        self._measuring: dict[str, asyncio.Lock] = {}

    # -- reading -------------------------------------------------------------------------------

    def profile(self, name: str, address: str | None) -> Profile:
        """What is known of VM ``name`` and of the path to ``address`` (no measuring).

        Raises:
            NotFound: no such VM here.
        """
        self.slots.get(name)
        seen = self._guests.get(name)
        return Profile(
            guest=None if seen is None else seen.measurement,
            guest_age_s=None if seen is None else round(self._clock() - seen.at_s, 3),
            path=None if address is None else self.paths.sample(address),
        )

    # -- measuring -----------------------------------------------------------------------------

    async def measure(self, name: str) -> GuestMeasurement:
        """Measure VM ``name`` now (after a background measurement in progress, if any) and
        keep the result as its profile.

        Raises:
            NotFound, StateError: no running VM of that name.
            MeasurementError: QEMU's answers could not be used.
        """
        lock = self._measuring.setdefault(name, asyncio.Lock())
        async with lock:
            measurement = await self.preflight.measure(name)
        self._guests[name] = _GuestSeen(measurement, self._clock())
        return measurement

    def record_transfer(
        self, name: str, uri: str, capped: bool, samples: Sequence[MigrationStats]
    ) -> None:
        """An outgoing migration of ``name`` to ``uri`` completed: remember its throughput for
        the path (not when it was capped: that says nothing of the path)."""
        address = uri_address(uri)
        bandwidth = None if capped else migration_throughput_bps(samples)
        if address is not None and bandwidth is not None:
            self.paths.record_migration(address, bandwidth)
            logger.info("profile.path %s %.0f B/s (migration of %s)", address, bandwidth, name)

    # -- background ----------------------------------------------------------------------------

    def stop(self, name: str) -> None:
        """VM ``name`` stops running here (migrating away, deleted, forgotten): stop measuring
        it and forget its profile."""
        follower = self._followers.pop(name, None)
        if follower is not None:
            follower.cancel()
        self._guests.pop(name, None)
        self._measuring.pop(name, None)

    async def run(self) -> None:
        """Follow every running VM until cancelled (the agent's task group owns this)."""
        if self.interval_s is None:
            return
        async with asyncio.TaskGroup() as group:
            while True:
                self._reconcile(group)
                await asyncio.sleep(_TICK_S)

    def _reconcile(self, group: asyncio.TaskGroup) -> None:
        running = {
            slot.spec.name
            for slot in self.slots
            if slot.state is VmState.RUNNING and slot.vm is not None and slot.vm.process.is_running
        }
        for name in [n for n in self._followers if n not in running]:
            self.stop(name)
        for name in running - set(self._followers):
            self._followers[name] = group.create_task(self._follow(name), name=f"profile-{name}")

    async def _follow(self, name: str) -> None:
        assert self.interval_s is not None
        await asyncio.sleep(self.settle_s)
        while True:
            try:
                async with asyncio.timeout(_MEASURE_TIMEOUT_S):
                    await self.measure(name)
            except (FerryError, OSError, TimeoutError) as err:
                # A failed sample leaves the last one, which ages.
                logger.warning("profile.failed %s: %s", name, err)
            except Exception:  # the task's boundary: never take the agent's task group down
                logger.exception("profile.crashed %s", name)
            await asyncio.sleep(self.interval_s)
