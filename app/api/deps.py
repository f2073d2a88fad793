"""FastAPI dependencies: settings, DB session, artifact store, the calling API key (cached) and its scopes."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer, SecurityScopes
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.core.config import Settings
from app.core.keys import KeyCache, KeyInfo, hash_secret
from app.core.storage import ArtifactStore
from app.problems import Problem, not_found
from app.web.session import session_digest

_bearer = HTTPBearer(auto_error=False, description="an API key: `Authorization: Bearer cmim_...`")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_session(request: Request) -> AsyncIterator[Session]:
    # Closed on the event loop, not in a worker thread: a request holding a connection must never
    # wait for a thread to give it back (threads blocked on a full pool would wait for it forever).
    session = request.app.state.sessions()
    try:
        yield session
    finally:
        session.close()


def get_store(request: Request) -> ArtifactStore:
    return request.app.state.store


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
StoreDep = Annotated[ArtifactStore, Depends(get_store)]


CHALLENGE = {"WWW-Authenticate": "Bearer"}


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


async def authorize(request: Request, digest: str, scopes: list[str]) -> KeyInfo:
    """The live API key with this secret hash, holding every scope in `scopes`; 401 or 403 otherwise."""
    cache: KeyCache = request.app.state.keys
    key = cache.cached(digest) or await run_in_threadpool(cache.load, digest)
    if key is None or key.revoked_at is not None:
        raise Problem(401, "unknown or revoked API key", slug="unauthenticated", headers=CHALLENGE)
    if not key.live():
        raise Problem(
            401,
            f"API key expired at {key.expires_at:%Y-%m-%dT%H:%M:%SZ}",
            slug="unauthenticated",
            headers=CHALLENGE,
        )
    missing = [s for s in scopes if s not in key.scopes]
    if missing:
        raise Problem(403, f"this API key lacks the scope(s) {', '.join(missing)}", slug="forbidden")
    return key


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
    opening a report, an artifact or an event stream), while that session lasts (`app.web.session`: one
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

M = TypeVar("M")


def get_owned(session: Session, model: type[M], ident: uuid.UUID, key: KeyInfo, kind: str) -> M:
    """The object with this id if the caller's owner owns it; otherwise the same 404 as for a missing id."""
    obj = session.get(model, ident)
    if obj is None or obj.owner_id != key.owner_id:  # type: ignore[attr-defined]
        raise not_found(kind, ident)
    return obj


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
