"""The controller service's HTTP application against a lab with no hosts (no agent, no QEMU):
authorization on every route and on unknown paths, bad input answered 4xx with a JSON error,
a job recorded and streamed to its end, the OpenAPI document and the metrics served; and the
supervisor's cancel, shutdown and crash paths with scripted work."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer
from openapi_spec_validator import validate as validate_openapi

from vmferry.controller.inventory import Inventory
from vmferry.core.errors import FerryError
from vmferry.service.api import JobState
from vmferry.service.app import ServiceState, build_app
from vmferry.service.auth import Principal, Role, TokenBook
from vmferry.service.client import SseParser
from vmferry.service.events import EventBus
from vmferry.service.metrics import ServiceMetrics
from vmferry.service.routes import ROUTES
from vmferry.service.store import SqliteStore
from vmferry.service.supervisor import JobContext, Outcome, Supervisor

VIEWER, OPERATOR = "v" * 32, "o" * 32
AS_VIEWER = {"Authorization": f"Bearer {VIEWER}"}
AS_OPERATOR = {"Authorization": f"Bearer {OPERATOR}"}
WHO = Principal("operator", Role.OPERATOR)


@pytest_asyncio.fixture
async def service(tmp_path: Path) -> AsyncIterator[tuple[TestClient, ServiceState]]:  # type: ignore[type-arg]
    Inventory(tmp_path, "t" * 32, ()).save()
    tokens = TokenBook(
        {VIEWER: Principal("viewer", Role.VIEWER), OPERATOR: Principal("operator", Role.OPERATOR)}
    )
    store, bus, metrics = SqliteStore(tmp_path / "history.db"), EventBus(), ServiceMetrics()
    async with asyncio.TaskGroup() as group:
        supervisor = Supervisor(store, bus, metrics, group)
        state = ServiceState(tokens, store, bus, metrics, supervisor, tmp_path, keepalive_s=0.2)
        async with TestClient(TestServer(build_app(state))) as client:
            yield client, state
        state.closing.set()
        bus.wake_all()
        await supervisor.shutdown(1.0)


def _path(template: str) -> str:
    return template.replace("{id}", "1").replace("{name}", "vm-1")


@pytest.mark.asyncio
async def test_every_route_and_unknown_paths_need_a_token_and_the_right_role(service) -> None:  # type: ignore[no-untyped-def]
    client, _ = service
    for route in ROUTES:
        path = _path(route.path)
        answer = await client.request(route.method, path)
        assert answer.status == 401, route.operation
        assert (await answer.json())["error"]["code"] == "unauthorized"
        assert answer.headers["WWW-Authenticate"].startswith("Bearer")
        wrong = await client.request(route.method, path, headers={"Authorization": "Bearer x" * 4})
        assert wrong.status == 401
        if route.role is Role.OPERATOR:
            refused = await client.request(route.method, path, headers=AS_VIEWER, json={})
            assert refused.status == 403, route.operation
            assert (await refused.json())["error"]["code"] == "forbidden"
    for method in ("GET", "POST", "DELETE"):
        assert (await client.request(method, "/admin")).status == 401
    assert (await client.get("/admin", headers=AS_VIEWER)).status == 404
    assert (await client.post("/admin", headers=AS_VIEWER)).status == 403
    assert (await client.post("/admin", headers=AS_OPERATOR)).status == 404
    answer = await client.delete("/api/v1/hosts", headers=AS_OPERATOR)
    assert answer.status == 405
    assert (await answer.json())["error"]["code"] == "method_not_allowed"


@pytest.mark.asyncio
async def test_bad_input_is_a_4xx_with_a_json_error(service) -> None:  # type: ignore[no-untyped-def]
    client, state = service
    url = "/api/v1/migrations"
    as_json = {**AS_OPERATOR, "Content-Type": "application/json"}
    as_text = {**AS_OPERATOR, "Content-Type": "text/plain"}
    cases = [
        (dict(data="{not json", headers=as_json), 400, "not valid JSON"),
        (dict(data="vm=a", headers=as_text), 415, "application/json"),
        (dict(json={"vm": "a", "to": "b", "pad": "x" * 20_000}, headers=AS_OPERATOR), 413, ""),
        (dict(json={"vm": "a"}, headers=AS_OPERATOR), 400, "$.to: is required"),
        (dict(json={"vm": "a", "to": "b", "plan": False}, headers=AS_OPERATOR), 400, "--no-plan"),
        (dict(json={"host": "h", "max_outbound": 0}, headers=AS_OPERATOR), 400, ""),
    ]  # fmt: skip
    for kwargs, status, message in cases:
        answer = await client.post(url, **kwargs)  # type: ignore[arg-type]
        body = await answer.json()
        assert answer.status == status, body
        assert message in body["error"]["message"]
    for path, message in [
        ("/api/v1/history?limit=0", "limit: must be >= 1"),
        ("/api/v1/jobs/abc", "id: must be an integer"),
        ("/api/v1/jobs?state=sleeping", "state: must be one of"),
        ("/api/v1/events?job=-1", "job: must be >= 1"),
        ("/api/v1/jobs?limt=5", "limt: unknown query parameter (this route takes: limit, state)"),
        ("/api/v1/hosts?verbose=1", "verbose: unknown query parameter (this route takes: none)"),
        ("/api/v1/vms/vm-1/plan?to=host-1&allow_postcopy=yes", "must be true or false"),
        ("/api/v1/vms/vm-1/plan?to=host-1&deadline_s=soon", "deadline_s: must be a number"),
        ("/api/v1/vms/vm-1/plan", "to: is required"),
        ("/api/v1/controller-jobs?state=sleeping", "state: must be one of"),
    ]:
        answer = await client.get(path, headers=AS_VIEWER)
        assert answer.status == 400, path
        assert message in (await answer.json())["error"]["message"]
    assert (await client.get("/api/v1/jobs/99", headers=AS_VIEWER)).status == 404
    assert state.store.jobs() == []  # nothing was recorded


@pytest.mark.asyncio
async def test_a_job_is_recorded_streamed_to_its_end_and_counted(service) -> None:  # type: ignore[no-untyped-def]
    client, _ = service
    answer = await client.post(
        "/api/v1/migrations", json={"vm": "vm-1", "to": "host-9"}, headers=AS_OPERATOR
    )
    assert answer.status == 202
    job = await answer.json()
    assert (job["state"], job["asked_by"]) == ("running", {"name": "operator", "role": "operator"})
    stream = await client.get(f"/api/v1/events?job={job['id']}", headers=AS_VIEWER)
    assert stream.headers["Content-Type"] == "text/event-stream"
    parser, kinds, final = SseParser(), [], None
    async with asyncio.timeout(10):
        async for raw in stream.content:
            event = parser.feed(raw.decode())
            if event is None:
                continue
            kinds.append(event.kind)
            if event.kind == "job" and JobState(event.data["state"]).is_final:
                final = event.data
                break
    stream.close()
    assert kinds[0] == "hello"
    assert final is not None
    assert final["state"] == "refused"
    assert "unknown host 'host-9'" in final["error"]["message"]
    shown = await (await client.get(f"/api/v1/jobs/{job['id']}", headers=AS_VIEWER)).json()
    assert shown == {**{k: v for k, v in final.items() if k != "has_result"}, "result": None}
    again = await client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=AS_OPERATOR)
    assert again.status == 409  # it ended
    metrics = await client.get("/metrics", headers=AS_VIEWER)
    text = await metrics.text()
    assert metrics.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert 'vmferry_jobs{kind="migrate",state="refused"} 1.0' in text
    assert 'vmferry_api_requests_total{method="POST",route="migrate",status="202"} 1.0' in text
    document = await (await client.get("/openapi.json", headers=AS_VIEWER)).json()
    validate_openapi(document)
    assert json.dumps(await (await client.get("/api/v1/vms", headers=AS_VIEWER)).json()) == (
        '{"vms": [], "unreachable": []}'
    )


@pytest.mark.asyncio
async def test_the_supervisor_cancels_interrupts_and_survives_a_crash(tmp_path: Path) -> None:
    store, bus, metrics = SqliteStore(tmp_path / "db"), EventBus(), ServiceMetrics()
    started = asyncio.Event()

    async def forever(ctx: JobContext) -> Outcome:
        started.set()
        await asyncio.sleep(3600)
        raise AssertionError("not reached")

    async def crash(ctx: JobContext) -> Outcome:
        raise RuntimeError("bug")

    async def failing(ctx: JobContext) -> Outcome:
        raise FerryError("agent gone")

    async def done(ctx: JobContext) -> Outcome:
        return Outcome(JobState.COMPLETED, {"ok": True})

    with bus.watch() as watcher:
        async with asyncio.TaskGroup() as group:
            supervisor = Supervisor(store, bus, metrics, group)
            cancelled = supervisor.submit("migrate", {}, WHO, forever)
            await started.wait()
            supervisor.cancel(cancelled.id)
            ids = [supervisor.submit(k, {}, WHO, w).id for k, w in
                   (("migrate", crash), ("reconcile", failing), ("balance", done))]  # fmt: skip
            started.clear()
            interrupted = supervisor.submit("evacuate", {}, WHO, forever)
            await started.wait()
            await supervisor.shutdown(grace_s=0.1)
            with pytest.raises(FerryError, match="shutting down"):
                supervisor.submit("migrate", {}, WHO, done)
    states = {j.id: (j.state, j.error) for j in store.jobs()}
    assert states[cancelled.id][0] is JobState.CANCELLED
    assert states[ids[0]] == (
        JobState.FAILED,
        {"code": "internal", "message": "internal error: bug"},
    )
    assert states[ids[1]] == (JobState.FAILED, {"code": "internal", "message": "agent gone"})
    assert states[ids[2]] == (JobState.COMPLETED, None)
    assert store.job(ids[2]).result == {"ok": True}
    assert states[interrupted.id][0] is JobState.INTERRUPTED
    ends = [
        e.data["state"] for e in watcher.take() if e.kind == "job" and e.data["state"] != "running"
    ]
    assert sorted(ends) == ["cancelled", "completed", "failed", "failed", "interrupted"]
