"""The service's route table: every route once, with the role it needs, its body and query
models and its responses. The server binds handlers to it by ``operation``, the OpenAPI
document is generated from it (:mod:`vmferry.service.openapi`), and the authorization tests
walk it (a viewer is refused every operator route).
"""

from __future__ import annotations

from dataclasses import dataclass

from vmferry.service import api
from vmferry.service import schema as s
from vmferry.service.auth import Role
from vmferry.service.curves import CURVES_SCHEMA

__all__ = ["ROUTES", "SESSION_OPERATIONS", "Param", "Route", "route_for"]


@dataclass(frozen=True, slots=True)
class Param:
    """A query or path parameter."""

    name: str
    schema: s.Schema
    description: str
    where: str = "query"  # or "path"
    required: bool = False


@dataclass(frozen=True, slots=True)
class Route:
    """One route.

    Attributes:
        method, path: as served (``{name}`` marks a path parameter).
        operation: the handler's name and the OpenAPI ``operationId``.
        role: the least role allowed to use it.
        summary: one line for the document.
        body: the request body's model (None: no body).
        status: the success status.
        response: the success body's schema (None: a non-JSON body, see ``media``).
        media: the success body's media type.
        params: query and path parameters.
    """

    method: str
    path: str
    operation: str
    role: Role
    summary: str
    body: type[api.Body] | None = None
    status: int = 200
    response: s.Schema | None = None
    media: str = "application/json"
    params: tuple[Param, ...] = ()


_P = api.API_PREFIX
_JOB_ID = Param("id", s.integer(1, 2**53), "the job's id", where="path", required=True)
_WHO = s.obj({"name": s.string(), "role": s.enum([str(r) for r in Role])},
             required=("name", "role"), closed=False)  # fmt: skip
_VM_NAME = Param("name", s.string(max_length=63, pattern=s.NAME_PATTERN), "the VM", "path", True)

ROUTES: tuple[Route, ...] = (
    Route("GET", f"{_P}/hosts", "list_hosts", Role.VIEWER, "Every host: room, VMs, maintenance",
          response=api.HOSTS_SCHEMA),
    Route("GET", f"{_P}/vms", "list_vms", Role.VIEWER, "Every VM and where it runs",
          response=api.VMS_SCHEMA),
    Route("GET", f"{_P}/vms/{{name}}", "show_vm", Role.VIEWER, "One VM",
          response=api.VMS_SCHEMA["properties"]["vms"]["items"], params=(_VM_NAME,)),
    Route("GET", f"{_P}/history", "history", Role.VIEWER, "Past migrations, oldest first",
          response=api.HISTORY_SCHEMA,
          params=(Param("vm", s.string(max_length=63, pattern=s.NAME_PATTERN), "only this VM"),
                  Param("limit", s.integer(1, 100_000), "the latest N (default 50)"))),
    Route("GET", f"{_P}/jobs", "list_jobs", Role.VIEWER, "Jobs, newest first",
          response=api.JOBS_SCHEMA,
          params=(Param("limit", s.integer(1, 10_000), "at most N (default 100)"),
                  Param("state", s.enum([str(j) for j in api.JobState]), "only this state"))),
    Route("GET", f"{_P}/jobs/{{id}}", "show_job", Role.VIEWER, "One job",
          response=api.JOB_SCHEMA, params=(_JOB_ID,)),
    Route("POST", f"{_P}/jobs/{{id}}/cancel", "cancel_job", Role.OPERATOR,
          "Cancel a running job (a move in flight is wound down: the guest stays intact)",
          status=202, response=api.JOB_SCHEMA, params=(_JOB_ID,)),
    Route("POST", f"{_P}/migrations", "migrate", Role.OPERATOR,
          "Move a VM to another host (a job)", body=api.MigrateBody, status=202,
          response=api.JOB_SCHEMA),
    Route("POST", f"{_P}/evacuations", "evacuate", Role.OPERATOR,
          "Move every VM off a host as one scheduled job", body=api.EvacuateBody, status=202,
          response=api.JOB_SCHEMA),
    Route("POST", f"{_P}/balance", "balance", Role.OPERATOR,
          "Even out the hosts' load by moving VMs (a job)", body=api.BalanceBody, status=202,
          response=api.JOB_SCHEMA),
    Route("POST", f"{_P}/reconcile", "reconcile", Role.OPERATOR,
          "After a crash: one running copy per VM again (a job)", body=api.ReconcileBody,
          status=202, response=api.JOB_SCHEMA),
    Route("GET", f"{_P}/events", "events", Role.VIEWER,
          "Server-Sent Events: job changes and progress samples (one job's: until it ends)",
          media="text/event-stream",
          params=(Param("job", s.integer(1, 2**53), "only this job's events"),)),
    Route("GET", f"{_P}/jobs/{{id}}/curve", "job_curve", Role.VIEWER,
          "Each move's progress curve (the service's recent jobs; the dashboard plots it)",
          response=CURVES_SCHEMA, params=(_JOB_ID,)),
    Route("GET", f"{_P}/whoami", "whoami", Role.VIEWER, "The caller's name and role",
          response=_WHO),
    Route("POST", f"{_P}/session", "login", Role.VIEWER,
          "A browser session: the bearer token exchanged for an HttpOnly, SameSite=Strict "
          "cookie (changes nothing; the dashboard's login)", response=_WHO),
    Route("DELETE", f"{_P}/session", "logout", Role.VIEWER,
          "End the browser session (its cookie is cleared)", response=_WHO),
    Route("GET", "/metrics", "metrics", Role.VIEWER, "Prometheus metrics",
          media="text/plain; version=0.0.4"),
    Route("GET", "/openapi.json", "openapi", Role.VIEWER, "This document",
          response={"type": "object"}),
)  # fmt: skip

# Routes that change no state of the cluster though not ``GET``: a viewer logs in and out too.
SESSION_OPERATIONS = frozenset({"login", "logout"})


def route_for(operation: str) -> Route:
    """Raises: KeyError: no such operation."""
    for route in ROUTES:
        if route.operation == operation:
            return route
    raise KeyError(operation)
