"""The dashboard's routes without a browser: every page address answers the same HTML, assets are cached by version,
everything the page loads is served by the API itself, and none of it is in the REST API's OpenAPI document."""
from __future__ import annotations

import re
import tempfile

import pytest

from api import create_app
from api.dashboard import ROOT
from jobs.settings import Settings

PAGES = ["/", "/jobs", "/jobs/job-0123456789abcdef01234567", "/files", "/models"]


@pytest.fixture(scope="module")
def client():
    app = create_app(Settings.from_env({
        "GPT2JOBS_VAR_DIR": tempfile.gettempdir(), "DATABASE_URL": "sqlite:///:memory:", "BROKER_URL": "memory://"}))
    return app.test_client()


def asset_urls(html: str) -> list[str]:
    return re.findall(r'(?:src|href)="([^"]+)"', html)


@pytest.mark.parametrize("path", PAGES)
def test_every_page_address_serves_the_app_without_a_key(client, path):
    response = client.get(path)
    assert response.status_code == 200 and response.mimetype == "text/html"
    assert 'type="module"' in response.text and "__ASSET_VERSION__" not in response.text
    assert response.headers["Cache-Control"] == "no-cache"
    policy = response.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "connect-src 'self'" in policy and "frame-ancestors 'none'" in policy


def test_the_page_loads_only_its_own_assets(client):
    html = client.get("/").text
    urls = asset_urls(html)
    page_assets = [url for url in urls if url.startswith("/static/dashboard/")]
    assert page_assets and len(page_assets) == len([url for url in urls if "?v=" in url])
    assert all(url.startswith(("/static/dashboard/", "/jobs", "/files", "/models")) for url in urls), urls
    assert any("vendor/uPlot.iife.min.js" in url for url in urls)
    for url in page_assets:
        assert client.get(url).status_code == 200, url
    # No file of the dashboard refers to another host: no CDN, nothing fetched from the internet.
    for path in ROOT.rglob("*"):
        if path.suffix in (".html", ".js", ".css") and path.parent.name != "vendor":
            text = path.read_text()
            assert not re.search(r"""(?:src|href|url|import|fetch)\s*[=(]?\s*["'(]?\s*(?:https?:)?//""", text), path
            assert not re.search(r'from\s+"(?:https?:)?//', text), path


def test_assets_are_cached_by_version_and_revalidated_without_one(client):
    versioned = next(url for url in asset_urls(client.get("/").text) if "/js/app.js?v=" in url)
    response = client.get(versioned)
    assert response.status_code == 200 and "immutable" in response.headers["Cache-Control"]
    plain = client.get(versioned.split("?")[0])
    assert plain.headers["Cache-Control"] == "no-cache" and plain.headers.get("ETag")
    assert client.get(versioned.split("?")[0], headers={"If-None-Match": plain.headers["ETag"]}).status_code == 304
    assert client.get(versioned.split("?")[0] + "?v=stale").headers["Cache-Control"] == "no-cache"


def test_missing_assets_and_other_methods_are_json_errors(client):
    for path in ("/static/dashboard/nothing.js", "/static/dashboard/../dashboard.py", "/jobs/a/b"):
        response = client.get(path)
        assert response.status_code == 404 and response.json["error"]["code"] == "not_found", path
    response = client.post("/jobs")
    assert response.status_code == 405 and response.json["error"]["code"] == "method_not_allowed"


def test_the_dashboard_is_not_in_the_openapi_document(client):
    paths = client.get("/openapi.json").json["paths"]
    assert "/v1/jobs" in paths and not {"/", "/jobs", "/jobs/{job_id}", "/files", "/models"} & set(paths)
    assert not any(path.startswith("/static") for path in paths)
