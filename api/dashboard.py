"""The web dashboard: a single-page app (api/static/dashboard/) served at `/`, `/jobs`, `/jobs/<job id>`, `/files`
and `/models`, so each page has an address a user can bookmark.

The HTML needs no key: the page asks for one, keeps it in the tab's sessionStorage and reads everything from the
/v1 routes with `Authorization: Bearer <key>`, as any other client does. Every script, style sheet and the chart
library (uPlot, vendor/) ship with the project; the Content-Security-Policy lets the page load nothing from
elsewhere.

Caching: the HTML is `no-cache` (revalidated on every load), and names its assets with `?v=<hash of every asset>`;
an asset asked for with the current hash is cached for a year (`immutable`), so an upgrade is picked up on the
next load and nothing is fetched twice between upgrades. Assets asked for without it (the ES modules the entry
script imports) are `no-cache` with an ETag, so they are revalidated (304) rather than sent again.

These routes are not part of the REST API: api/openapi.py leaves them out of the OpenAPI document.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from flask import Blueprint, Response, request, send_from_directory

ROOT = Path(__file__).parent / "static" / "dashboard"
ASSET_PREFIX = "/static/dashboard"
VERSION_PLACEHOLDER = "__ASSET_VERSION__"
YEAR = 365 * 24 * 3600
#: Scripts, styles, data and connections only from this origin; no plugins, no framing, no inline script.
CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                           "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
                           "frame-ancestors 'none'")

dashboard = Blueprint("dashboard", __name__)


def asset_version() -> str:
    """A short hash of every asset's path and bytes (a few tens of kB: cheap enough to compute per page load, so
    an edited file is never served under an old version)."""
    digest = hashlib.sha256()
    for path in sorted(ROOT.rglob("*")):
        if path.is_file() and path.name != "index.html":
            digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def protect(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


@dashboard.get("/")
@dashboard.get("/jobs")
@dashboard.get("/jobs/<job_id>")
@dashboard.get("/files")
@dashboard.get("/models")
def page(job_id: str | None = None):
    """The dashboard (HTML); the page itself signs in with an API key."""
    html = (ROOT / "index.html").read_text(encoding="utf-8").replace(VERSION_PLACEHOLDER, asset_version())
    response = Response(html, content_type="text/html; charset=utf-8")
    response.headers["Cache-Control"] = "no-cache"
    return protect(response)


@dashboard.get(f"{ASSET_PREFIX}/<path:filename>")
def asset(filename: str):
    """A dashboard asset (script, style sheet, vendored library)."""
    versioned = request.args.get("v") == asset_version()
    response = send_from_directory(ROOT, filename, max_age=YEAR if versioned else None, conditional=True)
    if versioned:
        response.headers["Cache-Control"] = f"public, max-age={YEAR}, immutable"
    else:
        response.headers["Cache-Control"] = "no-cache"
    return protect(response)
