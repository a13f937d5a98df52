"""The one table from vmferry's errors to the API's error codes (and so HTTP statuses).

Most specific first: the first class that matches decides.
"""

from __future__ import annotations

from vmferry.agent.api import CapacityError, NotFound
from vmferry.agent.client import AgentUnreachable
from vmferry.controller.jobs import JobConflict
from vmferry.core.errors import ConfigError, FerryError, StateError
from vmferry.service.api import STATUS_BY_CODE, ErrorCode
from vmferry.service.pg import NotLeader

__all__ = ["CODE_BY_ERROR", "code_of", "status_of"]

CODE_BY_ERROR: tuple[tuple[type[FerryError], ErrorCode], ...] = (
    (NotFound, ErrorCode.NOT_FOUND),
    (JobConflict, ErrorCode.CONFLICT),
    (CapacityError, ErrorCode.CONFLICT),
    (ConfigError, ErrorCode.INVALID),
    (NotLeader, ErrorCode.UNAVAILABLE),  # a follower, or a leader whose lease passed on
    (StateError, ErrorCode.CONFLICT),
    (AgentUnreachable, ErrorCode.UNAVAILABLE),
    (FerryError, ErrorCode.INTERNAL),
)


def code_of(error: FerryError) -> ErrorCode:
    return next(code for cls, code in CODE_BY_ERROR if isinstance(error, cls))


def status_of(error: FerryError) -> int:
    return STATUS_BY_CODE[code_of(error)]
