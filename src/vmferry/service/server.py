"""Running the service: tokens, store, the supervisor's task group, HTTP(S), graceful stop.

:func:`run_service` serves until SIGTERM/SIGINT, then stops taking requests and jobs, gives
running jobs ``grace_s`` to end, cancels the rest (each move wound down with the guest intact
on one host, the job recorded ``interrupted``), ends the event streams and closes.

On PostgreSQL (``store_url``) several services share the state and one leads, through a lease
in the database (:mod:`vmferry.service.lease`). The others follow: they answer reads (hosts,
VMs, history, jobs, metrics, from the shared database and the agents) and refuse with 503 what
would act (migrate, evacuate, balance, reconcile, cancel) and the event stream (the leader's
events are in the leader), naming the leader (``X-Vmferry-Leader``: its URL). Every response
says which one answered (``X-Vmferry-Role: leader|follower``). A follower that takes the lease
goes on with the jobs the previous leader left (:mod:`vmferry.service.takeover`); a leader that
loses it exits at once (fail-stop, as Kubernetes' controllers do: restarted, it follows). A
leader stopped with SIGTERM winds its moves down, hands its evacuations and balances over and
gives the lease up: a follower goes on with them within a quarter of the lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Middleware

from vmferry.core.errors import ConfigError, FerryError
from vmferry.service import api
from vmferry.service.app import ServiceState, build_app
from vmferry.service.auth import Role, load_or_create_tokens
from vmferry.service.events import EventBus
from vmferry.service.lease import Lease, LeaseKeeper, LeaseTiming, holder_name
from vmferry.service.metrics import ServiceMetrics
from vmferry.service.pg import PgDatabase, redact
from vmferry.service.routes import ROUTES
from vmferry.service.store import ServiceStore, SqliteStore, SqlStore
from vmferry.service.supervisor import Supervisor
from vmferry.service.takeover import hand_over, take_over

__all__ = ["Listening", "ServiceConfig", "run_service"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    """How to run the service.

    Attributes:
        listen_host, listen_port: where to listen (port 0: any free one).
        state_dir: the service's own files (its tokens).
        database: the store's SQLite file (the lab's ``history.db``).
        store_url: a PostgreSQL database instead (``postgresql://…``), shared with other
            services under a leader lease of ``lease_s``.
        lab_dir: the inventory's directory (None: the default lab).
        tls: HTTPS context; None only by explicit choice (``--insecure-http``).
        ready_file: written ``{url, pid, tokens}`` once listening.
        grace_s: how long running jobs may go on after a stop is asked for.
        keepalive_s: seconds between keepalive comments on an idle event stream.
        queue_events: each event stream's queue (older events are dropped beyond it).
    """

    listen_host: str
    listen_port: int
    state_dir: Path
    database: Path
    lab_dir: Path | None
    tls: ssl.SSLContext | None
    ready_file: Path | None = None
    grace_s: float = 10.0
    keepalive_s: float = 15.0
    queue_events: int = 256
    store_url: str | None = None
    lease_s: float = 10.0


@dataclass(frozen=True, slots=True)
class Listening:
    """Where the service answers, and its token files."""

    url: str
    tokens: dict[Role, Path]


def _write_ready(path: Path, listening: Listening) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    data = {
        "url": listening.url,
        "pid": os.getpid(),
        "tokens": {str(role): str(p) for role, p in listening.tokens.items()},
    }
    tmp.write_text(json.dumps(data) + "\n")
    tmp.replace(path)


# Operations a follower refuses: those that act, and the event stream (events are the leader's).
_LEADER_ONLY = frozenset(
    r.operation for r in ROUTES if r.method != "GET" or r.media == "text/event-stream"
)
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _follower_guard(lease: Lease) -> Middleware:
    """A middleware (inside authorization): on a follower, 503 naming the leader for what
    only the leader does."""

    @web.middleware
    async def guard(request: web.Request, handler: _Handler) -> web.StreamResponse:
        if lease.leading or request.match_info.route.name not in _LEADER_ONLY:
            return await handler(request)
        try:
            leader = await asyncio.to_thread(lease.leader)
        except FerryError:
            leader = None
        retry_s = lease.timing.retry_s if leader is None else max(1.0, leader.expires_in_s)
        who = "none yet" if leader is None else leader.describe()
        message = f"this controller is a follower; the leader is {who}: ask it"
        headers = {"Retry-After": str(math.ceil(retry_s))}
        if leader is not None and leader.url:
            headers["X-Vmferry-Leader"] = leader.url
        return web.json_response(
            api.error_json(api.ErrorCode.UNAVAILABLE, message), status=503, headers=headers
        )

    return guard


async def _serve(state: ServiceState, config: ServiceConfig, lease: Lease | None) -> web.AppRunner:
    """Listen; sets ``state.url``.

    Raises:
        ConfigError: the address cannot be listened on (in use, not ours).
    """
    app = build_app(state)
    if lease is not None:
        app.middlewares.append(_follower_guard(lease))

        async def role(request: web.Request, response: web.StreamResponse) -> None:
            response.headers["X-Vmferry-Role"] = "leader" if lease.leading else "follower"

        app.on_response_prepare.append(role)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, config.listen_host, config.listen_port, ssl_context=config.tls)
    try:
        await site.start()
    except OSError as err:
        await runner.cleanup()
        where = f"{config.listen_host}:{config.listen_port}"
        raise ConfigError(f"cannot listen on {where}: {err.strerror or err}") from err
    server = site._server
    assert server is not None
    port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    host = config.listen_host if ":" not in config.listen_host else f"[{config.listen_host}]"
    state.url = f"{'http' if config.tls is None else 'https'}://{host}:{port}"
    return runner


def _open_store(config: ServiceConfig) -> tuple[ServiceStore, Lease | None, list[PgDatabase]]:
    """The store (on PostgreSQL: fenced by the lease, which has a connection of its own), and
    the connections to close at the end.

    Raises:
        ConfigError: not a PostgreSQL URL, psycopg missing, a lease length out of range.
        FerryError: the database does not answer.
    """
    if config.store_url is None:
        store = SqliteStore(config.database)
        left = store.interrupt_running()
        if left:
            logger.warning(
                "service.found %d job(s) a stopped service left running: %s", len(left), left
            )
        return store, None, []
    timing = LeaseTiming(config.lease_s)
    # A statement may block the event loop no longer than a renewal's interval: the keeper
    # must get to run before the lease could lapse.
    timeout_ms = int(1000 * max(1.0, timing.renew_every_s))
    db = PgDatabase(config.store_url, statement_timeout_ms=timeout_ms)
    lease = Lease(
        PgDatabase(config.store_url, statement_timeout_ms=timeout_ms), holder_name(), None, timing
    )
    db.fence = lease
    try:
        leader = lease.leader()  # fail at start, not at the first request, if it is not there
    except FerryError:
        lease.db.close()
        raise
    logger.info(
        "service.store %s; leader: %s", redact(config.store_url), leader and leader.describe()
    )
    return SqlStore(db), lease, [db, lease.db]


def _fail_stop(why: str) -> None:
    """A leader that may have lost its lease stops every action at once: no move wound down,
    no record written (the next leader settles them), as if killed."""
    logger.critical("service.lease_lost %s: exiting at once (restarted, it follows)", why)
    logging.shutdown()
    os._exit(75)


async def run_service(
    config: ServiceConfig, on_listening: Callable[[Listening], None] | None = None
) -> None:
    """Serve until SIGTERM/SIGINT (see the module docstring).

    Raises:
        ConfigError: unreadable or unsafe token files; the address cannot be listened on.
    """
    tokens, token_files = load_or_create_tokens(config.state_dir / "tokens")
    store, lease, connections = _open_store(config)
    bus, metrics = EventBus(config.queue_events), ServiceMetrics()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    supervisor = Supervisor(store, bus, metrics)
    state = ServiceState(
        tokens, store, bus, metrics, supervisor, config.lab_dir, config.keepalive_s
    )
    runner = await _serve(state, config, lease)  # before the task group: a bind error is plain
    try:
        async with asyncio.TaskGroup() as group:
            supervisor.adopt(group)
            assert state.url is not None
            keeper = None if lease is None else group.create_task(_lead(lease, state, config))
            listening = Listening(state.url, token_files)
            if config.ready_file is not None:
                _write_ready(config.ready_file, listening)
            if on_listening is not None:
                on_listening(listening)
            logger.info("service.listening %s", state.url)
            await stop.wait()
            logger.info("service.stopping")
            stopped = supervisor.running
            await supervisor.shutdown(config.grace_s)  # the lease kept meanwhile: jobs write
            if lease is not None and lease.leading:
                handed = await asyncio.to_thread(hand_over, store, stopped)
                logger.info("service.handed_over job(s) %s to the next leader", handed)
            if keeper is not None:
                keeper.cancel()
    finally:
        if lease is not None:
            with contextlib.suppress(FerryError):
                await asyncio.to_thread(lease.release)  # a follower takes over at once
        state.closing.set()
        bus.wake_all()
        await runner.cleanup()
        for db in connections:
            db.close()
    logger.info("service.stopped")


async def _lead(lease: Lease, state: ServiceState, config: ServiceConfig) -> None:
    """Follow until the lease is had, take the previous leader's jobs over, lead."""
    lease.url = state.url

    async def took(epoch: int) -> None:
        taken = await take_over(state.store, state.supervisor.take_over, config.lab_dir)
        logger.info("service.leading epoch %d; took over job(s) %s", epoch, taken)

    await LeaseKeeper(lease, took, _fail_stop).run()
