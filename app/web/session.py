"""Dashboard sessions: a signed, HttpOnly, SameSite=Strict cookie naming the signed-in API key by its hash,
a CSRF token per session, and the same-origin check every form post passes.

The cookie never holds the key itself: it holds the key's sha256 (what the database stores), a random
nonce and when it was issued, signed with the server's session secret (`CMIM_SESSION_SECRET`), so that
neither a leaked key hash nor a forged cookie signs anyone in. The CSRF token is an HMAC of the nonce.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import Response

COOKIE = "cmim_session"
MAX_AGE_S = 12 * 3600  # a session ends after this long, or at once when its key is revoked or expires


@dataclass(frozen=True)
class WebSession:
    """What the cookie says: the signed-in key's hash (None before signing in), the nonce, the issue time."""

    digest: str | None
    nonce: str
    issued: float

    def csrf(self, secret: bytes) -> str:
        """This session's CSRF token (sent in every form's hidden field)."""
        return hmac.new(secret, b"csrf:" + self.nonce.encode(), hashlib.sha256).hexdigest()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _sign(secret: bytes, payload: str) -> str:
    return _b64(hmac.new(secret, payload.encode(), hashlib.sha256).digest())


def encode(secret: bytes, session: WebSession) -> str:
    payload = _b64(json.dumps([session.digest, session.nonce, session.issued]).encode())
    return f"{payload}.{_sign(secret, payload)}"


def decode(secret: bytes, value: str | None) -> WebSession | None:
    """The session of a cookie value when its signature holds and it has not aged out; None otherwise."""
    if not value or value.count(".") != 1:
        return None
    payload, signature = value.split(".")
    if not hmac.compare_digest(signature, _sign(secret, payload)):
        return None
    try:
        digest, nonce, issued = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except ValueError:
        return None
    if not isinstance(issued, int | float) or not 0 <= time.time() - issued <= MAX_AGE_S:
        return None
    return WebSession(digest, str(nonce), float(issued))


def new_session(digest: str | None = None) -> WebSession:
    return WebSession(digest, secrets.token_urlsafe(16), time.time())


def secret_of(request: Request) -> bytes:
    return request.app.state.session_secret


def current(request: Request) -> WebSession | None:
    """The request's valid session cookie, if any."""
    return decode(secret_of(request), request.cookies.get(COOKIE))


def session_digest(request: Request) -> str | None:
    """The key hash of the request's signed-in session (None without one): how the API accepts the cookie."""
    session = current(request)
    return None if session is None else session.digest


def set_cookie(request: Request, response: Response, session: WebSession) -> None:
    response.set_cookie(
        COOKIE,
        encode(secret_of(request), session),
        max_age=MAX_AGE_S,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )


def clear_cookie(response: Response) -> None:
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")


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
    return hmac.compare_digest(token, session.csrf(secret_of(request)))
