"""The dashboard's session and form protections over HTTP, on SQLite and PostgreSQL: the cookie's flags and
contents, the CSRF token and same-origin check on posts, the cookie on API GETs only, revocation, tenancy."""

from __future__ import annotations

import re

import httpx

from app.core.keys import hash_secret
from app.web import session as web_session

ORIGIN = {"Origin": "http://testserver"}


def csrf_of(page: httpx.Response) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)


def sign_in(client, key: str) -> str:  # noqa: ANN001 - a TestClient
    """Sign in with the key; returns the session's CSRF token."""
    token = csrf_of(client.get("/login"))
    r = client.post("/login", data={"csrf": token, "key": key, "next": "/keys"}, headers=ORIGIN)
    assert r.status_code == 200 and r.url.path == "/keys", r.text
    return csrf_of(r)


def test_session_cookie_is_httponly_strict_signed_and_holds_no_key(client, caller) -> None:
    token = csrf_of(client.get("/login"))
    r = client.post("/login", data={"csrf": token, "key": caller.key}, headers=ORIGIN, follow_redirects=False)
    assert r.status_code == 303
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    value = client.cookies[web_session.COOKIE]
    assert caller.key not in value and caller.key.split("_", 1)[1][:20] not in value
    assert client.get("/jobs").status_code == 200
    # A tampered cookie signs nobody in.
    payload, signature = value.split(".")
    client.cookies.set(web_session.COOKIE, payload + "." + signature[::-1])
    assert client.get("/jobs", follow_redirects=False).headers["location"].startswith("/login")
    # Nor does a cookie made without the server's secret from a known key hash.
    forged = web_session.encode(b"x" * 32, web_session.new_session(hash_secret(caller.key)))
    client.cookies.set(web_session.COOKIE, forged)
    assert client.get("/jobs", follow_redirects=False).headers["location"].startswith("/login")


def test_posts_need_the_sessions_token_and_this_origin(client, caller) -> None:
    token = sign_in(client, caller.key)
    form = {"csrf": token, "name": "shop"}
    assert client.post("/keys", data=form | {"csrf": "0" * 64}, headers=ORIGIN).status_code == 403
    assert client.post("/keys", data={"name": "shop"}, headers=ORIGIN).status_code == 403
    assert client.post("/keys", data=form, headers={"Origin": "http://evil.example"}).status_code == 403
    assert client.post("/keys", data=form, headers={"Referer": "http://evil.example/x"}).status_code == 403
    assert client.post("/keys", data=form).status_code == 403  # neither Origin nor Referer
    names = [k["name"] for k in client.get("/api/v1/keys").json()["items"]]
    assert "shop" not in names
    created = client.post("/keys", data=form, headers={"Referer": "http://testserver/keys"})
    assert created.status_code == 200 and 'id="new-secret"' in created.text


def test_the_cookie_signs_in_api_gets_only(client, caller) -> None:
    sign_in(client, caller.key)
    job = client.post("/api/v1/jobs", json={"preset": "quick"}, headers=caller.headers).json()
    assert client.get(f"/api/v1/jobs/{job['id']}").status_code == 200  # cookie alone
    assert client.post(f"/api/v1/jobs/{job['id']}/cancel").status_code == 401  # not without Bearer
    assert client.post("/api/v1/keys", json={"name": "x"}).status_code == 401


def test_revoked_key_ends_the_session_and_tenancy_holds(client, caller, other_caller) -> None:
    theirs = client.post("/api/v1/jobs", json={"preset": "quick"}, headers=other_caller.headers).json()["id"]
    sign_in(client, caller.key)
    page = client.get(f"/jobs/{theirs}")
    assert page.status_code == 404 and f"no job with id {theirs}" in page.text
    assert client.get(f"/api/v1/jobs/{theirs}").status_code == 404
    assert client.get(f"/compare?a={theirs}").status_code == 404
    assert client.get(f"/models?id={theirs}").status_code == 404
    assert client.delete(f"/api/v1/keys/{caller.key_id}", headers=caller.headers).status_code == 204
    r = client.get("/jobs", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/login")
    assert client.get("/api/v1/jobs").status_code == 401
