"""Dashboard sessions: an HttpOnly, SameSite=Strict cookie naming a session that the server keeps, a CSRF
token per session, and the same-origin check every form post passes.

Signing in records the session in the database (`DashboardSession`: the sha256 of a random session id, the
signed-in key's hash, when it expires) and gives the browser the id, signed with the server's session
secret (`CMIM_SESSION_SECRET`, by itsdangerous). Every signed-in request reads that record (one primary-key
lookup), so a session ends on every API process at once: signing out marks it revoked, it expires after
MAX_AGE_S, and a revoked or expired key ends it at its next request (the key is checked on every request,
exactly as for `Authorization: Bearer`). The cookie never holds the key, and the database never holds the
session id. Before signing in, the cookie holds a signed id and no record: enough for the sign-in form's
CSRF token, which is the session id signed under a salt of its own.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from datetime import timedelta
from urllib.parse import urlsplit

from itsdangerous import BadSignature, Signer, URLSafeTimedSerializer
from sqlalchemy import delete, update
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from app.core.keys import hash_secret
from app.core.models import DashboardSession, utcnow

COOKIE = "cmim_session"
MAX_AGE_S = 12 * 3600  # a session ends after this long, or sooner: signed out, or its key revoked or expired


@dataclass(frozen=True)
class WebSession:
    """A browser's session: its random id (only the browser holds it) and the signed-in key's hash (None
    before signing in)."""

    id: str
    digest: str | None


class SessionStore:
    """Signs session cookies and CSRF tokens with the server's secret; keeps signed-in sessions in the
    database, where any API process sharing the secret and the database finds them."""

    def __init__(self, secret: bytes, sessions: sessionmaker[Session]) -> None:
        self._cookies = URLSafeTimedSerializer(secret, salt="cmim-session")
        self._csrf = Signer(secret, salt="cmim-csrf")
        self._sessions = sessions

    @staticmethod
    def anonymous() -> WebSession:
        """A session before signing in: nothing is recorded."""
        return WebSession(secrets.token_urlsafe(32), None)

    def sign_in(self, digest: str) -> WebSession:
        """A new session of the key with this hash, recorded (a new id each time: no fixation). Records past
        their expiry are deleted on the way, so the table holds at most MAX_AGE_S of sign-ins."""
        session = WebSession(secrets.token_urlsafe(32), digest)
        now = utcnow()
        with self._sessions.begin() as db:
            db.execute(delete(DashboardSession).where(DashboardSession.expires_at < now))
            db.add(
                DashboardSession(
                    id_hash=hash_secret(session.id),
                    key_hash=digest,
                    created_at=now,
                    expires_at=now + timedelta(seconds=MAX_AGE_S),
                )
            )
        return session

    def end(self, session: WebSession) -> None:
        """Sign the session out: its cookie, wherever it was copied to, signs in nobody from now on."""
        with self._sessions.begin() as db:
            db.execute(
                update(DashboardSession)
                .where(DashboardSession.id_hash == hash_secret(session.id))
                .where(DashboardSession.revoked_at.is_(None))
                .values(revoked_at=utcnow())
            )

    def lookup(self, session_id: str) -> WebSession | None:
        """The signed-in session with this id, if it is recorded, not signed out and not expired."""
        with self._sessions() as db:
            row = db.get(DashboardSession, hash_secret(session_id))
            if row is None or row.revoked_at is not None or row.expires_at <= utcnow():
                return None
            return WebSession(session_id, row.key_hash)

    def cookie(self, session: WebSession) -> str:
        return self._cookies.dumps([session.id, session.digest is not None])

    def read_cookie(self, value: str) -> tuple[str, bool] | None:
        """(session id, signed in) of a cookie whose signature holds and that is under MAX_AGE_S old."""
        try:
            session_id, signed_in = self._cookies.loads(value, max_age=MAX_AGE_S)
        except BadSignature:  # SignatureExpired included
            return None
        return str(session_id), bool(signed_in)

    def csrf(self, session: WebSession) -> str:
        """The session's CSRF token (sent in every form's hidden field)."""
        return self._csrf.get_signature(session.id).decode()


def store_of(request: Request) -> SessionStore:
    return request.app.state.web_sessions


async def resolve(request: Request) -> WebSession | None:
    """The request's session (None without a live one), read once per request; a signed-in cookie costs
    one database read, done off the event loop. Every dashboard route and the API's cookie sign-in call
    this first; `current` then answers from what it read."""
    if not hasattr(request.state, "web_session"):
        store, session, ended = store_of(request), None, False
        value = request.cookies.get(COOKIE)
        parsed = store.read_cookie(value) if value else None
        if parsed is not None:
            session_id, signed_in = parsed
            if signed_in:
                session = await run_in_threadpool(store.lookup, session_id)
                ended = session is None
            else:
                session = WebSession(session_id, None)
        request.state.web_session, request.state.web_session_ended = session, ended
    return request.state.web_session


def current(request: Request) -> WebSession | None:
    """The request's session, as `resolve` read it."""
    return request.state.web_session


def ended(request: Request) -> bool:
    """True when the request's cookie named a signed-in session that has ended (signed out or expired)."""
    return request.state.web_session_ended


async def session_digest(request: Request) -> str | None:
    """The key hash of the request's signed-in session (None without one): how the API accepts the cookie."""
    session = await resolve(request)
    return None if session is None else session.digest


def set_cookie(request: Request, response: Response, session: WebSession) -> None:
    response.set_cookie(
        COOKIE,
        store_of(request).cookie(session),
        max_age=MAX_AGE_S,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )


def clear_cookie(response: Response) -> None:
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")


def csrf_token(request: Request, session: WebSession | None) -> str:
    """The token for the forms of a page shown in this session ('' without one)."""
    return store_of(request).csrf(session) if session else ""


def same_origin(request: Request) -> bool:
    """True when the post comes from a page of this server: its Origin (else its Referer) names our host."""
    source = request.headers.get("origin") or request.headers.get("referer")
    if not source or source == "null":
        return False
    parts = urlsplit(source)
    return parts.scheme in ("http", "https") and parts.netloc == request.headers.get("host")


def csrf_ok(request: Request, session: WebSession | None, token: str | None) -> bool:
    """The form's token is this session's, and the post is same-origin."""
    if session is None or not token or not same_origin(request):
        return False
    return hmac.compare_digest(token, store_of(request).csrf(session))
