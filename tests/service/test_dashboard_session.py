"""The dashboard's session and form protections over HTTP, on SQLite and PostgreSQL: the cookie's flags and
contents, the CSRF token and same-origin check on posts, the cookie on API GETs only; sessions kept
server-side, so that signing out, a revoked key or expiry ends them on every API replica; tenancy; and
production refusing to start without a session secret."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import timedelta

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from app.core.config import Settings, get_settings
from app.core.db import session_factory, session_scope
from app.core.keys import hash_secret
from app.core.models import DashboardSession, utcnow
from app.main import create_app
from app.services import sessions as web_session

ORIGIN = {"Origin": "http://testserver"}
SECRET = "a-session-secret-of-32-characters-or-more"


def csrf_of(page: httpx.Response) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)


def sign_in(client, key: str) -> str:  # noqa: ANN001 - a TestClient
    """Sign in with the key; returns the session's CSRF token."""
    token = csrf_of(client.get("/login"))
    r = client.post("/login", data={"csrf": token, "key": key, "next": "/keys"}, headers=ORIGIN)
    assert r.status_code == 200 and r.url.path == "/keys", r.text
    return csrf_of(r)


def sent_to_sign_in(client: TestClient, path: str = "/keys") -> str:
    """The reason code of the sign-in page a dashboard page sends the client to ('' for none)."""
    r = client.get(path, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/login"), (r.status_code, r.text)
    reason = re.search(r"reason=(\w+)", r.headers["location"])
    return reason.group(1) if reason else ""


@pytest.fixture
def replicas(settings: Settings) -> Iterator[tuple[TestClient, TestClient]]:
    """Two API processes with the same configured session secret and database, as deployed."""
    shared = settings.model_copy(update={"session_secret": SECRET})
    with TestClient(create_app(shared)) as a, TestClient(create_app(shared)) as b:
        yield a, b


def test_session_cookie_is_httponly_strict_signed_and_holds_no_key(client, caller, settings) -> None:
    token = csrf_of(client.get("/login"))
    r = client.post("/login", data={"csrf": token, "key": caller.key}, headers=ORIGIN, follow_redirects=False)
    assert r.status_code == 303
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    value = client.cookies[web_session.COOKIE]
    assert caller.key not in value and caller.key.split("_", 1)[1][:20] not in value
    assert client.get("/jobs").status_code == 200
    # The server keeps the session by the hash of its id: the database holds neither the id nor the key.
    session_id, signed_in = client.app.state.web_sessions.read_cookie(value)
    with session_scope(settings.database_url) as s:
        row = s.get(DashboardSession, hash_secret(session_id))
        assert signed_in and row is not None and row.key_hash == hash_secret(caller.key)
        assert s.get(DashboardSession, session_id) is None
    # A tampered cookie signs nobody in.
    client.cookies.set(web_session.COOKIE, value[:-4] + ("AAAA" if value[-4:] != "AAAA" else "BBBB"))
    assert sent_to_sign_in(client, "/jobs") == ""
    # Nor does a recorded session whose cookie is signed without the server's secret.
    other = web_session.SessionStore(b"x" * 32, session_factory(settings.database_url))
    client.cookies.set(web_session.COOKIE, other.cookie(other.sign_in(hash_secret(caller.key))))
    assert sent_to_sign_in(client, "/jobs") == ""


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


def test_sign_out_ends_the_session_on_every_replica(replicas, caller) -> None:
    a, b = replicas
    token = sign_in(a, caller.key)
    copied = a.cookies[web_session.COOKIE]
    # The session opened on replica A works on replica B: same secret, same database.
    b.cookies.set(web_session.COOKIE, copied)
    assert b.get("/keys").status_code == 200 and b.get("/api/v1/jobs").status_code == 200
    signed_out = a.post("/logout", data={"csrf": token}, headers=ORIGIN, follow_redirects=False)
    assert signed_out.status_code == 303 and web_session.COOKIE not in a.cookies
    # The cookie copied before signing out signs in nobody, on either replica, at the dashboard or the API.
    for replica in (a, b):
        replica.cookies.set(web_session.COOKIE, copied)
        assert sent_to_sign_in(replica) == "ended"
        assert replica.get("/api/v1/jobs").status_code == 401
    page = b.get("/keys")  # followed to the sign-in page, which says why
    assert page.url.path == "/login" and "Your session has ended" in page.text


def test_revoking_the_key_ends_its_sessions_on_every_replica(replicas, caller) -> None:
    a, b = replicas
    sign_in(a, caller.key)
    copied = a.cookies[web_session.COOKIE]
    assert a.delete(f"/api/v1/keys/{caller.key_id}", headers=caller.headers).status_code == 204
    b.cookies.set(web_session.COOKIE, copied)
    for replica in (a, b):
        assert sent_to_sign_in(replica) == "key"
        assert replica.get("/api/v1/jobs").status_code == 401
    assert "has been revoked or has expired" in b.get("/keys").text


def test_an_expired_session_ends_and_its_record_is_cleared(client, caller, settings) -> None:
    sign_in(client, caller.key)
    copied = client.cookies[web_session.COOKIE]
    session_id, _ = client.app.state.web_sessions.read_cookie(copied)
    with session_scope(settings.database_url) as s:
        s.execute(
            update(DashboardSession)
            .where(DashboardSession.id_hash == hash_secret(session_id))
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
    assert sent_to_sign_in(client) == "ended"
    client.cookies.set(web_session.COOKIE, copied)
    assert client.get("/api/v1/jobs").status_code == 401
    client.cookies.clear()
    sign_in(client, caller.key)  # the next sign-in deletes the records past their expiry
    with session_scope(settings.database_url) as s:
        assert s.get(DashboardSession, hash_secret(session_id)) is None
        expired = DashboardSession.expires_at < utcnow()
        assert s.scalar(select(func.count()).select_from(DashboardSession).where(expired)) == 0


def test_another_owners_objects_are_not_found(client, caller, other_caller) -> None:
    theirs = client.post("/api/v1/jobs", json={"preset": "quick"}, headers=other_caller.headers).json()["id"]
    sign_in(client, caller.key)
    page = client.get(f"/jobs/{theirs}")
    assert page.status_code == 404 and f"no job with id {theirs}" in page.text
    assert client.get(f"/api/v1/jobs/{theirs}").status_code == 404
    assert client.get(f"/compare?a={theirs}").status_code == 404
    assert client.get(f"/models?id={theirs}").status_code == 404


def test_production_refuses_to_start_without_a_session_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CMIM_ENVIRONMENT", "production")
    monkeypatch.setenv("CMIM_DATABASE_URL", "postgresql+psycopg://cmim:pg-password@db:5432/cmim")
    monkeypatch.delenv("CMIM_SESSION_SECRET", raising=False)
    get_settings.cache_clear()
    try:
        with pytest.raises(SystemExit) as refused:
            create_app()
        monkeypatch.setenv("CMIM_SESSION_SECRET", SECRET)
        monkeypatch.setenv("CMIM_SECRET_KEY", "x" * 43 + "=")  # the stored secrets' key, also required
        get_settings.cache_clear()
        assert get_settings().session_secret == SECRET
    finally:
        get_settings.cache_clear()
    message = str(refused.value)
    assert message.startswith("cmim: invalid settings: CMIM_SESSION_SECRET must be set in production")
    assert "\n" not in message and "pg-password" not in message  # one line, and no setting's value
