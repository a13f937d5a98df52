"""The service's HTTP application (aiohttp): authorization on every request, error mapping,
body and query validation, and the handlers of :data:`vmferry.service.routes.ROUTES`.

Every request, unknown paths included, is decided by :func:`vmferry.service.auth.decide` before
anything else: 401 without a known token, 403 for a viewer on an operator route. A token comes
as ``Authorization: Bearer``, or from a browser as the dashboard's session cookie
(:mod:`vmferry.service.session`); only the dashboard's own files (:mod:`vmferry.service.pages`)
are served without one. Errors are
``{"error": {"code", "message"}}`` (see :mod:`vmferry.service.errors`). Bodies are JSON of at
most :data:`~vmferry.service.api.MAX_BODY_BYTES`, validated against their model's schema.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from vmferry.agent.api import NotFound
from vmferry.controller.cluster import Cluster
from vmferry.controller.inventory import Inventory
from vmferry.controller.placing import live_cluster
from vmferry.core.errors import FerryError
from vmferry.service import api, session
from vmferry.service import schema as s
from vmferry.service.auth import Principal, TokenBook, decide, role_for_method
from vmferry.service.errors import code_of
from vmferry.service.events import Event, EventBus, sse_comment, sse_frame
from vmferry.service.metrics import CONTENT_TYPE, ServiceMetrics
from vmferry.service.openapi import openapi_document
from vmferry.service.pages import PUBLIC_ROUTES, add_dashboard
from vmferry.service.routes import ROUTES, Param, Route, route_for
from vmferry.service.store import ServiceStore
from vmferry.service.supervisor import Supervisor
from vmferry.service.views import host_rows
from vmferry.service.work import (
    balance_work,
    evacuation_request,
    evacuation_work,
    migration_request,
    migration_work,
    reconcile_work,
)

__all__ = ["STATE_KEY", "ServiceState", "build_app"]

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
B = TypeVar("B", bound=api.Body)

_HOST_INFO_TIMEOUT_S = 5.0  # a scrape waits this long for each agent
_WRITE_TIMEOUT_S = 10.0  # an event stream whose client reads nothing for this long is closed


@dataclass(slots=True)
class ServiceState:
    """Everything the handlers share."""

    tokens: TokenBook
    store: ServiceStore
    bus: EventBus
    metrics: ServiceMetrics
    supervisor: Supervisor
    lab_dir: Path | None
    keepalive_s: float = 15.0
    max_watchers: int = 1000
    url: str | None = None
    closing: asyncio.Event = field(default_factory=asyncio.Event)
    dropped_seen: int = 0


STATE_KEY = web.AppKey("service", ServiceState)
PRINCIPAL_KEY = web.RequestKey("principal", Principal)


def _state(request: web.Request) -> ServiceState:
    return request.app[STATE_KEY]


def _error(code: api.ErrorCode, message: str) -> web.Response:
    return web.json_response(api.error_json(code, message), status=api.STATUS_BY_CODE[code])


_HTTP_CODES = {
    404: api.ErrorCode.NOT_FOUND,
    405: api.ErrorCode.METHOD_NOT_ALLOWED,
    413: api.ErrorCode.TOO_LARGE,
    415: api.ErrorCode.UNSUPPORTED_MEDIA,
}


def _operation(request: web.Request) -> Route | None:
    name = request.match_info.route.name
    try:
        return None if name is None else route_for(name)
    except KeyError:
        return None


def _who(request: web.Request, tokens: TokenBook) -> Principal | None:
    """Who asks: by the ``Authorization`` header if there is one, else by the dashboard's
    session cookie, which counts for a request that changes something only with the page's
    CSRF header (see :mod:`vmferry.service.session`)."""
    header = request.headers.get("Authorization")
    if header is not None:
        return tokens.lookup(header)
    cookie = request.cookies.get(session.COOKIE_NAME)
    if cookie is None:
        return None
    if request.method not in ("GET", "HEAD") and request.headers.get(session.CSRF_HEADER) != "1":
        return None
    return session.verify(tokens, cookie, time.time())


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Decide, then run the handler; map errors to JSON; count and time the request."""
    began = time.perf_counter()
    route = _operation(request)
    public = request.match_info.route.name in PUBLIC_ROUTES  # the dashboard's own files
    label = route.operation if route is not None else "dashboard" if public else "unknown"
    state = _state(request)
    who = _who(request, state.tokens)
    decision = decide(who, route.role if route is not None else role_for_method(request.method))
    response: web.StreamResponse
    if public:
        response = await _answer(request, handler)
    elif not decision.allowed:
        code = api.ErrorCode.UNAUTHORIZED if decision.status == 401 else api.ErrorCode.FORBIDDEN
        response = _error(code, decision.reason)
        if decision.status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="vmferry"'
    else:
        assert who is not None  # allowed: a known token
        request[PRINCIPAL_KEY] = who
        response = await _answer(request, handler)
    if route is None or route.media != "text/event-stream":
        state.metrics.request_duration.labels(label).observe(time.perf_counter() - began)
    state.metrics.requests.labels(request.method, label, str(response.status)).inc()
    return response


async def _answer(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except FerryError as error:
        code = code_of(error)
        if code in (api.ErrorCode.INTERNAL, api.ErrorCode.UNAVAILABLE):
            logger.error("%s %s failed: %s", request.method, request.path, error)
        return _error(code, str(error))
    except web.HTTPException as error:
        if error.status < 400:
            raise
        code = _HTTP_CODES.get(error.status, api.ErrorCode.INVALID)
        return _error(code, error.reason)


async def _body(request: web.Request, model: type[B]) -> B:
    """The request's JSON body as ``model``.

    Raises:
        HTTPRequestEntityTooLarge: over the limit.
        HTTPUnsupportedMediaType: not ``application/json``.
        SchemaError: not JSON, or not the model's schema.
    """
    if request.content_length is not None and request.content_length > api.MAX_BODY_BYTES:
        raise web.HTTPRequestEntityTooLarge(
            max_size=api.MAX_BODY_BYTES, actual_size=request.content_length
        )
    if request.content_type != "application/json":
        raise web.HTTPUnsupportedMediaType(reason="the body must be application/json")
    raw = await request.read()  # aiohttp refuses more than client_max_size (413)
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise s.SchemaError("$", f"not valid JSON ({err})") from err
    return model.from_json(data)


def _query(request: web.Request, param: Param) -> Any:
    """A query or path parameter, converted and validated (None: absent).

    Raises:
        SchemaError: not of its schema.
    """
    text = request.match_info.get(param.name) if param.where == "path" else None
    if text is None:
        text = request.query.get(param.name)
    if text is None:
        return None
    value: Any = text
    if param.schema.get("type") == "integer":
        try:
            value = int(text)
        except ValueError:
            raise s.SchemaError(param.name, "must be an integer") from None
    s.validate(value, param.schema, param.name)
    return value


def _params(request: web.Request) -> dict[str, Any]:
    route = _operation(request)
    assert route is not None
    return {p.name: _query(request, p) for p in route.params}


# -- read-only routes --------------------------------------------------------------------------


async def _list_hosts(request: web.Request) -> web.Response:
    state = _state(request)
    inventory = Inventory.load(state.lab_dir)
    async with Cluster(inventory) as cluster:
        live = await live_cluster(cluster, state.store.job_store())
    return web.json_response(host_rows(live, [h.name for h in inventory.hosts]))


async def _list_vms(request: web.Request) -> web.Response:
    async with Cluster(Inventory.load(_state(request).lab_dir)) as cluster:
        listing = await cluster.list_vms()
    return web.json_response(
        {"vms": [v.to_json() for v in listing.vms], "unreachable": list(listing.unreachable)}
    )


async def _show_vm(request: web.Request) -> web.Response:
    name = _params(request)["name"]
    async with Cluster(Inventory.load(_state(request).lab_dir)) as cluster:
        info = await cluster.locate(name)
    return web.json_response(info.to_json())


async def _history(request: web.Request) -> web.Response:
    params = _params(request)
    history = _state(request).store.history()
    entries = await asyncio.to_thread(history.entries, params["vm"], params["limit"] or 50)
    return web.json_response([e.to_json() for e in entries])


async def _list_jobs(request: web.Request) -> web.Response:
    params = _params(request)
    state = None if params["state"] is None else api.JobState(params["state"])
    jobs = _state(request).store.jobs(params["limit"] or 100, state)
    return web.json_response([j.to_json() for j in jobs])


async def _show_job(request: web.Request) -> web.Response:
    return web.json_response(_state(request).store.job(_params(request)["id"]).to_json())


async def _job_curve(request: web.Request) -> web.Response:
    state, job = _state(request), _params(request)["id"]
    state.store.job(job)  # 404 for an unknown job
    return web.json_response({"job": job, "moves": state.supervisor.curves.curves(job)})


async def _whoami(request: web.Request) -> web.Response:
    return web.json_response(request[PRINCIPAL_KEY].to_json())


async def _login(request: web.Request) -> web.Response:
    """The caller's token (as it authenticated this request) exchanged for a session cookie."""
    who = request[PRINCIPAL_KEY]
    response = web.json_response(who.to_json(), headers={"Cache-Control": "no-store"})
    response.set_cookie(
        session.COOKIE_NAME,
        session.issue(_state(request).tokens, who, time.time()),
        max_age=session.SESSION_TTL_S,
        path="/",
        httponly=True,
        samesite="Strict",
        secure=request.secure,
    )
    return response


async def _logout(request: web.Request) -> web.Response:
    response = web.json_response(request[PRINCIPAL_KEY].to_json())
    response.del_cookie(
        session.COOKIE_NAME, path="/", httponly=True, samesite="Strict", secure=request.secure
    )
    return response


async def _openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document(_state(request).url))


async def _metrics(request: web.Request) -> web.Response:
    state = _state(request)
    counts = Counter((j.kind, str(j.state)) for j in state.store.jobs(limit=1_000_000))
    state.metrics.set_jobs(counts)
    dropped = state.bus.dropped_total - state.dropped_seen
    if dropped:
        state.metrics.events_dropped.inc(dropped)
        state.dropped_seen = state.bus.dropped_total
    inventory = Inventory.load(state.lab_dir)
    async with Cluster(inventory) as cluster:
        names = [h.name for h in inventory.hosts]
        answers = await asyncio.gather(
            *(cluster.client(n).host_info(timeout_s=_HOST_INFO_TIMEOUT_S) for n in names),
            return_exceptions=True,
        )
    infos = {}
    for name, answer in zip(names, answers, strict=True):
        if not isinstance(answer, BaseException):
            infos[name] = answer
        elif not isinstance(answer, FerryError):
            raise answer
    state.metrics.set_hosts(names, infos)
    response = web.Response(body=state.metrics.render())
    response.content_type = CONTENT_TYPE.split(";")[0]
    response.headers["Content-Type"] = CONTENT_TYPE
    return response


# -- jobs ---------------------------------------------------------------------------------------


def _accepted(job: Any) -> web.Response:
    return web.json_response(job.to_json(), status=202)


async def _migrate(request: web.Request) -> web.Response:
    body = await _body(request, api.MigrateBody)
    migration = migration_request(body)  # refused here (400) before a job is recorded
    state = _state(request)
    work = migration_work(state.lab_dir, migration)
    return _accepted(
        state.supervisor.submit("migrate", body.to_json(), request[PRINCIPAL_KEY], work)
    )


async def _evacuate(request: web.Request) -> web.Response:
    body = await _body(request, api.EvacuateBody)
    job_request = evacuation_request(body)
    state = _state(request)
    work = evacuation_work(state.lab_dir, job_request, body.dry_run)
    return _accepted(
        state.supervisor.submit("evacuate", body.to_json(), request[PRINCIPAL_KEY], work)
    )


async def _balance(request: web.Request) -> web.Response:
    body = await _body(request, api.BalanceBody)
    state = _state(request)
    work = balance_work(state.lab_dir, body)
    return _accepted(
        state.supervisor.submit("balance", body.to_json(), request[PRINCIPAL_KEY], work)
    )


async def _reconcile(request: web.Request) -> web.Response:
    body = await _body(request, api.ReconcileBody)
    state = _state(request)
    work = reconcile_work(state.lab_dir, body)
    return _accepted(
        state.supervisor.submit("reconcile", body.to_json(), request[PRINCIPAL_KEY], work)
    )


async def _cancel_job(request: web.Request) -> web.Response:
    state = _state(request)
    job = _params(request)["id"]
    state.supervisor.cancel(job)
    return web.json_response(state.store.job(job).to_json(), status=202)


# -- events -------------------------------------------------------------------------------------


async def _write(response: web.StreamResponse, data: bytes) -> None:
    """Raises: TimeoutError: the client stopped reading (its socket buffer is full)."""
    async with asyncio.timeout(_WRITE_TIMEOUT_S):
        await response.write(data)


def _is_final(event: Event) -> bool:
    return event.kind == "job" and api.JobState(event.data["state"]).is_final


async def _events(request: web.Request) -> web.StreamResponse:
    """The event stream; one job's (``?job=``) ends once that job has ended."""
    state = _state(request)
    job = _params(request)["job"]
    if job is not None:
        state.store.job(job)  # 404 for an unknown job
    if state.bus.watchers >= state.max_watchers:
        raise FerryError(f"too many event streams ({state.max_watchers}): try again later")
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    with state.bus.watch(job) as watcher:
        try:
            async with asyncio.timeout(_WRITE_TIMEOUT_S):
                await response.prepare(request)
            await _write(response, sse_frame(Event(state.bus.seq, "hello", {"seq": state.bus.seq})))
            if job is not None:  # where it stands now: nothing before the stream is missed
                snapshot = Event(state.bus.seq, "job", state.store.job(job).event_json())
                await _write(response, sse_frame(snapshot))
            ended = job is not None and _is_final(snapshot)
            while not ended and not state.closing.is_set():
                events = await watcher.next(state.keepalive_s)
                payload = b"".join(sse_frame(e) for e in events) or sse_comment("keepalive")
                await _write(response, payload)
                ended = job is not None and any(_is_final(e) for e in events)
        except (TimeoutError, ConnectionError) as err:
            logger.info("events.closed a watcher (%s)", type(err).__name__)
    return response


_HANDLERS: dict[str, Handler] = {
    "list_hosts": _list_hosts,
    "list_vms": _list_vms,
    "show_vm": _show_vm,
    "history": _history,
    "list_jobs": _list_jobs,
    "show_job": _show_job,
    "cancel_job": _cancel_job,
    "migrate": _migrate,
    "evacuate": _evacuate,
    "balance": _balance,
    "reconcile": _reconcile,
    "events": _events,
    "metrics": _metrics,
    "openapi": _openapi,
    "job_curve": _job_curve,
    "whoami": _whoami,
    "login": _login,
    "logout": _logout,
}


_TEMPLATES = [
    (re.compile("^" + re.sub(r"\\\{[a-z_]+\\\}", "[^/]+", re.escape(r.path)) + "$"), r.method)
    for r in ROUTES
]


async def _not_found(request: web.Request) -> web.Response:
    """No route: 405 where the path is served with other methods, else 404."""
    allowed = sorted({method for pattern, method in _TEMPLATES if pattern.match(request.path)})
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, allowed)
    raise NotFound(f"no route {request.method} {request.path}")


def build_app(state: ServiceState) -> web.Application:
    """The application serving ``state`` (every route of the table, then a catch-all)."""
    app = web.Application(middlewares=[_guard], client_max_size=api.MAX_BODY_BYTES)
    app[STATE_KEY] = state
    for route in ROUTES:
        app.router.add_route(
            route.method, route.path, _HANDLERS[route.operation], name=route.operation
        )
    add_dashboard(app)
    app.router.add_route("*", "/{tail:.*}", _not_found)
    return app
