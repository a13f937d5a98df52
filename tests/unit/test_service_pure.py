"""The controller service's pure parts: schema validation (and its agreement with the reference
JSON Schema validator), body models, auth decisions over the whole route table, the OpenAPI
document, the event bus's drop-oldest queues and SSE framing, and metric names."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openapi_spec_validator import validate as validate_openapi

from vmferry.core.errors import ConfigError
from vmferry.core.model import IntegrityReport, MigrationReport, Prediction
from vmferry.service import api
from vmferry.service import schema as s
from vmferry.service.auth import (
    Principal,
    Role,
    TokenBook,
    decide,
    load_or_create_tokens,
    role_for_method,
)
from vmferry.service.client import SseParser
from vmferry.service.events import Event, EventBus, sse_comment, sse_frame
from vmferry.service.metrics import ServiceMetrics
from vmferry.service.openapi import openapi_document
from vmferry.service.routes import ROUTES, SESSION_OPERATIONS

VIEWER = Principal("viewer", Role.VIEWER)
OPERATOR = Principal("operator", Role.OPERATOR)

# -- schema validation -------------------------------------------------------------------------

BAD_MIGRATIONS: list[tuple[object, str]] = [
    ([], "$: must be an object"),
    ({"to": "host-2"}, "$.vm: is required"),
    ({"vm": "a", "to": "host-2", "extra": 1}, "$: unknown field(s): extra"),
    ({"vm": 3, "to": "host-2"}, "$.vm: must be a string"),
    ({"vm": "../etc", "to": "host-2"}, "$.vm: must match"),
    ({"vm": "a" * 64, "to": "host-2"}, "$.vm: must be at most 63 characters"),
    ({"vm": "a", "to": "b", "strategy": "warp"}, "$.strategy: must be one of auto"),
    ({"vm": "a", "to": "b", "max_downtime_ms": 0}, "$.max_downtime_ms: must be >= 1"),
    ({"vm": "a", "to": "b", "max_downtime_ms": True}, "$.max_downtime_ms: must be an integer"),
    ({"vm": "a", "to": "b", "max_downtime_ms": 1.5}, "$.max_downtime_ms: must be an integer"),
    ({"vm": "a", "to": "b", "deadline_s": "soon"}, "$.deadline_s: must be a number or null"),
    ({"vm": "a", "to": "b", "bandwidth_mbps": 10**7}, "$.bandwidth_mbps: must be <= 1000000"),
    ({"vm": "a", "to": "b", "force": "yes"}, "$.force: must be a boolean"),
]


@pytest.mark.parametrize(("body", "message"), BAD_MIGRATIONS)
def test_bad_migration_bodies_are_refused_naming_the_field(body: object, message: str) -> None:
    with pytest.raises(s.SchemaError) as caught:
        api.MigrateBody.from_json(body)
    assert message in str(caught.value)
    assert isinstance(caught.value, ConfigError)  # a refusal: the API answers 400


def test_evacuation_body_checks_its_list() -> None:
    with pytest.raises(s.SchemaError, match=r"\$\.to\[1\]: must match"):
        api.EvacuateBody.from_json({"host": "host-1", "to": ["host-2", "bad/name"]})
    with pytest.raises(s.SchemaError, match=r"\$\.to: must have at least 1 items"):
        api.EvacuateBody.from_json({"host": "host-1", "to": []})


@pytest.mark.parametrize(
    "body",
    [
        api.MigrateBody("web-1", "host-2"),
        api.MigrateBody("a", "b", "postcopy", 50, 12.5, 100, True, False, False, 30.0, True, "off"),
        api.EvacuateBody("host-1", ["host-2", "host-3"], 60.0, 200, 100, 2, 1, True),
        api.BalanceBody(3, 0.0, 500, None, 1, 1, True),
        api.ReconcileBody(12.0),
    ],
)
def test_bodies_round_trip(body: api.Body) -> None:
    assert type(body).from_json(body.to_json()) == body


def test_defaults_fill_what_a_body_leaves_out() -> None:
    body = api.MigrateBody.from_json({"vm": "a", "to": "b"})
    assert (body.strategy, body.max_downtime_ms, body.verify, body.plan) == (
        "auto",
        300,
        "sample",
        True,
    )
    assert api.BalanceBody.from_json({}) == api.BalanceBody()


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**7), 10**7) | st.floats(allow_nan=False)
    | st.text(max_size=70),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=20), inner, max_size=4),
    max_leaves=12,
)  # fmt: skip
_FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "vm": st.sampled_from(["a", "web-1", "", "x" * 64, "../x", 5]),
        "to": st.sampled_from(["host-2", None, 1.5]),
        "strategy": st.sampled_from(["auto", "precopy", "nope", None]),
        "max_downtime_ms": st.sampled_from([0, 1, 300, 600_000, 600_001, True, 2.5]),
        "deadline_s": st.sampled_from([None, 0, 0.5, 86_400, 86_401, "1"]),
        "bandwidth_mbps": st.sampled_from([None, 1, 0, 10**6, 10**6 + 1]),
        "verify": st.sampled_from(["full", "off", "FULL"]),
        "tls": st.sampled_from([True, 0]),
    },
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(_JSON, _FIELDS))
def test_our_validator_agrees_with_the_reference_validator(data: Any) -> None:
    """What the server accepts is exactly what the published schema allows."""
    reference = jsonschema.Draft202012Validator(dict(api.MigrateBody.SCHEMA))
    try:
        s.validate(data, api.MigrateBody.SCHEMA)
        ours = True
    except s.SchemaError:
        ours = False
    assert ours == reference.is_valid(data), data


# -- auth --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("who", "needed", "status"),
    [
        (None, Role.VIEWER, 401),
        (None, Role.OPERATOR, 401),
        (VIEWER, Role.VIEWER, 0),
        (VIEWER, Role.OPERATOR, 403),
        (OPERATOR, Role.VIEWER, 0),
        (OPERATOR, Role.OPERATOR, 0),
    ],
)
def test_decisions(who: Principal | None, needed: Role, status: int) -> None:
    assert decide(who, needed).status == status


def test_a_viewer_is_refused_every_operator_route_and_allowed_every_other() -> None:
    operator_routes = [r for r in ROUTES if r.role is Role.OPERATOR]
    assert {r.operation for r in operator_routes} >= {
        "migrate",
        "evacuate",
        "balance",
        "cancel_job",
    }
    for route in ROUTES:
        expected = 403 if route.role is Role.OPERATOR else 0
        assert decide(VIEWER, route.role).status == expected, route.operation
        assert decide(OPERATOR, route.role).allowed
        assert decide(None, route.role).status == 401
        if route.method != "GET" and route.operation not in SESSION_OPERATIONS:
            assert route.role is Role.OPERATOR, f"{route.operation} changes things"


def test_unknown_paths_need_a_token_and_writes_an_operator() -> None:
    assert role_for_method("GET") is Role.VIEWER
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        assert role_for_method(method) is Role.OPERATOR
        assert decide(VIEWER, role_for_method(method)).status == 403


def test_token_lookup() -> None:
    book = TokenBook({"v" * 24: VIEWER, "o" * 24: OPERATOR})
    assert book.lookup("Bearer " + "v" * 24) == VIEWER
    assert book.lookup("Bearer " + "o" * 24) == OPERATOR
    for bad in (None, "", "Bearer", "Bearer " + "v" * 23, "Basic " + "v" * 24, "v" * 24):
        assert book.lookup(bad) is None
    with pytest.raises(ConfigError, match="at least 24"):
        TokenBook({"short": VIEWER})


def test_token_files_are_made_once_0600_and_refused_when_others_can_read(tmp_path: Path) -> None:
    book, files = load_or_create_tokens(tmp_path / "tokens")
    assert set(files) == set(Role)
    for role, path in files.items():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert book.lookup(f"Bearer {path.read_text().strip()}") == Principal(str(role), role)
    assert stat.S_IMODE((tmp_path / "tokens").stat().st_mode) == 0o700
    again, _ = load_or_create_tokens(tmp_path / "tokens")  # the same tokens on a restart
    token = files[Role.VIEWER].read_text().strip()
    assert again.lookup(f"Bearer {token}") == VIEWER
    os.chmod(files[Role.VIEWER], 0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        load_or_create_tokens(tmp_path / "tokens")


# -- OpenAPI -----------------------------------------------------------------------------------


def test_the_openapi_document_is_valid_and_covers_every_route() -> None:
    document = openapi_document("https://127.0.0.1:7780")
    validate_openapi(document)
    operations = {
        op["operationId"]: (method.upper(), path, op)
        for path, item in document["paths"].items()
        for method, op in item.items()
    }
    assert set(operations) == {r.operation for r in ROUTES}
    for route in ROUTES:
        method, path, op = operations[route.operation]
        assert (method, path) == (route.method, route.path)
        assert op["x-vmferry-role"] == route.role
        assert "401" in op["responses"]
        assert ("403" in op["responses"]) == (route.role is Role.OPERATOR)
        if route.body is not None:
            ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
            assert document["components"]["schemas"][ref.rsplit("/", 1)[1]] == route.body.SCHEMA
            assert {"400", "413"} <= set(op["responses"])


# -- events ------------------------------------------------------------------------------------


def test_a_slow_watcher_loses_its_oldest_events_counted() -> None:
    bus = EventBus(max_queue=3)
    with bus.watch() as slow, bus.watch(job=2) as one_job:
        for n in range(5):
            bus.publish("progress", {"job": 1, "n": n})
        bus.publish("job", {"id": 2, "state": "completed"})
        taken = slow.take()
        assert [e.kind for e in taken] == ["dropped", "progress", "progress", "job"]
        assert taken[0].data == {"count": 3}
        assert [e.data.get("n") for e in taken[1:3]] == [3, 4]
        assert [e.data for e in one_job.take()] == [{"id": 2, "state": "completed"}]
        assert slow.take() == []  # nothing new, and the loss was reported once
        assert bus.dropped_total == 3
    assert bus.watchers == 0


def test_sse_frames_parse_back() -> None:
    parser = SseParser()
    event = Event(7, "progress", {"job": 1, "vm": "a", "phase": "active", "stats": None})
    text = (sse_comment("keepalive") + sse_frame(event)).decode()
    parsed = [e for line in text.splitlines(keepends=True) if (e := parser.feed(line))]
    assert parsed == [event]


# -- metrics -----------------------------------------------------------------------------------


def _report(ok: bool = True) -> MigrationReport:
    return MigrationReport(
        vm="a", source="host-1", destination="host-2", running_on="host-2", strategy="precopy",
        status="completed", error=None, total_ms=2000, downtime_ms=20, guest_downtime_ms=110,
        transferred_bytes=300 << 20, iterations=3,
        predicted=Prediction(total_ms=1000, downtime_ms=10, transferred_bytes=300 << 20,
                             guest_downtime_ms=100),
        integrity=IntegrityReport(ok, 1000, 0 if ok else 5), guest_alive=True, recoveries=1,
    )  # fmt: skip


def test_metrics_follow_prometheus_conventions_and_count_reports() -> None:
    metrics = ServiceMetrics()
    metrics.observe_report(_report())
    metrics.observe_report(_report(ok=False))
    metrics.set_jobs({("migrate", "completed"): 2})
    text = metrics.render().decode()
    assert 'vmferry_migrations_total{result="completed",strategy="precopy"} 1.0' in text
    assert 'vmferry_migrations_total{result="unverified",strategy="precopy"} 1.0' in text
    assert 'vmferry_migration_duration_seconds_sum{strategy="precopy"} 4.0' in text
    assert 'vmferry_migration_guest_downtime_seconds_count{strategy="precopy"} 2.0' in text
    # (actual 2 s - predicted 1 s) / 1 s = 1.0, twice (no _sum: a ratio may be negative)
    assert (
        'vmferry_migration_prediction_error_ratio_bucket{le="1.0",quantity="total_time"} 2.0'
        in text
    )
    assert "vmferry_postcopy_recoveries_total 2.0" in text
    assert 'vmferry_jobs{kind="migrate",state="completed"} 2.0' in text
    assert "_created" not in text
    names = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    for name in names:
        assert name.startswith("vmferry_"), name
    histograms = [ln.split()[2] for ln in text.splitlines() if ln.endswith(" histogram")]
    for name in histograms:
        assert name.endswith(("_seconds", "_bytes", "_ratio")), name
