"""FastAPI dependencies of the API: the calling API key (cached; a GET may also be signed in by the
dashboard's session) and its scopes, and the upload slots. Settings, DB session and store are in
`app.services.access`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer, SecurityScopes

from app.core.keys import KeyInfo, hash_secret
from app.problems import Problem
from app.services.access import CHALLENGE, authorize
from app.services.sessions import session_digest

_bearer = HTTPBearer(auto_error=False, description="an API key: `Authorization: Bearer cmim_...`")


async def authenticate(request: Request, token: str | None, scopes: list[str]) -> KeyInfo:
    """The live API key with this secret, holding every scope in `scopes`; 401 or 403 otherwise.

    Served from the process's key cache (`KeyCache`): the database is read only on a miss."""
    if token is None:
        raise Problem(
            401,
            "missing API key: send `Authorization: Bearer <key>`",
            slug="unauthenticated",
            headers=CHALLENGE,
        )
    return await authorize(request, hash_secret(token), scopes)


def bearer_token(request: Request) -> str | None:
    """The token of an `Authorization: Bearer` header, if any (what `HTTPBearer` reads, without its cost)."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


async def current_key(
    scopes: SecurityScopes,
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> KeyInfo:
    """The calling key, for routes that declare their scopes as a dependency (see `authenticate`).

    Without a Bearer header, a GET may be signed in by the dashboard's session cookie instead (a browser
    opening a report, an artifact or an event stream), while that session lasts (`app.services.sessions`: one
    database read); anything else needs the header (no CSRF by cookie)."""
    if credentials is None and request.method in ("GET", "HEAD"):
        digest = await session_digest(request)
        if digest is not None:
            return await authorize(request, digest, scopes.scopes)
    return await authenticate(request, credentials.credentials if credentials else None, scopes.scopes)


# The predict hot path authenticates in the route itself (`authenticate(request, bearer_token(request),
# PREDICT_SCOPES)`): FastAPI's dependency solving cost more than the rest of the request's protection.
PREDICT_SCOPES = ["models:predict"]
BEARER_DOC: dict[str, Any] = {"security": [{"HTTPBearer": []}]}


def _caller(*scopes: str) -> object:
    return Security(current_key, scopes=list(scopes))


JobsRead = Annotated[KeyInfo, _caller("jobs:read")]
JobsWrite = Annotated[KeyInfo, _caller("jobs:write")]
DatasetsRead = Annotated[KeyInfo, _caller("datasets:read")]
DatasetsWrite = Annotated[KeyInfo, _caller("datasets:write")]
Predict = Annotated[KeyInfo, _caller("models:predict")]
AnyKey = Annotated[KeyInfo, _caller()]
KeysAdmin = Annotated[KeyInfo, _caller("keys:admin")]


@contextmanager
def upload_slot(request: Request) -> Iterator[None]:
    """One of the process's upload slots for the duration of an upload's validation; 503 when none is free
    (each upload may hold its decompressed contents in memory)."""
    slots = request.app.state.upload_slots
    if not slots.acquire(blocking=False):
        limit = request.app.state.settings.max_concurrent_uploads
        raise Problem(
            503,
            f"{limit} uploads are being validated already; retry shortly",
            slug="uploads-busy",
            headers={"Retry-After": "5"},
        )
    try:
        yield
    finally:
        slots.release()
