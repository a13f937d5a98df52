"""Fuzz ``vmferry serve``'s API from its own OpenAPI 3.1 document with schemathesis.

The target (:mod:`service_harness`) is a real service on a real port over a lab of two real
host agents with no VM and boot files that do not exist: every request that looks valid names
an unknown VM, or moves nothing, so fuzzing reaches the handlers, the jobs and the agents
without ever starting a migration or a guest, and everything lives in a temporary directory.

Properties, on every documented operation but the event stream (an endless response; its bad
input is in tests/unit/test_service_app.py), with valid and schema-violating requests:
no 5xx; every status is documented and every body matches its documented schema and media
type; a request that violates the schema is refused with a 4xx; every error is a JSON
``{"error": {"code", "message"}}``; no VM ever appears. Then, over every route of the table
(so a new route is covered without a change here): no token or a wrong one is a 401; a viewer
is refused every operator route, valid bodies included, with nothing changed; a body over the
limit is a 413, announced or chunked. Last, the host jobs with no guest to move: a host into
maintenance and out, and an interrupted job resumed.

aiohttp is neither ASGI nor WSGI, so schemathesis calls the service over HTTP (``requests``) on
the port the harness's thread serves; it reads OpenAPI 3.1 as it is. Deterministic
(``derandomize``, no example database), about 15 s: few examples per operation, many operations.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from service_harness import OPERATOR, VIEWER, FuzzService, fuzz_service

from vmferry.service.api import MAX_BODY_BYTES, ErrorCode
from vmferry.service.auth import Role
from vmferry.service.openapi import openapi_document
from vmferry.service.routes import ROUTES

# What a refused request may answer (413: a generated body over the size limit).
REFUSALS = ["400", "401", "403", "404", "405", "409", "413", "415"]
API_PATHS = r"^/(api/|metrics$|openapi\.json$)"  # pages other than the API's are not fuzzed
OPERATOR_ROUTES = [r.operation for r in ROUTES if r.role is Role.OPERATOR]

SCHEMA = (
    schemathesis.openapi.from_dict(openapi_document())
    .include(path_regex=API_PATHS)
    .exclude(operation_id="events")
)
SCHEMA.config.checks.negative_data_rejection.expected_statuses = REFUSALS


@schemathesis.hook  # before_call has a global scope only (it sees this module's schemas alone)
def before_call(
    context: schemathesis.HookContext, case: schemathesis.Case[Any], kwargs: Any
) -> None:
    """A VM created would boot (its boot files are missing here: a failed VM the agent keeps):
    creations are fuzzed as dry runs, placement and all, booting nothing."""
    if case.operation.label == "POST /api/v1/vms" and isinstance(case.body, dict):
        case.body["dry_run"] = True


AS_VIEWER = schemathesis.openapi.from_dict(openapi_document()).include(operation_id=OPERATOR_ROUTES)
AS_VIEWER.config.generation.modes = [GenerationMode.POSITIVE]

# VMFERRY_FUZZ_EXAMPLES=N: a longer run, on random examples (not the suite's fixed ones).
_EXAMPLES = os.environ.get("VMFERRY_FUZZ_EXAMPLES")
_FUZZ = settings(
    max_examples=12 if _EXAMPLES is None else int(_EXAMPLES),
    deadline=None,
    derandomize=_EXAMPLES is None,
    database=None,
    suppress_health_check=list(HealthCheck),
)


def _bearer(case: schemathesis.Case[Any], token: str) -> None:
    case.headers["Authorization"] = f"Bearer {token}"


# Each schema's token, on every case but those that test a missing one.
@SCHEMA.auth()
class _AsOperator:
    def get(self, case: schemathesis.Case[Any], ctx: Any) -> str:
        return OPERATOR

    def set(self, case: schemathesis.Case[Any], data: str, ctx: Any) -> None:
        _bearer(case, data)


@AS_VIEWER.auth()
class _AsViewer:
    def get(self, case: schemathesis.Case[Any], ctx: Any) -> str:
        return VIEWER

    def set(self, case: schemathesis.Case[Any], data: str, ctx: Any) -> None:
        _bearer(case, data)


def error_is_json(ctx: Any, response: schemathesis.Response, case: schemathesis.Case[Any]) -> bool:
    """Every error is ``{"error": {"code", "message"}}`` with a known code."""
    if response.status_code < 400:
        return True
    error = response.json()["error"]
    assert error["code"] in {str(c) for c in ErrorCode}, error
    assert isinstance(error["message"], str), error
    assert error["message"], error
    assert "Traceback" not in error["message"], error
    return True


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
    error_is_json,
]


@pytest.fixture(scope="module")
def service() -> Iterator[FuzzService]:
    with fuzz_service() as running:
        yield running


@SCHEMA.parametrize()
@_FUZZ
def test_the_api_answers_as_its_document_says(
    case: schemathesis.Case[Any], service: FuzzService
) -> None:
    case.call_and_validate(base_url=service.url, checks=CHECKS)
    assert service.vm_names() == []


@AS_VIEWER.parametrize()
@settings(_FUZZ, max_examples=4)
def test_a_viewer_is_refused_every_operator_route_with_nothing_changed(
    case: schemathesis.Case[Any], service: FuzzService
) -> None:
    before = service.snapshot()
    response = case.call(base_url=service.url)
    assert response.status_code == 403, response.text
    assert response.json()["error"]["code"] == "forbidden"
    assert service.snapshot() == before


def _url(service: FuzzService, template: str) -> str:
    return service.url + template.replace("{id}", "1").replace("{name}", "vm-1")


def test_every_route_wants_a_known_token(service: FuzzService) -> None:
    wrong = [None, "Bearer", "Bearer ", f"Bearer {VIEWER}x", f"Basic {VIEWER}", VIEWER,
             f"Bearer {OPERATOR[:-1]}"]  # fmt: skip
    before = service.snapshot()
    for route in ROUTES:
        for header in wrong:
            headers = {} if header is None else {"Authorization": header}
            response = requests.request(
                route.method, _url(service, route.path), headers=headers, json={}, timeout=10
            )
            assert response.status_code == 401, (route.operation, header, response.text)
            assert response.json()["error"]["code"] == "unauthorized"
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert service.snapshot() == before
    assert [r.operation for r in ROUTES if r.role is Role.OPERATOR] == OPERATOR_ROUTES
    assert len(OPERATOR_ROUTES) >= 8  # every route that changes something is an operator's


def _chunks(size: int) -> Iterator[bytes]:
    yield b'{"pad": "'
    for _ in range(size // 1024):
        yield b"x" * 1024
    yield b'"}'


@pytest.mark.parametrize("chunked", [False, True], ids=["announced", "chunked"])
def test_a_body_over_the_limit_is_413(service: FuzzService, chunked: bool) -> None:
    headers = {"Authorization": f"Bearer {OPERATOR}", "Content-Type": "application/json"}
    before = service.snapshot()
    for route in (r for r in ROUTES if r.body is not None):
        data = _chunks(MAX_BODY_BYTES + 1024) if chunked else b"x" * (MAX_BODY_BYTES + 1)
        response = requests.request(
            route.method, _url(service, route.path), headers=headers, data=data, timeout=10
        )
        assert response.status_code == 413, (route.operation, response.text)
        assert response.json()["error"]["code"] == "too_large"
    assert service.snapshot() == before


def _job(
    service: FuzzService, body: dict[str, Any], path: str = "/api/v1/maintenance"
) -> dict[str, Any]:
    """``POST path`` with ``body``; the job's record once it ended."""
    headers = {"Authorization": f"Bearer {OPERATOR}"}
    answer = requests.post(f"{service.url}{path}", json=body, headers=headers, timeout=10)
    assert answer.status_code == 202, answer.text
    deadline = time.monotonic() + 30
    while True:
        record: dict[str, Any] = requests.get(
            f"{service.url}/api/v1/jobs/{answer.json()['id']}", headers=headers, timeout=10
        ).json()
        if record["state"] != "running":
            return record
        assert time.monotonic() < deadline, record
        time.sleep(0.05)


def test_a_host_goes_into_maintenance_and_out_through_the_api(service: FuzzService) -> None:
    headers = {"Authorization": f"Bearer {VIEWER}"}
    marks = service.state.store.job_store().marks()
    if "host-2" in marks:  # the fuzzing before put it there
        assert _job(service, {"host": "host-2", "action": "exit"})["state"] == "completed"
    entered = _job(service, {"host": "host-2", "action": "enter"})
    assert entered["state"] == "completed", entered
    assert (entered["result"]["host_state"], entered["result"]["left_on_host"]) == (
        "maintenance",
        [],
    )
    hosts = requests.get(f"{service.url}/api/v1/hosts", headers=headers, timeout=10).json()
    assert {h["host"]: h["state"] for h in hosts}["host-2"] == "maintenance"
    exited = _job(service, {"host": "host-2", "action": "exit", "bring_back": True})
    assert exited["state"] == "completed", exited
    assert (exited["result"]["host_state"], exited["result"]["moves"]) == ("active", [])
    again = _job(service, {"host": "host-2", "action": "exit"})
    assert again["state"] == "refused"
    assert "not in maintenance" in again["error"]["message"]
    unknown = requests.post(f"{service.url}/api/v1/maintenance", timeout=10,
                            json={"host": "host-9", "action": "enter"},
                            headers={"Authorization": f"Bearer {OPERATOR}"})  # fmt: skip
    assert unknown.status_code == 400
    assert "unknown host 'host-9'" in unknown.json()["error"]["message"]
    resume = requests.post(f"{service.url}/api/v1/controller-jobs/999/resume", json={},
                           headers={"Authorization": f"Bearer {OPERATOR}"}, timeout=10)  # fmt: skip
    assert resume.status_code == 404, resume.text


def test_an_interrupted_job_is_resumed_through_the_api(service: FuzzService) -> None:
    store = service.state.store.job_store()
    job = store.begin("evacuate", "host-1", [], {})
    store.end(job, "interrupted", {"error": "its controller died"})
    as_viewer = {"Authorization": f"Bearer {VIEWER}"}
    url = f"{service.url}/api/v1/controller-jobs"
    listed = requests.get(url, params={"state": "interrupted"}, headers=as_viewer, timeout=10)
    assert job in [j["job"] for j in listed.json()]
    refused = requests.post(f"{url}/{job}/resume", json={}, headers=as_viewer, timeout=10)
    assert refused.status_code == 403
    resumed = _job(service, {"wait_s": 5}, f"/api/v1/controller-jobs/{job}/resume")
    assert (resumed["state"], resumed["kind"], resumed["controller_job"]) == (
        "completed", "resume", job
    )  # fmt: skip
    assert (resumed["result"]["resumed"], resumed["result"]["state"]) == (True, "completed")
    shown = requests.get(f"{url}/{job}", headers=as_viewer, timeout=10).json()
    assert (shown["state"], shown["report"]["resumed"]) == ("completed", True)
    again = requests.post(f"{url}/{job}/resume", json={}, timeout=10,
                          headers={"Authorization": f"Bearer {OPERATOR}"})  # fmt: skip
    assert again.status_code == 409
    assert "only an interrupted job is resumed" in again.json()["error"]["message"]
