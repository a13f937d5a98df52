"""Browser sessions for the dashboard: a token exchanged once for a signed, HttpOnly cookie.

A browser's ``EventSource`` cannot send an ``Authorization`` header, and a token kept where
the page's scripts can read it would be one script injection away from leaking. So the page
posts the token once (``POST /api/v1/session`` with ``Authorization: Bearer``) and gets a
cookie instead: ``HttpOnly`` (scripts cannot read it), ``SameSite=Strict`` (no other site's
page can make the browser send it), ``Secure`` over HTTPS, valid :data:`SESSION_TTL_S`.

The cookie is ``<name>.<expires unix s>.<nonce>.<signature>``: an HMAC-SHA256 keyed by a key
derived from the principal's own token, so it carries no secret, any service holding the
same tokens accepts it (a restart keeps sessions), and replacing a token file ends its
sessions. Logging out clears the cookie in the browser.

Requests that change something and come with the cookie alone must also carry
:data:`CSRF_HEADER` (which the page sends): a form or link from elsewhere cannot add a
header, and a script elsewhere cannot without a CORS preflight the service never allows.
The API's bearer tokens work as before; a request with an ``Authorization`` header is
decided by that header only.

Example:
    >>> from vmferry.service.auth import Principal, Role, TokenBook
    >>> book = TokenBook({"v" * 32: Principal("viewer", Role.VIEWER)})
    >>> cookie = issue(book, Principal("viewer", Role.VIEWER), now_s=1000.0)
    >>> verify(book, cookie, now_s=1001.0)
    Principal(name='viewer', role=<Role.VIEWER: 'viewer'>)
    >>> verify(book, cookie, now_s=1000.0 + SESSION_TTL_S + 1) is None
    True
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from vmferry.service.auth import Principal, TokenBook

__all__ = [
    "COOKIE_NAME",
    "CSRF_HEADER",
    "SESSION_TTL_S",
    "issue",
    "verify",
]

COOKIE_NAME = "vmferry_session"
CSRF_HEADER = "X-Vmferry-Csrf"
SESSION_TTL_S = 12 * 3600
_PURPOSE = b"vmferry dashboard session v1"
_MAX_COOKIE_CHARS = 256


def _signature(key: bytes, payload: str) -> str:
    digest = hmac.new(key, payload.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def issue(book: TokenBook, who: Principal, now_s: float, ttl_s: int = SESSION_TTL_S) -> str:
    """A session cookie's value for ``who`` (a principal of ``book``), valid ``ttl_s``.

    Raises:
        KeyError: ``who`` has no token in ``book``.
    """
    key = book.derive_key(who.name, _PURPOSE)
    if key is None:
        raise KeyError(who.name)
    payload = f"{who.name}.{int(now_s) + ttl_s}.{secrets.token_urlsafe(12)}"
    return f"{payload}.{_signature(key, payload)}"


def verify(book: TokenBook, value: str | None, now_s: float) -> Principal | None:
    """The principal of a session cookie; None if absent, malformed, forged or expired."""
    if not value or len(value) > _MAX_COOKIE_CHARS:
        return None
    parts = value.split(".")
    if len(parts) != 4 or not parts[1].isdigit():
        return None
    name, expires, _, signature = parts
    key = book.derive_key(name, _PURPOSE)
    if key is None:
        return None
    good = _signature(key, ".".join(parts[:3]))
    if not hmac.compare_digest(good.encode(), signature.encode()) or int(expires) <= now_s:
        return None
    return book.principal(name)
