"""FastAPI dependencies: settings, DB session, artifact store, the calling API key and its scopes."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Annotated, TypeVar

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer, SecurityScopes
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.keys import find_api_key
from app.core.models import ApiKey
from app.core.storage import ArtifactStore
from app.problems import Problem, not_found

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


def current_key(
    scopes: SecurityScopes,
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> ApiKey:
    """The live API key named by the Bearer token, holding every scope the route asks for."""
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None:
        raise Problem(
            401,
            "missing API key: send `Authorization: Bearer <key>`",
            slug="unauthenticated",
            headers=challenge,
        )
    key = find_api_key(session, credentials.credentials)
    session.commit()  # the connection goes back to the pool while the request waits for its route
    if key is None:
        raise Problem(401, "unknown or revoked API key", slug="unauthenticated", headers=challenge)
    missing = [s for s in scopes.scopes if s not in key.scopes]
    if missing:
        raise Problem(403, f"this API key lacks the scope(s) {', '.join(missing)}", slug="forbidden")
    return key


def _caller(*scopes: str) -> object:
    return Security(current_key, scopes=list(scopes))


JobsRead = Annotated[ApiKey, _caller("jobs:read")]
JobsWrite = Annotated[ApiKey, _caller("jobs:write")]
DatasetsRead = Annotated[ApiKey, _caller("datasets:read")]
DatasetsWrite = Annotated[ApiKey, _caller("datasets:write")]
Predict = Annotated[ApiKey, _caller("models:predict")]
AnyKey = Annotated[ApiKey, _caller()]
KeysAdmin = Annotated[ApiKey, _caller("keys:admin")]

M = TypeVar("M")


def get_owned(session: Session, model: type[M], ident: uuid.UUID, key: ApiKey, kind: str) -> M:
    """The object with this id if the caller's owner owns it; otherwise the same 404 as for a missing id."""
    obj = session.get(model, ident)
    if obj is None or obj.owner_id != key.owner_id:  # type: ignore[attr-defined]
        raise not_found(kind, ident)
    return obj
