"""Wire types of the controller service's HTTP API (``/api/v1``), shared by the server, its
client (the CLI in client mode) and the OpenAPI document.

Every request body is a frozen dataclass with a JSON Schema (``SCHEMA``), ``from_json``
(validates against the schema first: a bad body is a :class:`~vmferry.service.schema.SchemaError`,
a 400 naming the field) and ``to_json``. Responses are described by schemas here too; their
bodies are the controller's own JSON (a migration report is DESIGN.md's schema 1).

Errors are ``{"error": {"code": <code>, "message": <text>}}`` with the HTTP status of
:data:`STATUS_BY_CODE`.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Self

from vmferry.core.model import STRATEGIES
from vmferry.service import schema as s

__all__ = [
    "API_PREFIX",
    "BODIES",
    "CONTROLLER_JOBS_SCHEMA",
    "CONTROLLER_JOB_SCHEMA",
    "DELETED_SCHEMA",
    "ERROR_SCHEMA",
    "EVENT_KINDS",
    "HISTORY_SCHEMA",
    "HOSTS_SCHEMA",
    "JOBS_SCHEMA",
    "JOB_KINDS",
    "JOB_SCHEMA",
    "MAX_BODY_BYTES",
    "PLAN_SCHEMA",
    "STATUS_BY_CODE",
    "VERIFY_SCHEMA",
    "VMS_SCHEMA",
    "BalanceBody",
    "Body",
    "CreateBody",
    "ErrorCode",
    "EvacuateBody",
    "JobState",
    "MaintenanceBody",
    "MigrateBody",
    "ReconcileBody",
    "ResumeBody",
    "error_json",
]

API_PREFIX = "/api/v1"
# The largest request body accepted (every body is a few hundred bytes).
MAX_BODY_BYTES = 16 * 1024


class ErrorCode(enum.StrEnum):
    """What went wrong, for programs (the message is for people)."""

    INVALID = "invalid"  # the body or query does not match the schema, or a value is refused
    UNAUTHORIZED = "unauthorized"  # no token, or an unknown one
    FORBIDDEN = "forbidden"  # the token's role may not do this
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    CONFLICT = "conflict"  # the state forbids it now (a job holds the host, a VM migrating)
    TOO_LARGE = "too_large"
    UNSUPPORTED_MEDIA = "unsupported_media_type"
    UNAVAILABLE = "unavailable"  # the service is shutting down, or an agent did not answer
    INTERNAL = "internal"


STATUS_BY_CODE: dict[ErrorCode, int] = {
    ErrorCode.INVALID: 400,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.METHOD_NOT_ALLOWED: 405,
    ErrorCode.CONFLICT: 409,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.UNSUPPORTED_MEDIA: 415,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.INTERNAL: 500,
}


def error_json(code: ErrorCode, message: str) -> dict[str, object]:
    return {"error": {"code": str(code), "message": message}}


class JobState(enum.StrEnum):
    """A server-owned job's state. ``completed``/``failed``/``refused``/``cancelled``/
    ``interrupted`` are final; the CLI exits 0 / 1 / 2 / 1 / 1 for them."""

    RUNNING = "running"
    COMPLETED = "completed"  # ran, and its outcome is good (the move verified)
    FAILED = "failed"  # ran and failed, or broke off with an error
    REFUSED = "refused"  # refused before anything changed (bad input, no room, a job holds it)
    CANCELLED = "cancelled"  # an operator cancelled it
    INTERRUPTED = "interrupted"  # the service stopped (or died) while it ran

    @property
    def is_final(self) -> bool:
        return self is not JobState.RUNNING


_NAME = s.string(max_length=63, pattern=s.NAME_PATTERN)
_MBPS = s.nullable(s.integer(1, 1_000_000))
_PER_HOST = s.nullable(s.integer(1, 1000))
_DOWNTIME = s.integer(1, 600_000)
_SIZE_PATTERN = r"^[0-9]{1,15}[KkMmGgTt]?[Ii]?[Bb]?$"  # 4096, 64K, 256M, 2GiB


class Body:
    """A request body: its schema, validated parsing, and JSON (see the module docstring)."""

    __slots__ = ()
    SCHEMA: ClassVar[s.Schema]
    NAME: ClassVar[str]

    @classmethod
    def from_json(cls, data: object) -> Self:
        """Raises: SchemaError: ``data`` does not match :attr:`SCHEMA`."""
        s.validate(data, cls.SCHEMA)
        assert isinstance(data, dict)
        return cls(**data)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload, no-any-return]


@dataclass(frozen=True, slots=True)
class MigrateBody(Body):
    """``POST /migrations``: one move (the options of ``vmferry migrate``)."""

    vm: str
    to: str
    strategy: str = "auto"
    max_downtime_ms: int = 300
    deadline_s: float | None = None
    bandwidth_mbps: int | None = None
    force: bool = False
    allow_postcopy: bool = True
    plan: bool = True
    recovery_limit_s: float = 600.0
    tls: bool = False
    verify: str = "sample"

    NAME: ClassVar[str] = "MigrateRequest"
    SCHEMA: ClassVar[s.Schema] = s.obj(
        {
            "vm": _NAME,
            "to": _NAME,
            "strategy": s.enum(STRATEGIES),
            "max_downtime_ms": _DOWNTIME,
            "deadline_s": s.nullable(s.number(0.001, 86_400)),
            "bandwidth_mbps": _MBPS,
            "force": s.boolean(),
            "allow_postcopy": s.boolean(),
            "plan": s.boolean(),
            "recovery_limit_s": s.number(0, 86_400),
            "tls": s.boolean(),
            "verify": s.enum(("full", "sample", "off")),
        },
        required=("vm", "to"),
    )


@dataclass(frozen=True, slots=True)
class EvacuateBody(Body):
    """``POST /evacuations``: move every VM off a host as one scheduled job."""

    host: str
    to: list[str] | None = None
    deadline_s: float | None = None
    bandwidth_mbps: int | None = None
    max_downtime_ms: int = 300
    max_outbound: int | None = None
    max_inbound: int | None = None
    dry_run: bool = False

    NAME: ClassVar[str] = "EvacuateRequest"
    SCHEMA: ClassVar[s.Schema] = s.obj(
        {
            "host": _NAME,
            "to": s.nullable(s.array(_NAME, max_items=1000, min_items=1)),
            "deadline_s": s.nullable(s.number(0.001, 86_400)),
            "bandwidth_mbps": _MBPS,
            "max_downtime_ms": _DOWNTIME,
            "max_outbound": _PER_HOST,
            "max_inbound": _PER_HOST,
            "dry_run": s.boolean(),
        },
        required=("host",),
    )


@dataclass(frozen=True, slots=True)
class BalanceBody(Body):
    """``POST /balance``: even out the hosts' load (the options of ``vmferry balance``)."""

    max_moves: int = 10
    cool_down_min: float = 30.0
    max_downtime_ms: int = 300
    bandwidth_mbps: int | None = None
    max_outbound: int | None = None
    max_inbound: int | None = None
    dry_run: bool = False

    NAME: ClassVar[str] = "BalanceRequest"
    SCHEMA: ClassVar[s.Schema] = s.obj(
        {
            "max_moves": s.integer(1, 1000),
            "cool_down_min": s.number(0, 10_080),
            "max_downtime_ms": _DOWNTIME,
            "bandwidth_mbps": _MBPS,
            "max_outbound": _PER_HOST,
            "max_inbound": _PER_HOST,
            "dry_run": s.boolean(),
        }
    )


@dataclass(frozen=True, slots=True)
class ReconcileBody(Body):
    """``POST /reconcile``: one running copy per VM again, after a crash."""

    wait_s: float = 300.0

    NAME: ClassVar[str] = "ReconcileRequest"
    SCHEMA: ClassVar[s.Schema] = s.obj({"wait_s": s.number(0.001, 86_400)})


@dataclass(frozen=True, slots=True)
class MaintenanceBody(Body):
    """``POST /maintenance``: ``enter`` empties a host (marked in maintenance once empty);
    ``exit`` takes it out (``bring_back``: moving back the VMs ``enter`` moved off)."""

    host: str
    action: str
    bring_back: bool = False
    to: list[str] | None = None
    deadline_s: float | None = None
    bandwidth_mbps: int | None = None
    max_downtime_ms: int = 300
    max_outbound: int | None = None
    max_inbound: int | None = None
    dry_run: bool = False

    NAME: ClassVar[str] = "MaintenanceRequest"
    SCHEMA: ClassVar[s.Schema] = s.obj(
        {
            "host": _NAME,
            "action": s.enum(("enter", "exit")),
            "bring_back": s.boolean(),
            **{k: v for k, v in EvacuateBody.SCHEMA["properties"].items() if k != "host"},
        },
        required=("host", "action"),
    )


@dataclass(frozen=True, slots=True)
class CreateBody(Body):
    """``POST /vms``: a new VM of the lab guest (``vm create`` without ``--image``)."""

    name: str
    host: str | None = None
    group: str | None = None
    memory: str = "512M"
    vcpus: int = 1
    disk: str | None = None
    disk_bus: str = "virtio-blk"
    storage: str = "local"
    workload: str = "idle"
    dry_run: bool = False

    NAME: ClassVar[str] = "CreateRequest"
    SCHEMA: ClassVar[s.Schema] = s.obj(
        {
            "name": _NAME,
            "host": s.nullable(_NAME),
            "group": s.nullable(_NAME),
            "memory": s.string(max_length=20, pattern=_SIZE_PATTERN),
            "vcpus": s.integer(1, 64),
            "disk": s.nullable(s.string(max_length=20, pattern=_SIZE_PATTERN)),
            "disk_bus": s.enum(("virtio-blk", "virtio-scsi")),
            "storage": s.enum(("local", "shared")),
            "workload": s.string(max_length=200),
            "dry_run": s.boolean(),
        },
        required=("name",),
    )


@dataclass(frozen=True, slots=True)
class ResumeBody(Body):
    """``POST /controller-jobs/{id}/resume``: go on with a job whose controller died."""

    wait_s: float = 300.0

    NAME: ClassVar[str] = "ResumeRequest"
    SCHEMA: ClassVar[s.Schema] = s.obj({"wait_s": s.number(0.001, 86_400)})


BODIES: tuple[type[Body], ...] = (
    MigrateBody,
    EvacuateBody,
    BalanceBody,
    ReconcileBody,
    MaintenanceBody,
    ResumeBody,
    CreateBody,
)
JOB_KINDS = ("migrate", "evacuate", "balance", "reconcile", "maintenance", "resume", "create")

# -- response schemas (open: the controller may add keys within a version) ------------------

ERROR_SCHEMA = s.obj(
    {
        "error": s.obj(
            {"code": s.enum([str(c) for c in ErrorCode]), "message": s.string(max_length=100_000)},
            required=("code", "message"),
            closed=False,
        )
    },
    required=("error",),
    closed=False,
)

_ASKED_BY = s.obj(
    {"name": s.string(), "role": s.enum(("viewer", "operator"))},
    required=("name", "role"),
    closed=False,
)

JOB_SCHEMA = s.obj(
    {
        "id": s.integer(1),
        "kind": s.enum(JOB_KINDS),
        "state": s.enum([str(j) for j in JobState]),
        "asked_by": _ASKED_BY,
        "created_at": s.string(),
        "updated_at": s.string(),
        "request": {"type": "object"},
        "result": {"type": ["object", "array", "null"]},
        "error": s.nullable(ERROR_SCHEMA["properties"]["error"]),
        "controller_job": s.nullable(s.integer(1)),
    },
    required=("id", "kind", "state", "asked_by", "created_at", "request"),
    closed=False,
    description="A job the service runs: it outlives the client that asked for it.",
)
JOBS_SCHEMA = s.array(JOB_SCHEMA, max_items=100_000)

_VM = s.obj(
    {
        "name": s.string(),
        "host": s.string(),
        "state": s.string(),
        "memory_bytes": s.integer(0),
        "vcpus": s.integer(0),
        "workload": s.string(max_length=10_000),
        "pid": s.nullable(s.integer()),
    },
    required=("name", "host", "state", "memory_bytes", "vcpus"),
    closed=False,
)
VMS_SCHEMA = s.obj(
    {"vms": s.array(_VM, max_items=100_000), "unreachable": s.array(s.string())},
    required=("vms", "unreachable"),
    closed=False,
)
HOSTS_SCHEMA = s.array(
    s.obj(
        {
            "host": s.string(),
            "state": s.enum(("active", "entering", "maintenance", "unreachable")),
            "vms": s.array(s.string(), max_items=100_000),
            "memory_free_bytes": s.nullable(s.integer()),
            "vcpus_free": s.nullable(s.integer()),
            "disk_free_bytes": s.nullable(s.integer()),
        },
        required=("host", "state", "vms"),
        closed=False,
    )
)
HISTORY_SCHEMA = s.array(
    s.obj(
        {
            "id": s.integer(1),
            "started_at": s.string(),
            "asked_by": s.nullable(s.string()),
            "vm": s.string(),
            "source": s.string(),
            "destination": s.string(),
            "strategy": s.string(),
            "status": s.string(),
        },
        required=("id", "started_at", "vm", "status"),
        closed=False,
        description="One recorded migration: its report (schema 1) and who asked for it.",
    ),
    max_items=100_000,
)

EVENT_KINDS = ("hello", "job", "plan", "progress", "dropped")

_MOVE = s.obj(
    {"vm": s.string(), "source": s.string(), "destination": s.string(), "state": s.string()},
    required=("vm", "source", "destination", "state"),
    closed=False,
)
CONTROLLER_JOB_SCHEMA = s.obj(
    {
        "job": s.integer(1),
        "kind": s.string(),
        "host": s.string(),
        "hosts": s.array(s.string(), max_items=100_000),
        "state": s.enum(("running", "completed", "failed", "interrupted")),
        "pid": s.integer(),
        "created_at": s.string(),
        "updated_at": s.string(),
        "moves": s.array(_MOVE, max_items=100_000),
        "plan": {"type": "object"},
        "report": {"type": ["object", "null"]},
    },
    required=("job", "kind", "host", "hosts", "state", "pid", "created_at", "updated_at", "moves"),
    closed=False,
    description="A job of many moves as the controller records it (`vmferry job show`): "
    "an evacuation, a maintenance, a bring-back, a balance.",
)
CONTROLLER_JOBS_SCHEMA = s.array(CONTROLLER_JOB_SCHEMA, max_items=100_000)
PLAN_SCHEMA = s.obj(
    {
        "schema": s.integer(1),
        "vm": s.string(),
        "source": s.string(),
        "destination": s.string(),
        "measured": {"type": "object"},
        "goal": {"type": "object"},
        "predictions": s.array({"type": "object"}, max_items=100),
        "recommended": s.string(),
        "meets_goal": s.boolean(),
        "reason": s.string(max_length=10_000),
        "profile": {"type": "object"},
    },
    required=(
        "schema",
        "vm",
        "source",
        "destination",
        "measured",
        "predictions",
        "recommended",
        "meets_goal",
        "reason",
        "profile",
    ),
    closed=False,
    description="What each strategy would cost for a move, and the one recommended "
    "(`vmferry plan --json`).",
)
DELETED_SCHEMA = s.obj(
    {"deleted": s.string(), "host": s.string()},
    required=("deleted", "host"),
    closed=False,
    description="The VM deleted and the host it ran on (`vmferry vm delete --json`).",
)
VERIFY_SCHEMA = s.obj(
    {
        "vm": s.string(),
        "host": s.string(),
        "ok": s.boolean(),
        "pages_checked": s.integer(0),
        "bad_pages": s.integer(0),
    },
    required=("vm", "host", "ok", "pages_checked", "bad_pages"),
    closed=False,
    description="The guest's check of every page of its memory (`vmferry verify --json`).",
)
