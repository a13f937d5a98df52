"""spike"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from service_harness import OPERATOR, FuzzService, fuzz_service

from vmferry.service.openapi import openapi_document

# What a refused request may answer (413: a generated body over the size limit).
REFUSALS = ["400", "401", "403", "404", "405", "409", "413", "415"]
SCHEMA = schemathesis.openapi.from_dict(openapi_document()).exclude(operation_id="events")
SCHEMA.config.checks.negative_data_rejection.expected_statuses = REFUSALS


@SCHEMA.auth()
class _AsOperator:
    def get(self, case, ctx):
        return OPERATOR

    def set(self, case, data, ctx):
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


@pytest.fixture(scope="module")
def service() -> Iterator[FuzzService]:
    with fuzz_service() as running:
        yield running


@SCHEMA.parametrize()
@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_api(case, service) -> None:
    case.call_and_validate(base_url=service.url, checks=CHECKS)
