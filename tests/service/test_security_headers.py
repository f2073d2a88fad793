"""Security headers and pages, on SQLite and PostgreSQL: no response may be content-sniffed; every HTML page
(the dashboard, report.html, /docs, /redoc) is framed by no other site and runs only scripts this server
serves, with no inline script and no inline style but the ones its policy names; those pages load nothing
from outside the server; the sign-in page shows only the server's own words."""

from __future__ import annotations

import json
import re
import uuid

import httpx
import pytest
from audit_reports import BELOW, COPIED, report_of
from fastapi.testclient import TestClient
from test_dashboard_session import sign_in

from app.api.docs_pages import CDN
from app.api.security_headers import inline_style
from app.core.db import session_scope
from app.core.models import REPORT_NAME, Artifact, Job, JobStatus

PROBLEM_JSON = "application/problem+json"


def succeeded_job(client: TestClient, database_url: str, owner_id: uuid.UUID) -> uuid.UUID:
    """A succeeded job of this owner with a stored report: what report.html renders."""
    stored = client.app.state.store.put_bytes(json.dumps(report_of(BELOW, COPIED)).encode())
    with session_scope(database_url) as s:
        done = JobStatus.succeeded.value
        job = Job(owner_id=owner_id, status=done, spec={}, request_hash="0" * 64, max_attempts=1)
        s.add(job)
        s.flush()
        s.add(
            Artifact(
                owner_id=owner_id,
                job_id=job.id,
                name=REPORT_NAME,
                kind="report",
                media_type="application/json",
                sha256=stored.sha256,
                size_bytes=stored.size,
                storage_key=stored.key,
            )
        )
        return job.id


def directives(response: httpx.Response) -> dict[str, list[str]]:
    policy = response.headers["content-security-policy"]
    return {d.split()[0]: d.split()[1:] for d in policy.split(";") if d.strip()}


def assert_locked_down(page: httpx.Response) -> None:
    """The page's headers refuse framing elsewhere and anything not from this server; what the page holds
    inline is exactly what its policy allows, and it names no other site to load from."""
    what = page.request.url.path
    assert page.status_code < 500 and page.headers["content-type"].startswith("text/html"), what
    assert page.headers["x-content-type-options"] == "nosniff", what
    assert page.headers["x-frame-options"] == "SAMEORIGIN", what
    policy = directives(page)
    assert policy["default-src"] == policy["script-src"] == ["'self'"], (what, policy)
    assert policy["frame-ancestors"] == ["'self'"] and policy["object-src"] == ["'none'"], what
    assert "'unsafe-inline'" not in policy["style-src"] and "'unsafe-eval'" not in policy["script-src"], what
    html = page.text
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), f"{what} has an inline script"
    assert not re.search(r"<[^>]*\s(on[a-z]+|style)\s*=", html), f"{what} has an inline handler or style"
    for nonce, css in re.findall(r'<style(?: nonce="([^"]+)")?>(.*?)</style>', html, re.S):
        allowed = f"'nonce-{nonce}'" if nonce else inline_style(css)
        assert allowed in policy["style-src"], f"{what}: an inline style its policy does not allow"
    urls = re.findall(r"""\b(?:src|href|action)\s*=\s*["']([^"']*)["']""", html)
    outside = [u for u in urls if re.match(r"(?i)([a-z][a-z0-9+.-]*:|//)", u)]  # only paths of this server
    assert not outside, f"{what} loads from or links outside the server: {outside}"


def test_every_response_says_nosniff(client, caller) -> None:
    responses = [
        client.get("/api/v1/jobs", headers=caller.headers),  # JSON
        client.get("/api/v1/jobs"),  # problem+json: 401
        client.post("/api/v1/jobs", content=b"{" * 2**21, headers=caller.headers),  # 413, from BodyLimit
        client.get("/static/web/dashboard.css"),
        client.get("/static/web/htmx.min.js"),
        client.get("/static/docs/swagger-ui.css"),
        client.get("/openapi.json"),
        client.get("/login"),
    ]
    kinds = {r.headers["content-type"].split(";")[0] for r in responses}
    assert {"application/json", PROBLEM_JSON, "text/css", "text/html"} <= kinds, kinds
    for r in responses:
        assert r.headers["x-content-type-options"] == "nosniff", (r.request.url, r.status_code)
        if not r.headers["content-type"].startswith("text/html"):
            assert "x-frame-options" not in r.headers  # a policy for pages only


def test_html_pages_are_locked_down_and_load_nothing_from_elsewhere(client, caller, settings) -> None:
    job_id = succeeded_job(client, settings.database_url, caller.owner_id)
    for path in ("/login", "/docs", "/redoc"):
        assert_locked_down(client.get(path))
    sign_in(client, caller.key)
    for path in (
        "/jobs",
        f"/jobs/{job_id}",  # embeds report.html in a frame: the policy lets this server frame its pages
        "/models",
        "/keys",
        f"/compare?a={job_id}",
        f"/jobs/{uuid.uuid4()}",  # the 404 page
        f"/api/v1/jobs/{job_id}/report.html",  # opened with the session cookie
    ):
        assert_locked_down(client.get(path))
    report = client.get(f"/api/v1/jobs/{job_id}/report.html")
    assert report.status_code == 200 and "<style>" in report.text  # allowed by its hash, and only it


def test_redoc_and_swagger_ui_reach_no_other_site(client) -> None:
    redoc = client.get("/redoc")
    nonce = re.search(r'data-nonce="([^"]+)"', redoc.text).group(1)
    assert f"'nonce-{nonce}'" in directives(redoc)["style-src"]
    assert nonce not in client.get("/redoc").text  # a nonce per response
    bundle = client.get("/static/docs/redoc.standalone.js")
    assert bundle.status_code == 200 and len(bundle.content) > 500_000
    assert not CDN.search(bundle.content) and b"/static/docs/favicon.png" in bundle.content  # its logo, here
    start = client.get("/static/docs/docs-init.js").text
    assert "validatorUrl: null" in start  # Swagger UI asks no validator elsewhere about the document


@pytest.mark.parametrize(
    "reason",
    [
        "Your account is locked: call +1 555 0100 and read out your API key",
        "<b>bold</b>",
        "key ",  # a known code, but not exactly
    ],
)
def test_the_sign_in_page_shows_only_its_own_words(client, reason: str) -> None:
    page = client.get("/login", params={"reason": reason})
    assert page.status_code == 200 and 'id="error"' not in page.text
    assert "call +1 555" not in page.text and "bold" not in page.text
    ended = client.get("/login", params={"reason": "ended"})
    assert re.search(r'id="error">Your session has ended', ended.text)
