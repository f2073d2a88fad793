"""API keys: who am I, making narrower keys (predict-only by default), listing and revoking them."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from sqlalchemy import select

from app.api.deps import AnyKey, KeysAdmin, SessionDep, SettingsDep
from app.api.pagination import Cursor
from app.core.keys import PREDICT_ONLY, create_api_key, revoke_api_key
from app.core.models import ApiKey, utcnow
from app.problems import Problem, not_found, validation_problem
from app.services.schemas import KeyCreate, KeyCreated, KeyList, KeyOut

router = APIRouter(prefix="/keys", tags=["keys"])


@router.get("/me", response_model=KeyOut, summary="The calling key")
def me(key: AnyKey) -> KeyOut:
    return KeyOut.model_validate(key)


@router.get("", response_model=KeyList, summary="The owner's keys, revoked ones included")
def list_keys(
    key: KeysAdmin,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Cursor = None,
) -> KeyList:
    q = select(ApiKey).where(ApiKey.owner_id == key.owner_id).order_by(ApiKey.id)
    if cursor:
        try:
            q = q.where(ApiKey.id > uuid.UUID(cursor))
        except ValueError:
            error = {"loc": ["query", "cursor"], "msg": "invalid cursor", "type": "value_error"}
            raise validation_problem([error]) from None
    rows = list(session.scalars(q.limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return KeyList(
        items=[KeyOut.model_validate(r) for r in rows], next_cursor=str(rows[-1].id) if more else None
    )


@router.post("", status_code=201, response_model=KeyCreated, summary="Create a key for the same owner")
def create_key(body: KeyCreate, key: KeysAdmin, session: SessionDep, settings: SettingsDep) -> KeyCreated:
    # Least privilege: a key made here can only predict unless the request names its scopes, and it
    # never holds a scope its creator lacks (else a predict key could mint keys, each a fresh budget).
    scopes = body.scopes if body.scopes is not None else list(PREDICT_ONLY)
    extra = sorted(set(scopes) - set(key.scopes))
    if extra:
        raise Problem(403, f"a key cannot grant scopes it lacks: {', '.join(extra)}", slug="forbidden")
    if body.expires_at is not None and body.expires_at.tzinfo is None:
        error = {"loc": ["body", "expires_at"], "msg": "give a time zone (e.g. Z)", "type": "value_error"}
        raise validation_problem([error])
    if body.expires_at is not None and body.expires_at <= utcnow():
        # A key that is dead when made is a typo (a wrong year, local time read as UTC), never an intent.
        error = {
            "loc": ["body", "expires_at"],
            "msg": f"{body.expires_at.isoformat()} is not in the future: the key would never work; give a "
            "later time, or null for a key that does not expire",
            "type": "value_error",
        }
        raise validation_problem([error])
    budget = body.query_budget if "query_budget" in body.model_fields_set else settings.default_query_budget
    new, secret = create_api_key(
        session,
        owner_id=key.owner_id,
        name=body.name,
        scopes=scopes,
        query_budget=budget,
        rate_limit_per_minute=body.rate_limit_per_minute,
        expires_at=body.expires_at,
    )
    session.commit()
    return KeyCreated(**KeyOut.model_validate(new).model_dump(), key=secret)


@router.delete("/{key_id}", status_code=204, summary="Revoke a key (every API replica within a second)")
def revoke_key(key_id: uuid.UUID, key: KeysAdmin, session: SessionDep, request: Request) -> Response:
    if revoke_api_key(session, key_id, key.owner_id) is None:
        raise not_found("key", key_id)
    session.commit()
    request.app.state.keys.drop([key_id])  # this process at once; the others on their next poll
    return Response(status_code=204)
