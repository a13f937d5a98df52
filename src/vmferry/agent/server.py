"""The agent's HTTP service (aiohttp): authentication, routes, error mapping, process lifecycle.

Served over HTTPS (``run_agent`` with an ``ssl.SSLContext``, see :mod:`vmferry.agent.tls`); plain
HTTP only when the operator asks for it (``vmferry agent --insecure-http``). Either way every
request, unknown paths included, must carry the token: no route answers without it.

Routes (all under ``/v1``, all needing ``Authorization: Bearer <cluster token>``)::

    GET    /host                      HostInfo
    GET    /vms                       [VmInfo]
    POST   /vms                       {spec}                    -> 201 VmInfo (boots it)
    GET    /vms/{name}                VmInfo
    DELETE /vms/{name}                                          -> 204
    POST   /vms/{name}/verify                                   -> integrity
    POST   /incoming                  {spec, options}           -> {"uri", "nbd"}
    POST   /vms/{name}/finish                                   -> {first_heartbeat_ms, integrity}
    POST   /vms/{name}/abort                                    -> 204
    POST   /vms/{name}/release-disk                             -> 204 (drop the NBD export)
    POST   /vms/{name}/migrate        {uri, options, nbd}       -> 202
    POST   /vms/{name}/switchover                               -> 204 (disk synced: go on)
    POST   /vms/{name}/postcopy                                 -> 202 (switch to post-copy)
    POST   /vms/{name}/bandwidth      {bandwidth_bps}           -> 204 (re-cap a migration)
    POST   /vms/{name}/measure                                  -> GuestMeasurement
    GET    /vms/{name}/profile?address=A                        -> Profile (rolling, no measuring)
    POST   /paths/bandwidth           {address, bandwidth_bps}  -> 204 (a probe's figure)
    POST   /bandwidth/sinks                                     -> 201 {"port"}
    GET    /bandwidth/sinks/{port}?wait=S                       -> {received_bytes, bandwidth_bps}
    POST   /bandwidth/probe           {address, port, duration_ms} -> {sent_bytes, bandwidth_bps}
    GET    /vms/{name}/migration?since=N&wait=S                 -> {samples, result, next}
    POST   /vms/{name}/cancel                                   -> 202
    POST   /vms/{name}/handoff                                  -> 204
    POST   /vms/{name}/resume-source                            -> 204 (completed, target gone)
    POST   /vms/{name}/forget                                   -> 204 (its QEMU died)
    POST   /vms/{name}/postcopy/pause     {attempt}             -> {"status"} (either side)
    POST   /vms/{name}/postcopy/recover   {attempt}             -> {"uri"} (destination)
    POST   /vms/{name}/postcopy/resume    {uri, attempt}        -> {"status"} (source)
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import math
import os
import signal
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from vmferry.agent.accel import probe_accel
from vmferry.agent.api import (
    API_PREFIX,
    PROGRESS_WAIT_MAX_S,
    SINK_WAIT_MAX_S,
    STATUS_BY_ERROR,
    NotFound,
    exec_to_json,
    stats_to_json,
)
from vmferry.agent.host import AgentConfig, HostAgent
from vmferry.core.errors import ConfigError, FerryError
from vmferry.core.handoff import VerifyMode
from vmferry.core.model import MECHANISMS, MigrationOptions, NbdTarget, spec_from_json
from vmferry.guest.image import build_image
from vmferry.qemu.argv import BootFiles
from vmferry.qemu.binary import find_qemu

__all__ = ["build_app", "options_from_json", "run_agent"]

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
AGENT_KEY = web.AppKey("agent", HostAgent)
TOKEN_KEY = web.AppKey("token", str)
_MAX_BODY_BYTES = 64 * 1024


def _error_response(error: FerryError) -> web.Response:
    # The wire names the table's class (a subclass such as UnusableImage travels as the
    # ConfigError it is), so every client knows what it may do about it.
    kind, status = next((cls, code) for cls, code in STATUS_BY_ERROR if isinstance(error, cls))
    body = {"error": {"type": kind.__name__, "message": str(error)}}
    return web.json_response(body, status=status)


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Authenticate every request and turn vmferry errors into JSON error responses."""
    token = request.app[TOKEN_KEY]
    given = request.headers.get("Authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        return web.json_response(
            {"error": {"type": "Unauthorized", "message": "missing or wrong token"}}, status=401
        )
    try:
        return await handler(request)
    except FerryError as error:
        if not isinstance(error, ConfigError):
            logger.error("%s %s failed: %s", request.method, request.path, error)
        return _error_response(error)
    except web.HTTPException as error:
        # aiohttp's own refusals (405 from the router, 413 body too large …): JSON too.
        if error.status < 400:
            raise
        body = {"error": {"type": type(error).__name__, "message": error.reason}}
        return web.json_response(body, status=error.status)


async def _body(request: web.Request) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > _MAX_BODY_BYTES:
        raise ConfigError("request body too large")
    try:
        data = await request.json()
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"request body is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError("request body must be a JSON object")
    return data


def options_from_json(data: object) -> MigrationOptions:
    """Validate migration options sent by a controller.

    Raises:
        ConfigError: wrong types or values.
    """
    if data is None:
        return MigrationOptions()
    if not isinstance(data, dict):
        raise ConfigError("'options' must be an object")
    bandwidth = data.get("max_bandwidth_bps")
    downtime = data.get("downtime_limit_ms", 300)
    timeout = data.get("timeout_s", 600.0)
    if bandwidth is not None and (not isinstance(bandwidth, int) or bandwidth <= 0):
        raise ConfigError("max_bandwidth_bps must be a positive integer")
    if not isinstance(downtime, int) or not 1 <= downtime <= 600_000:
        raise ConfigError("downtime_limit_ms must be an integer 1..600000")
    if not isinstance(timeout, int | float) or not 0 < timeout <= 86_400:
        raise ConfigError("timeout_s must be a number in (0, 86400]")
    mechanism = data.get("mechanism", "precopy")
    if mechanism not in MECHANISMS:
        raise ConfigError(f"mechanism must be one of {', '.join(MECHANISMS)}")
    postcopy_ready = data.get("postcopy_ready", False)
    channels = data.get("multifd_channels", 2)
    cache = data.get("xbzrle_cache_bytes", 64 << 20)
    if not isinstance(postcopy_ready, bool):
        raise ConfigError("postcopy_ready must be a boolean")
    tls, hold = data.get("tls", False), data.get("hold", False)
    priority = data.get("switch_priority", False)
    if not all(isinstance(flag, bool) for flag in (tls, hold, priority)):
        raise ConfigError("tls, hold and switch_priority must be booleans")
    if not isinstance(channels, int) or not 1 <= channels <= 32:
        raise ConfigError("multifd_channels must be 1..32")
    if not isinstance(cache, int) or not 1 << 20 <= cache <= 16 << 30:
        raise ConfigError("xbzrle_cache_bytes must be 1 MiB..16 GiB")
    return MigrationOptions(
        max_bandwidth_bps=bandwidth,
        downtime_limit_ms=downtime,
        timeout_s=float(timeout),
        mechanism=mechanism,
        postcopy_ready=postcopy_ready,
        multifd_channels=channels,
        xbzrle_cache_bytes=cache,
        tls=tls,
        hold=hold,
        switch_priority=priority,
    )


def _wait_s(request: web.Request, default: float, most: float) -> float:
    """The ``wait`` query parameter: seconds, finite, 0..``most`` (larger values are capped).

    Raises:
        ConfigError: not a number, NaN, infinite or negative.
    """
    text = request.query.get("wait")
    try:
        wait_s = default if text is None else float(text)
    except ValueError as err:
        raise ConfigError(f"bad query: wait={text!r} is not a number") from err
    if not math.isfinite(wait_s) or wait_s < 0:
        raise ConfigError(f"bad query: wait must be a finite number of seconds >= 0, not {text}")
    return min(wait_s, most)


def _agent(request: web.Request) -> HostAgent:
    return request.app[AGENT_KEY]


async def _host(request: web.Request) -> web.Response:
    return web.json_response(_agent(request).info().to_json())


async def _list(request: web.Request) -> web.Response:
    return web.json_response([vm.to_json() for vm in _agent(request).list_vms()])


async def _create(request: web.Request) -> web.Response:
    body = await _body(request)
    spec, image = spec_from_json(body.get("spec")), body.get("image")
    if image is not None and not isinstance(image, str):
        raise ConfigError("'image' must be a path string or null")
    info = await _agent(request).create(spec, None if image is None else Path(image))
    return web.json_response(info.to_json(), status=201)


async def _show(request: web.Request) -> web.Response:
    return web.json_response(_agent(request).get(request.match_info["name"]).to_json())


async def _runstate(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    runstate, migration = await _agent(request).qemu_state(name)
    return web.json_response(
        {"name": name, "runstate": runstate.value, "migration": migration.value}
    )


async def _delete(request: web.Request) -> web.Response:
    await _agent(request).delete(request.match_info["name"])
    return web.Response(status=204)


async def _verify(request: web.Request) -> web.Response:
    report = await _agent(request).verify(request.match_info["name"])
    return web.json_response(report.to_json())


async def _incoming(request: web.Request) -> web.Response:
    body = await _body(request)
    spec = spec_from_json(body.get("spec"))
    uri, nbd = await _agent(request).prepare_incoming(spec, options_from_json(body.get("options")))
    return web.json_response({"uri": uri, "nbd": None if nbd is None else nbd.to_json()})


async def _finish(request: web.Request) -> web.Response:
    arrival = await _agent(request).finish_incoming(request.match_info["name"])
    return web.json_response(arrival.to_json())


async def _abort(request: web.Request) -> web.Response:
    await _agent(request).abort_incoming(request.match_info["name"])
    return web.Response(status=204)


async def _migrate(request: web.Request) -> web.Response:
    body = await _body(request)
    uri = body.get("uri")
    if not isinstance(uri, str) or not uri.startswith("tcp:"):
        raise ConfigError("'uri' must be a tcp: migration URI")
    options = options_from_json(body.get("options"))
    raw_nbd = body.get("nbd")
    try:
        nbd = None if raw_nbd is None else NbdTarget.from_json(raw_nbd)
    except FerryError as err:
        raise ConfigError(str(err)) from err
    _agent(request).start_outgoing(request.match_info["name"], uri, options, nbd)
    return web.json_response({"started": True}, status=202)


async def _progress(request: web.Request) -> web.Response:
    try:
        since = int(request.query.get("since", "0"))
    except ValueError as err:
        raise ConfigError(f"bad query: {err}") from err
    wait_s = _wait_s(request, 1.0, PROGRESS_WAIT_MAX_S)
    samples, result = await _agent(request).outgoing_progress(
        request.match_info["name"], max(since, 0), wait_s
    )
    return web.json_response(
        {
            "samples": [stats_to_json(s) for s in samples],
            "next": max(since, 0) + len(samples),
            "result": None if result is None else result.to_json(),
        }
    )


async def _measure(request: web.Request) -> web.Response:
    measurement = await _agent(request).measure(request.match_info["name"])
    return web.json_response(measurement.to_json())


async def _profile(request: web.Request) -> web.Response:
    address = request.query.get("address")
    return web.json_response(_agent(request).profile(request.match_info["name"], address).to_json())


async def _record_bandwidth(request: web.Request) -> web.Response:
    body = await _body(request)
    address, bandwidth = body.get("address"), body.get("bandwidth_bps")
    if (
        not isinstance(address, str)
        or not isinstance(bandwidth, int | float)
        or not math.isfinite(bandwidth)
        or bandwidth <= 0
    ):
        raise ConfigError("a path needs 'address' (string) and 'bandwidth_bps' (> 0)")
    _agent(request).record_bandwidth(address, float(bandwidth))
    return web.Response(status=204)


async def _open_sink(request: web.Request) -> web.Response:
    return web.json_response({"port": await _agent(request).open_sink()}, status=201)


async def _sink_result(request: web.Request) -> web.Response:
    try:
        port = int(request.match_info["port"])
    except ValueError as err:
        raise ConfigError(f"bad sink port: {err}") from err
    wait_s = _wait_s(request, 10.0, SINK_WAIT_MAX_S)
    result = await _agent(request).sink_result(port, wait_s)
    return web.json_response(
        {
            "received_bytes": result.received_bytes,
            "elapsed_ms": result.elapsed_ms,
            "bandwidth_bps": result.bandwidth_bps,
        }
    )


async def _probe(request: web.Request) -> web.Response:
    body = await _body(request)
    address, port = body.get("address"), body.get("port")
    duration_ms = body.get("duration_ms", 1000)
    if not isinstance(address, str) or not isinstance(port, int) or not 0 < port < 65536:
        raise ConfigError("probe needs 'address' (string) and 'port' (1..65535)")
    if not isinstance(duration_ms, int) or not 50 <= duration_ms <= 10_000:
        raise ConfigError("duration_ms must be 50..10000")
    result = await _agent(request).probe(address, port, duration_ms)
    return web.json_response(
        {
            "sent_bytes": result.sent_bytes,
            "elapsed_ms": result.elapsed_ms,
            "bandwidth_bps": result.bandwidth_bps,
        }
    )


async def _postcopy(request: web.Request) -> web.Response:
    await _agent(request).start_postcopy(request.match_info["name"])
    return web.json_response({"postcopy": True}, status=202)


async def _set_cap(request: web.Request) -> web.Response:
    bandwidth = (await _body(request)).get("bandwidth_bps")
    if not isinstance(bandwidth, int) or isinstance(bandwidth, bool) or bandwidth <= 0:
        raise ConfigError("a cap needs 'bandwidth_bps' (a whole number > 0)")
    await _agent(request).set_outgoing_cap(request.match_info["name"], bandwidth)
    return web.Response(status=204)


async def _release_disk(request: web.Request) -> web.Response:
    await _agent(request).release_disk(request.match_info["name"])
    return web.Response(status=204)


async def _switchover(request: web.Request) -> web.Response:
    _agent(request).continue_outgoing(request.match_info["name"])
    return web.Response(status=204)


async def _cancel(request: web.Request) -> web.Response:
    await _agent(request).cancel_outgoing(request.match_info["name"])
    return web.json_response({"cancelling": True}, status=202)


async def _digests(request: web.Request) -> web.Response:
    body = await _body(request)
    mode, seed, timeout = body.get("mode"), body.get("seed"), body.get("timeout_s", 120.0)
    modes = {m.value: m for m in VerifyMode if m is not VerifyMode.OFF}
    if mode not in modes:
        raise ConfigError(f"mode must be one of {', '.join(modes)}")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 1 << 64:
        raise ConfigError("seed must be an integer 0..2**64-1")
    if not isinstance(timeout, int | float) or not 0 < timeout <= 3600:
        raise ConfigError("timeout_s must be a number in (0, 3600]")
    name = request.match_info["name"]
    digests = await _agent(request).handoff_digests(name, modes[mode], seed, float(timeout))
    return web.json_response(digests.to_json())


async def _exec(request: web.Request) -> web.Response:
    body = await _body(request)
    argv, timeout, data = body.get("argv"), body.get("timeout_s", 30.0), body.get("input")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise ConfigError("argv must be a non-empty list of strings")
    if not isinstance(timeout, int | float) or not 0 < timeout <= 3600:
        raise ConfigError("timeout_s must be a number in (0, 3600]")
    if data is not None and not isinstance(data, str):
        raise ConfigError("input must be base64 text")
    try:
        input_bytes = None if data is None else base64.b64decode(data, validate=True)
    except ValueError as err:
        raise ConfigError(f"input is not base64: {err}") from err
    name = request.match_info["name"]
    result = await _agent(request).guest_exec(name, argv, float(timeout), input_bytes)
    return web.json_response(exec_to_json(result))


async def _release_hold(request: web.Request) -> web.Response:
    await _agent(request).release_hold(request.match_info["name"])
    return web.Response(status=204)


async def _handoff(request: web.Request) -> web.Response:
    await _agent(request).handoff(request.match_info["name"])
    return web.Response(status=204)


async def _forget(request: web.Request) -> web.Response:
    await _agent(request).forget(request.match_info["name"])
    return web.Response(status=204)


async def _resume_source(request: web.Request) -> web.Response:
    await _agent(request).resume_source(request.match_info["name"])
    return web.Response(status=204)


def _attempt(body: dict[str, Any]) -> int:
    attempt = body.get("attempt", 0)
    if not isinstance(attempt, int) or isinstance(attempt, bool) or attempt < 0:
        raise ConfigError("'attempt' must be a non-negative integer")
    return attempt


async def _postcopy_pause(request: web.Request) -> web.Response:
    attempt = _attempt(await _body(request))
    status = await _agent(request).pause_postcopy(request.match_info["name"], attempt)
    return web.json_response({"status": status.value})


async def _postcopy_recover(request: web.Request) -> web.Response:
    attempt = _attempt(await _body(request))
    uri = await _agent(request).recover_incoming(request.match_info["name"], attempt)
    return web.json_response({"uri": uri})


async def _postcopy_resume(request: web.Request) -> web.Response:
    body = await _body(request)
    uri = body.get("uri")
    if not isinstance(uri, str) or not uri.startswith("tcp:"):
        raise ConfigError("'uri' must be a tcp: migration URI")
    status = await _agent(request).resume_outgoing(request.match_info["name"], uri, _attempt(body))
    return web.json_response({"status": status.value})


async def _not_found(request: web.Request) -> web.Response:
    raise NotFound(f"no route {request.method} {request.path}")


def build_app(agent: HostAgent, token: str) -> web.Application:
    """The aiohttp application serving ``agent`` to holders of ``token``."""
    app = web.Application(middlewares=[_guard], client_max_size=_MAX_BODY_BYTES)
    app[AGENT_KEY] = agent
    app[TOKEN_KEY] = token
    p = API_PREFIX
    app.router.add_get(f"{p}/host", _host)
    app.router.add_get(f"{p}/vms", _list)
    app.router.add_post(f"{p}/vms", _create)
    app.router.add_get(f"{p}/vms/{{name}}", _show)
    app.router.add_delete(f"{p}/vms/{{name}}", _delete)
    app.router.add_get(f"{p}/vms/{{name}}/runstate", _runstate)
    app.router.add_post(f"{p}/vms/{{name}}/verify", _verify)
    app.router.add_post(f"{p}/incoming", _incoming)
    app.router.add_post(f"{p}/vms/{{name}}/finish", _finish)
    app.router.add_post(f"{p}/vms/{{name}}/abort", _abort)
    app.router.add_post(f"{p}/vms/{{name}}/migrate", _migrate)
    app.router.add_get(f"{p}/vms/{{name}}/migration", _progress)
    app.router.add_post(f"{p}/vms/{{name}}/postcopy", _postcopy)
    app.router.add_post(f"{p}/vms/{{name}}/bandwidth", _set_cap)
    app.router.add_post(f"{p}/vms/{{name}}/measure", _measure)
    app.router.add_get(f"{p}/vms/{{name}}/profile", _profile)
    app.router.add_post(f"{p}/paths/bandwidth", _record_bandwidth)
    app.router.add_post(f"{p}/bandwidth/sinks", _open_sink)
    app.router.add_get(f"{p}/bandwidth/sinks/{{port}}", _sink_result)
    app.router.add_post(f"{p}/bandwidth/probe", _probe)
    app.router.add_post(f"{p}/vms/{{name}}/cancel", _cancel)
    app.router.add_post(f"{p}/vms/{{name}}/release-disk", _release_disk)
    app.router.add_post(f"{p}/vms/{{name}}/switchover", _switchover)
    app.router.add_post(f"{p}/vms/{{name}}/handoff", _handoff)
    app.router.add_post(f"{p}/vms/{{name}}/digests", _digests)
    app.router.add_post(f"{p}/vms/{{name}}/release-hold", _release_hold)
    app.router.add_post(f"{p}/vms/{{name}}/exec", _exec)
    app.router.add_post(f"{p}/vms/{{name}}/resume-source", _resume_source)
    app.router.add_post(f"{p}/vms/{{name}}/forget", _forget)
    app.router.add_post(f"{p}/vms/{{name}}/postcopy/pause", _postcopy_pause)
    app.router.add_post(f"{p}/vms/{{name}}/postcopy/recover", _postcopy_recover)
    app.router.add_post(f"{p}/vms/{{name}}/postcopy/resume", _postcopy_resume)
    app.router.add_route("*", "/{tail:.*}", _not_found)
    return app


def _write_ready(path: Path, url: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"url": url, "pid": os.getpid()}) + "\n")
    tmp.replace(path)


async def run_agent(
    config: AgentConfig,
    listen_host: str,
    listen_port: int,
    token: str,
    ready_file: Path | None,
    tls: ssl.SSLContext | None,
) -> None:
    """Run the agent until SIGTERM/SIGINT. Its VMs keep running after it exits.

    ``tls`` serves HTTPS; None (only by explicit choice: ``--insecure-http``) plain HTTP.

    Raises:
        QEMUNotFound, ImageBuildError: the host cannot run lab VMs.
    """
    qemu = await find_qemu()
    image = await asyncio.to_thread(build_image)
    boot = BootFiles(image.kernel_path, image.initrd_path)
    config.state_dir.mkdir(parents=True, exist_ok=True)
    accel = await probe_accel(qemu, boot, config.state_dir / "probe")
    agent = HostAgent(config, qemu, boot, accel)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with asyncio.TaskGroup() as tasks:
        await agent.start(tasks)
        runner = web.AppRunner(build_app(agent, token), access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, listen_host, listen_port, ssl_context=tls)
            await site.start()
            server = site._server
            assert server is not None
            port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
            url = f"{'http' if tls is None else 'https'}://{listen_host}:{port}"
            if ready_file is not None:
                _write_ready(ready_file, url)
            logger.info("agent.listening %s host=%s accel=%s", url, config.host, accel)
            await stop.wait()
            logger.info("agent.stopping %s", config.host)
        finally:
            await runner.cleanup()
            agent.cancel_background()
            await agent.close()
