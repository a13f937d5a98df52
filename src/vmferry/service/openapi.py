"""The OpenAPI 3.1 document of the service, generated from the route table and the models'
schemas (nothing is written by hand, so it cannot drift from what the server checks).

Each operation names the role it needs (``x-vmferry-role``), its parameters and body with the
schemas the server validates against, and every error it can answer with: 400 (bad body or
query), 401 (no or an unknown token), 403 (operator routes, for a viewer), 404 (unknown id or
name), 413 (body too large), all as ``Error``.
"""

from __future__ import annotations

from typing import Any

from vmferry import __version__
from vmferry.service import api
from vmferry.service.auth import Role
from vmferry.service.routes import ROUTES, Route
from vmferry.service.session import COOKIE_NAME, CSRF_HEADER

__all__ = ["openapi_document"]

_SECURITY: list[dict[str, list[str]]] = [{"bearer": []}, {"session": []}]
_ERROR_REF = {"$ref": "#/components/schemas/Error"}
_ERRORS = {
    400: "Bad body or query (the message names the field)",
    401: "Missing or unknown bearer token",
    403: "The token's role may not use this route",
    404: "No such job, VM or route",
    413: "Request body too large",
    415: "The body is not JSON",
}


def _error(status: int) -> dict[str, Any]:
    return {
        "description": _ERRORS[status],
        "content": {"application/json": {"schema": _ERROR_REF}},
    }


def _success(route: Route) -> dict[str, Any]:
    if route.response is None:
        content: dict[str, Any] = {route.media: {"schema": {"type": "string"}}}
    else:
        content = {route.media: {"schema": _ref_or_inline(route.response)}}
    return {"description": route.summary, "content": content}


def _ref_or_inline(schema: Any) -> dict[str, Any]:
    if schema is api.JOB_SCHEMA:
        return {"$ref": "#/components/schemas/Job"}
    return dict(schema)


def _operation(route: Route) -> dict[str, Any]:
    responses: dict[str, Any] = {str(route.status): _success(route)}
    codes = [401]
    if route.body is not None or any(p.where == "query" for p in route.params) or route.params:
        codes.append(400)
    if route.role is Role.OPERATOR:
        codes.append(403)
    if any(p.where == "path" for p in route.params):
        codes.append(404)
    if route.body is not None:
        codes += [413, 415]
    for code in sorted(codes):
        responses[str(code)] = _error(code)
    responses["default"] = {
        "description": "Another error: 409 conflict, 500 internal, 503 an agent did not answer",
        "content": {"application/json": {"schema": _ERROR_REF}},
    }
    operation: dict[str, Any] = {
        "operationId": route.operation,
        "summary": route.summary,
        "x-vmferry-role": str(route.role),
        "security": _SECURITY,
        "responses": responses,
    }
    if route.params:
        operation["parameters"] = [
            {
                "name": p.name,
                "in": p.where,
                "required": p.required or p.where == "path",
                "description": p.description,
                "schema": dict(p.schema),
            }
            for p in route.params
        ]
    if route.body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{route.body.NAME}"}}
            },
        }
    return operation


def openapi_document(server_url: str | None = None) -> dict[str, Any]:
    """The document (``server_url``: where this service answers, if known)."""
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route)
    schemas: dict[str, Any] = {body.NAME: dict(body.SCHEMA) for body in api.BODIES}
    schemas["Error"] = dict(api.ERROR_SCHEMA)
    schemas["Job"] = dict(api.JOB_SCHEMA)
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "vmferry controller",
            "version": __version__,
            "description": "Live migration of QEMU VMs: the controller as a service. Viewer "
            "tokens read (GET, events, metrics); operator tokens also start and cancel jobs.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "session": {
                    "type": "apiKey",
                    "in": "cookie",
                    "name": COOKIE_NAME,
                    "description": "The dashboard's browser session (POST /api/v1/session); "
                    f"a request that changes something also sends {CSRF_HEADER}: 1",
                },
            },
        },
        "security": _SECURITY,
    }
    if server_url is not None:
        document["servers"] = [{"url": server_url}]
    return document
