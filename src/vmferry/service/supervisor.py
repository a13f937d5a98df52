"""Server-owned jobs: one task group owns every job's task, so a job outlives the request (and
the client) that asked for it, and nothing runs that the service does not own.

A job is recorded (``running``) before its task starts and once more when it ends; every change
is published on the event bus. How it ends:

- its work returns an :class:`Outcome` (``completed``, ``failed``, ``refused`` with a result);
- a ``ConfigError`` (bad input, unknown VM, no room, a job holds the host): ``refused``;
- any other ``FerryError``, or its deadline passing: ``failed``, with the error;
- an operator cancels it (``cancelled``) or the service stops (``interrupted``): the task is
  cancelled; a move in flight is wound down by the migration runner (shielded: the guest stays
  intact on one host) before the cancellation goes on;
- a bug (any other exception, caught here at the task's top level only): ``failed``
  (``internal``), logged with its traceback.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from vmferry.agent.api import stats_to_json
from vmferry.core.errors import ConfigError, FerryError, StateError
from vmferry.core.eta import EtaHints
from vmferry.core.model import MigrationStats
from vmferry.core.phases import Phase
from vmferry.service.api import ErrorCode, JobState
from vmferry.service.auth import Principal
from vmferry.service.curves import MoveCurves
from vmferry.service.errors import code_of
from vmferry.service.events import EventBus
from vmferry.service.metrics import ServiceMetrics
from vmferry.service.store import ServiceJob, ServiceStore

__all__ = ["JobContext", "Outcome", "Supervisor", "Work"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a job's work ended (it ran to the end: errors are raised, not returned)."""

    state: JobState
    result: Any
    controller_job: int | None = None


@dataclass(frozen=True, slots=True)
class JobContext:
    """What a job's work may use: its id, who asked, the store, the bus, the metrics."""

    job: int
    who: Principal
    store: ServiceStore
    bus: EventBus
    metrics: ServiceMetrics
    curves: MoveCurves | None = None  # the dashboard's curves and ETAs (None: none kept)

    def progress(self, vm: str, phase: Phase, stats: MigrationStats | None) -> None:
        """Publish a move's phase and sample (what the CLI's progress line shows), with the
        ETA the CLI's line would show."""
        eta_ms = None
        if stats is not None and self.curves is not None:
            eta_ms = self.curves.add(self.job, vm, stats)
        data = {"job": self.job, "vm": vm, "phase": phase.value, "eta_ms": eta_ms}
        self.bus.publish(
            "progress", {**data, "stats": None if stats is None else stats_to_json(stats)}
        )

    def plan(
        self, vm: str, zero_fraction: float, dirty_rate_bps: int, dirty_set: int | None
    ) -> None:
        """Publish what a move's pre-flight measured (the ETA's hints)."""
        if self.curves is not None:
            self.curves.hint(self.job, vm, EtaHints(zero_fraction, dirty_rate_bps, dirty_set))
        self.bus.publish(
            "plan",
            {
                "job": self.job,
                "vm": vm,
                "zero_fraction": zero_fraction,
                "dirty_rate_bps": dirty_rate_bps,
                "dirty_set_bytes": dirty_set,
            },
        )

    def controller_job(self, job: int) -> None:
        """The job's record in the controller's job tables (evacuate, balance)."""
        self.bus.publish(
            "job",
            self.store.update_job(self.job, JobState.RUNNING, controller_job=job).event_json(),
        )


Work = Callable[[JobContext], Awaitable[Outcome]]


def _error(code: ErrorCode, message: str) -> Mapping[str, str]:
    return {"code": str(code), "message": message}


class Supervisor:
    """Starts, tracks, cancels and winds down the service's jobs (see the module docstring).

    Args:
        group: the task group that owns every job's task (the service's); None: given later
            with :meth:`adopt` (the service listens before its task group runs).
        job_timeout_s: the longest any job may run.
    """

    def __init__(
        self,
        store: ServiceStore,
        bus: EventBus,
        metrics: ServiceMetrics,
        group: asyncio.TaskGroup | None = None,
        *,
        job_timeout_s: float = 6 * 3600.0,
    ) -> None:
        self.store, self.bus, self.metrics = store, bus, metrics
        self._group = group
        self._timeout_s = job_timeout_s
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._cancelled: set[int] = set()
        self._closing = False
        self.curves = MoveCurves()

    def adopt(self, group: asyncio.TaskGroup) -> None:
        """Run jobs as tasks of ``group`` from now on."""
        self._group = group

    @property
    def running(self) -> list[int]:
        return sorted(self._tasks)

    def submit(
        self, kind: str, request: Mapping[str, Any], who: Principal, work: Work
    ) -> ServiceJob:
        """Record a job and start its work as a task of the service.

        Raises:
            StateError: the service is shutting down.
            FerryError: the store cannot be written.
        """
        if self._closing or self._group is None:
            state = "shutting down" if self._closing else "starting"
            raise StateError("the service", state, "running")
        job = self.store.create_job(kind, request, who)
        logger.info("job.started %s %s asked by %s", job.id, kind, who.asked_by)
        self._start(self._group, job, work)
        return job

    def take_over(self, job: ServiceJob, work: Work) -> None:
        """Run ``work`` for ``job``, a running job whose controller died (its record goes on:
        see :mod:`vmferry.service.takeover`).

        Raises:
            StateError: the service is shutting down.
        """
        if self._closing or self._group is None:
            state = "shutting down" if self._closing else "starting"
            raise StateError("the service", state, "running")
        logger.info("job.taken_over %s %s asked by %s", job.id, job.kind, job.asked_by.asked_by)
        self._start(self._group, job, work)

    def _start(self, group: asyncio.TaskGroup, job: ServiceJob, work: Work) -> None:
        self.bus.publish("job", job.event_json())
        context = JobContext(job.id, job.asked_by, self.store, self.bus, self.metrics, self.curves)
        task = group.create_task(self._run(job.id, work, context), name=f"job-{job.id}")
        self._tasks[job.id] = task
        task.add_done_callback(lambda _: self._tasks.pop(job.id, None))

    def cancel(self, job: int) -> None:
        """Cancel a running job (it ends ``cancelled`` once its move is wound down).

        Raises:
            StateError: the job does not run in this service (ended, or another's).
        """
        task = self._tasks.get(job)
        if task is None:
            state = self.store.job(job).state
            raise StateError(f"job {job}", str(state), "running")
        self._cancelled.add(job)
        task.cancel()

    def _end(self, job: int, state: JobState, **fields: Any) -> None:
        ended = self.store.update_job(job, state, **fields)
        logger.info("job.ended %s %s", job, state)
        self.bus.publish("job", ended.event_json())

    async def _run(self, job: int, work: Work, context: JobContext) -> None:
        try:
            async with asyncio.timeout(self._timeout_s):
                outcome = await work(context)
        except asyncio.CancelledError:
            state = JobState.CANCELLED if job in self._cancelled else JobState.INTERRUPTED
            why = "cancelled by an operator" if job in self._cancelled else "the service stopped"
            self._end(job, state, error=_error(ErrorCode.UNAVAILABLE, why))
            raise
        except TimeoutError:
            why = f"still running after {self._timeout_s:.0f} s: stopped"
            self._end(job, JobState.FAILED, error=_error(ErrorCode.INTERNAL, why))
        except ConfigError as err:
            self._end(job, JobState.REFUSED, error=_error(code_of(err), str(err)))
        except FerryError as err:
            logger.error("job.failed %s: %s", job, err)
            self._end(job, JobState.FAILED, error=_error(code_of(err), str(err)))
        except Exception as err:  # the task's top-level boundary: a bug must not kill the service
            logger.error("job.crashed %s: %s", job, err, exc_info=True)
            self._end(
                job, JobState.FAILED, error=_error(ErrorCode.INTERNAL, f"internal error: {err}")
            )
        else:
            self._end(
                job, outcome.state, result=outcome.result, controller_job=outcome.controller_job
            )

    async def shutdown(self, grace_s: float, wind_down_s: float = 120.0) -> None:
        """Refuse new jobs, give the running ones ``grace_s`` to end, then cancel them (each
        winds its move down) and wait up to ``wind_down_s`` for that."""
        self._closing = True
        tasks = list(self._tasks.values())
        if not tasks:
            return
        logger.info("service.draining %d job(s), %.0f s grace", len(tasks), grace_s)
        _, pending = await asyncio.wait(tasks, timeout=grace_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=wind_down_s)
