"""The dashboard's side of the service without a browser or QEMU: the page and its files are
served without a token (with a strict Content-Security-Policy), the session cookie a token is
exchanged for (HttpOnly, SameSite=Strict; forged, expired or CSRF-less uses refused), whoami,
and each move's curve and ETA as its samples arrive."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from itertools import pairwise
from pathlib import Path

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from vmferry.controller.inventory import Inventory
from vmferry.core.model import MigrationStats
from vmferry.core.phases import Phase
from vmferry.core.status import MigrationStatus
from vmferry.service.api import JobState
from vmferry.service.app import ServiceState, build_app
from vmferry.service.auth import Principal, Role, TokenBook
from vmferry.service.curves import CURVES_SCHEMA, MoveCurves
from vmferry.service.events import EventBus
from vmferry.service.metrics import ServiceMetrics
from vmferry.service.pages import load_assets
from vmferry.service.schema import validate
from vmferry.service.session import COOKIE_NAME, CSRF_HEADER, SESSION_TTL_S, issue, verify
from vmferry.service.store import SqliteStore
from vmferry.service.supervisor import JobContext, Outcome, Supervisor

VIEWER, OPERATOR = "v" * 32, "o" * 32
AS_OPERATOR = {"Authorization": f"Bearer {OPERATOR}"}
VIEWER_WHO, OPERATOR_WHO = Principal("viewer", Role.VIEWER), Principal("operator", Role.OPERATOR)
BOOK = TokenBook({VIEWER: VIEWER_WHO, OPERATOR: OPERATOR_WHO})


def _stats(total_ms: int, sent: int, left: int) -> MigrationStats:
    return MigrationStats(MigrationStatus.ACTIVE, total_ms, sent, left, 64 << 20, 0, 4096, 1,
                          10 << 20, None, None, normal_pages=sent // 4096)  # fmt: skip


# -- pure ---------------------------------------------------------------------------------------


def test_a_session_cookie_names_its_principal_until_it_expires_and_cannot_be_forged() -> None:
    cookie = issue(BOOK, OPERATOR_WHO, now_s=1000.0)
    assert cookie.startswith("operator.")
    assert OPERATOR not in cookie  # no token in the cookie
    assert verify(BOOK, cookie, 1000.0 + SESSION_TTL_S - 1) == OPERATOR_WHO
    assert verify(BOOK, cookie, 1000.0 + SESSION_TTL_S) is None  # expired
    name, expires, nonce, signature = cookie.split(".")
    forged = [
        f"viewer.{expires}.{nonce}.{signature}",  # another principal
        f"{name}.{int(expires) + 3600}.{nonce}.{signature}",  # a longer life
        f"{name}.{expires}.{nonce}.{signature[:-2]}AA",
        f"{name}.{expires}.{nonce}",
        "",
        "x" * 1000,
        None,
    ]
    for value in forged:
        assert verify(BOOK, value, 1001.0) is None, value
    renewed = TokenBook({VIEWER: VIEWER_WHO, "n" * 32: OPERATOR_WHO})  # the token was replaced
    assert verify(renewed, cookie, 1001.0) is None
    assert issue(BOOK, OPERATOR_WHO, 1000.0) != cookie  # a nonce each
    with pytest.raises(KeyError):
        issue(BOOK, Principal("nobody", Role.VIEWER), 1000.0)


def test_a_curve_is_thinned_evenly_keeps_its_latest_sample_and_continues_after_a_restart() -> None:
    curves = MoveCurves(max_jobs=2, max_points=50)
    for n in range(1000):
        curves.add(1, "vm-1", _stats(n * 10, n * 1000, 10**6 - n * 1000))
    curves.add(1, "vm-1", _stats(5, 1, 2))  # QEMU's counters restart (RAM after the disk)
    [move] = curves.curves(1)
    points = move["points"]
    assert isinstance(points, list)
    assert len(points) <= 51
    assert points[0] == [0, 0, 10**6]
    assert points[-1] == [9990 + 5, 1, 2]
    times = [p[0] for p in points]
    assert times == sorted(times)
    gaps = {b - a for a, b in pairwise(times[:-1])}
    assert len(gaps) <= 2, gaps  # even, but for the latest stretch
    validate({"job": 1, "moves": curves.curves(1)}, CURVES_SCHEMA)
    curves.add(2, "vm-2", _stats(0, 0, 1))
    curves.add(3, "vm-3", _stats(0, 0, 1))
    assert curves.curves(1) == []  # only the last 2 jobs are kept


def test_the_dashboard_files_are_installed_and_import_only_each_other() -> None:
    assets = load_assets()
    assert {"index.html", "app.js", "style.css"} <= set(assets)
    for name, asset in assets.items():
        text = asset.body.decode()
        if name.endswith(".js"):
            assert asset.content_type == "text/javascript"
            for imported in re.findall(r'from "\./([a-z0-9_-]+\.js)"', text):
                assert imported in assets, f"{name} imports {imported}"
            assert ".innerHTML" not in text, name  # values go in as text, never as markup
            remote = re.findall(r"https?://[^\s\"']+", text)
            assert set(remote) <= {"http://www.w3.org/2000/svg"}, name  # nothing downloaded
    index = assets["index.html"].body.decode()
    for src in re.findall(r'(?:src|href)="/dashboard/([^"]+)"', index):
        assert src in assets


# -- the application ----------------------------------------------------------------------------


@pytest_asyncio.fixture
async def service(tmp_path: Path) -> AsyncIterator[tuple[TestClient, ServiceState]]:  # type: ignore[type-arg]
    Inventory(tmp_path, "t" * 32, ()).save()
    store, bus, metrics = SqliteStore(tmp_path / "history.db"), EventBus(), ServiceMetrics()
    async with asyncio.TaskGroup() as group:
        supervisor = Supervisor(store, bus, metrics, group)
        state = ServiceState(BOOK, store, bus, metrics, supervisor, tmp_path, keepalive_s=0.2)
        async with TestClient(TestServer(build_app(state))) as client:
            yield client, state
        state.closing.set()
        bus.wake_all()
        await supervisor.shutdown(1.0)


@pytest.mark.asyncio
async def test_the_page_and_its_files_need_no_token_and_nothing_else_is_opened(service) -> None:  # type: ignore[no-untyped-def]
    client, _ = service
    page = await client.get("/")
    assert page.status == 200
    assert page.content_type == "text/html"
    policy = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy
    assert "frame-ancestors 'none'" in policy
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    assert 'id="login-form"' in await page.text()
    script = await client.get("/dashboard/app.js")
    assert (script.status, script.content_type) == (200, "text/javascript")
    assert (await client.get("/dashboard/missing.js")).status == 404
    for path in ("/dashboard/%2e%2e/auth.py", "/dashboard/", "/index.html", "/api/v1/whoami"):
        assert (await client.get(path)).status in (401, 404), path
    assert (await client.post("/")).status == 401  # only GET is public


@pytest.mark.asyncio
async def test_a_token_is_exchanged_for_a_cookie_that_the_api_accepts(service) -> None:  # type: ignore[no-untyped-def]
    client, _ = service
    assert (await client.post("/api/v1/session")).status == 401
    login = await client.post("/api/v1/session", headers=AS_OPERATOR)
    assert login.status == 200
    assert await login.json() == {"name": "operator", "role": "operator"}
    morsel = login.cookies[COOKIE_NAME]
    client.session.cookie_jar.clear()  # each request below names its own cookie
    assert (morsel["httponly"], morsel["samesite"], morsel["path"]) == (True, "Strict", "/")
    assert int(morsel["max-age"]) == SESSION_TTL_S
    cookie = {"Cookie": f"{COOKIE_NAME}={morsel.value}"}
    assert await (await client.get("/api/v1/whoami", headers=cookie)).json() == {
        "name": "operator",
        "role": "operator",
    }
    body = {"vm": "vm-1", "to": "host-9", "strategy": "precopy", "plan": False}
    refused = await client.post("/api/v1/migrations", json=body, headers=cookie)
    assert refused.status == 401  # the cookie alone, without the page's CSRF header
    csrf = {**cookie, CSRF_HEADER: "1"}
    assert (await client.post("/api/v1/migrations", json=body, headers=csrf)).status == 202
    viewer = issue(BOOK, VIEWER_WHO, time.time())
    as_viewer = {"Cookie": f"{COOKIE_NAME}={viewer}", CSRF_HEADER: "1"}
    assert (await client.post("/api/v1/migrations", json=body, headers=as_viewer)).status == 403
    tampered = {"Cookie": f"{COOKIE_NAME}={morsel.value[:-1]}x"}
    assert (await client.get("/api/v1/hosts", headers=tampered)).status == 401
    # A bearer header decides alone: a bad one is not rescued by a good cookie.
    both = {**cookie, "Authorization": "Bearer " + "x" * 32}
    assert (await client.get("/api/v1/whoami", headers=both)).status == 401
    logout = await client.delete("/api/v1/session", headers=csrf)
    assert logout.status == 200
    assert logout.cookies[COOKIE_NAME].value == ""
    assert int(logout.cookies[COOKIE_NAME]["max-age"]) == 0


@pytest.mark.asyncio
async def test_a_moves_samples_carry_its_eta_and_make_its_curve(service) -> None:  # type: ignore[no-untyped-def]
    client, state = service
    release = asyncio.Event()

    async def move(ctx: JobContext) -> Outcome:
        ctx.plan("vm-1", 0.0, 0, None)
        ctx.progress("vm-1", Phase.PREPARING, None)
        for n in range(20):
            ctx.progress("vm-1", Phase.ACTIVE, _stats(n * 100, n * (1 << 20), (20 - n) << 20))
        await release.wait()
        return Outcome(JobState.COMPLETED, {"ok": True})

    with state.bus.watch() as watcher:
        job = state.supervisor.submit("migrate", {}, OPERATOR_WHO, move)
        await asyncio.sleep(0)
        progress = [e.data for e in watcher.take() if e.kind == "progress"]
    assert progress[0]["eta_ms"] is None  # no sample yet
    assert progress[-1]["eta_ms"] is not None
    assert 300 <= progress[-1]["eta_ms"] <= 1000  # 1 MiB left at 10 MiB/s, then the tail
    answer = await client.get(f"/api/v1/jobs/{job.id}/curve", headers=AS_OPERATOR)
    curve = await answer.json()
    validate(curve, CURVES_SCHEMA)
    [points] = [m["points"] for m in curve["moves"] if m["vm"] == "vm-1"]
    assert points[-1] == [1900, 19 << 20, 1 << 20]
    release.set()
    assert (await client.get("/api/v1/jobs/99/curve", headers=AS_OPERATOR)).status == 404
