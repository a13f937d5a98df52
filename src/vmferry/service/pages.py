"""The web dashboard's files: plain HTML, JavaScript modules and CSS shipped as package data
(``vmferry/service/dashboard/``; nothing to build), served at ``/`` and ``/dashboard/<file>``.

These two routes are the only ones served without a token: the page holds no data and is what
asks for one (it logs in through ``POST /api/v1/session``, see
:mod:`vmferry.service.session`); every figure it shows comes from the API. The files are read
once when the application is built; only their names are served (no path is taken from the
request). Each answer carries a Content-Security-Policy that lets the page run its own
scripts and styles and talk to its own origin only, and forbids framing it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

from aiohttp import web

from vmferry.agent.api import NotFound

__all__ = ["PUBLIC_ROUTES", "Asset", "add_dashboard", "load_assets"]

PUBLIC_ROUTES = frozenset({"dashboard_page", "dashboard_asset"})
_INDEX = "index.html"
_NAME = re.compile(r"^[a-z0-9_-]+\.(html|js|css|svg)$")
_TYPES = {
    "html": "text/html",
    "js": "text/javascript",
    "css": "text/css",
    "svg": "image/svg+xml",
}
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@dataclass(frozen=True, slots=True)
class Asset:
    """One file of the dashboard."""

    body: bytes
    content_type: str


def load_assets() -> dict[str, Asset]:
    """The dashboard's files by name (read from the installed package)."""
    folder = resources.files("vmferry.service").joinpath("dashboard")
    assets = {}
    for entry in folder.iterdir():
        match = _NAME.match(entry.name)
        if match is not None and entry.is_file():
            assets[entry.name] = Asset(entry.read_bytes(), _TYPES[match.group(1)])
    if _INDEX not in assets:
        raise FileNotFoundError(f"the dashboard's {_INDEX} is not installed in {folder}")
    return assets


def _answer(asset: Asset) -> web.Response:
    response = web.Response(body=asset.body, content_type=asset.content_type, charset="utf-8")
    response.headers.update(_HEADERS)
    return response


def add_dashboard(app: web.Application) -> None:
    """Serve the dashboard from ``app`` (before its catch-all route)."""
    assets = load_assets()

    async def page(request: web.Request) -> web.Response:
        return _answer(assets[_INDEX])

    async def asset(request: web.Request) -> web.Response:
        found = assets.get(request.match_info["name"])
        if found is None:
            raise NotFound(f"no dashboard file {request.match_info['name']!r}")
        return _answer(found)

    app.router.add_route("GET", "/", page, name="dashboard_page")
    app.router.add_route("GET", "/dashboard/{name}", asset, name="dashboard_asset")
