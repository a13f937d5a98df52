"""Who may do what: bearer tokens with roles, and the decision for every request.

Two roles: ``viewer`` reads (every ``GET``: lists, history, jobs, events, metrics, the OpenAPI
document) and ``operator`` does everything (starts and cancels jobs). Every request is decided
here, unknown paths included: without a known token the answer is 401 (nothing, not even
whether a path exists, is told to strangers), with a viewer token on an operator route 403.

Tokens live in files the service writes on first start, mode 0600, one per role
(``<state dir>/tokens/operator.token``, ``viewer.token``); the file's name is the token's name
recorded with every change it asks for (``api:operator``).

Example:
    >>> book = TokenBook({"s3cret-viewer-token-0123": Principal("viewer", Role.VIEWER)})
    >>> who = book.lookup("Bearer s3cret-viewer-token-0123")
    >>> decide(who, Role.OPERATOR).status
    403
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from vmferry.core.errors import ConfigError

__all__ = [
    "MIN_TOKEN_CHARS",
    "Decision",
    "Principal",
    "Role",
    "TokenBook",
    "decide",
    "load_or_create_tokens",
    "role_for_method",
]

MIN_TOKEN_CHARS = 24


class Role(enum.StrEnum):
    VIEWER = "viewer"
    OPERATOR = "operator"

    def can(self, needed: Role) -> bool:
        """An operator may do what a viewer may, not the other way round."""
        return self is Role.OPERATOR or needed is Role.VIEWER


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a token stands for: its name (recorded with what it asks) and its role."""

    name: str
    role: Role

    @property
    def asked_by(self) -> str:
        """How the history records a change this principal asked for."""
        return f"api:{self.name}"

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "role": str(self.role)}


@dataclass(frozen=True, slots=True)
class Decision:
    """Whether a request may go on (``status`` 0) or the refusal's HTTP status and why."""

    status: int
    reason: str

    @property
    def allowed(self) -> bool:
        return self.status == 0


def role_for_method(method: str) -> Role:
    """The role a route needs when the route table does not say (unknown paths): reading
    needs a viewer, anything else an operator."""
    return Role.VIEWER if method.upper() in ("GET", "HEAD") else Role.OPERATOR


def decide(principal: Principal | None, needed: Role) -> Decision:
    """May ``principal`` (None: no or an unknown token) use a route that needs ``needed``?"""
    if principal is None:
        return Decision(401, "missing or unknown bearer token")
    if not principal.role.can(needed):
        return Decision(
            403, f"the {principal.role} token {principal.name!r} may not do this (needs {needed})"
        )
    return Decision(0, "")


class TokenBook:
    """The tokens the service accepts, each standing for a principal."""

    def __init__(self, tokens: Mapping[str, Principal]) -> None:
        for token in tokens:
            if len(token) < MIN_TOKEN_CHARS:
                raise ConfigError(f"a token must be at least {MIN_TOKEN_CHARS} characters")
        self._tokens = [(token.encode(), who) for token, who in tokens.items()]

    def lookup(self, authorization: str | None) -> Principal | None:
        """The principal of an ``Authorization: Bearer <token>`` header, None if unknown.

        Every known token is compared in constant time, so the answer's timing tells nothing
        about how close a guess came.
        """
        if authorization is None or not authorization.startswith("Bearer "):
            return None
        given = authorization.removeprefix("Bearer ").strip().encode()
        found = None
        for token, who in self._tokens:
            if hmac.compare_digest(given, token):
                found = who
        return found

    def principal(self, name: str) -> Principal | None:
        """The principal named ``name``, if a token stands for it."""
        return next((who for _, who in self._tokens if who.name == name), None)

    def derive_key(self, name: str, purpose: bytes) -> bytes | None:
        """A key for ``purpose`` derived from ``name``'s token (HMAC-SHA256; None: no such
        principal): it signs what the token's holder was given (a browser session) without
        the token itself leaving the service, and changes when the token does."""
        for token, who in self._tokens:
            if who.name == name:
                return hmac.new(token, purpose, hashlib.sha256).digest()
        return None


def _read_or_create(path: Path) -> str:
    """The token in ``path``, written first (0600, atomically) if there is none."""
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        token = secrets.token_urlsafe(32)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(token + "\n")
        tmp.replace(path)
        return token
    except OSError as err:
        raise ConfigError(f"cannot read the token file {path}: {err}") from err
    if len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(f"{path}: a token must be at least {MIN_TOKEN_CHARS} characters")
    if path.stat().st_mode & 0o077:
        raise ConfigError(f"{path} is readable by others: chmod 600 it")
    return token


def load_or_create_tokens(directory: Path) -> tuple[TokenBook, dict[Role, Path]]:
    """The service's tokens from ``directory`` (created 0700, tokens 0600 on first start).

    Returns:
        The book, and each role's token file.

    Raises:
        ConfigError: a token file is unreadable, too short or readable by others.
    """
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create the token directory {directory}: {err}") from err
    files = {role: directory / f"{role}.token" for role in Role}
    tokens = {_read_or_create(path): Principal(role.value, role) for role, path in files.items()}
    if len(tokens) != len(files):
        raise ConfigError(f"the tokens in {directory} must differ from each other")
    return TokenBook(tokens), files
