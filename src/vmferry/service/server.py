"""Running the service: tokens, store, the supervisor's task group, HTTP(S), graceful stop.

:func:`run_service` serves until SIGTERM/SIGINT, then stops taking requests and jobs, gives
running jobs ``grace_s`` to end, cancels the rest (each move wound down with the guest intact
on one host, the job recorded ``interrupted``), ends the event streams and closes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from vmferry.core.errors import ConfigError
from vmferry.service.app import ServiceState, build_app
from vmferry.service.auth import Role, load_or_create_tokens
from vmferry.service.events import EventBus
from vmferry.service.metrics import ServiceMetrics
from vmferry.service.store import SqliteStore
from vmferry.service.supervisor import Supervisor

__all__ = ["Listening", "ServiceConfig", "run_service"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    """How to run the service.

    Attributes:
        listen_host, listen_port: where to listen (port 0: any free one).
        state_dir: the service's own files (its tokens).
        database: the store's SQLite file (the lab's ``history.db``).
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


async def _serve(state: ServiceState, config: ServiceConfig) -> web.AppRunner:
    """Listen; sets ``state.url``.

    Raises:
        ConfigError: the address cannot be listened on (in use, not ours).
    """
    runner = web.AppRunner(build_app(state), access_log=None, shutdown_timeout=5.0)
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


async def run_service(
    config: ServiceConfig, on_listening: Callable[[Listening], None] | None = None
) -> None:
    """Serve until SIGTERM/SIGINT (see the module docstring).

    Raises:
        ConfigError: unreadable or unsafe token files; the address cannot be listened on.
    """
    tokens, token_files = load_or_create_tokens(config.state_dir / "tokens")
    store = SqliteStore(config.database)
    left = store.interrupt_running()
    if left:
        logger.warning(
            "service.found %d job(s) a stopped service left running: %s", len(left), left
        )
    bus, metrics = EventBus(config.queue_events), ServiceMetrics()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    supervisor = Supervisor(store, bus, metrics)
    state = ServiceState(
        tokens, store, bus, metrics, supervisor, config.lab_dir, config.keepalive_s
    )
    runner = await _serve(state, config)  # before the task group: a bind error is plain
    try:
        async with asyncio.TaskGroup() as group:
            supervisor.adopt(group)
            assert state.url is not None
            listening = Listening(state.url, token_files)
            if config.ready_file is not None:
                _write_ready(config.ready_file, listening)
            if on_listening is not None:
                on_listening(listening)
            logger.info("service.listening %s", state.url)
            await stop.wait()
            logger.info("service.stopping")
            await supervisor.shutdown(config.grace_s)
    finally:
        state.closing.set()
        bus.wake_all()
        await runner.cleanup()
    logger.info("service.stopped")
