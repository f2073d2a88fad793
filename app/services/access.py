"""What every request needs, to the API and the dashboard alike: the settings, a database session, the
artifact store, and the check of a key (by its secret's hash) against the process's key cache."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.core.config import Settings
from app.core.keys import KeyCache, KeyInfo
from app.core.storage import ArtifactStore
from app.problems import Problem


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
