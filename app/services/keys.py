"""API keys of an owner: listing them (newest first, the one cursor scheme), making narrower keys
(predict-only by default, never a scope the maker lacks) and revoking them on every API process."""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.keys import PREDICT_ONLY, KeyCache, KeyInfo, create_api_key, revoke_api_key
from app.core.models import ApiKey, utcnow
from app.problems import Problem, not_found, validation_problem
from app.services.pagination import newest_first
from app.services.schemas import KeyCreate, KeyCreated, KeyList, KeyOut


def list_keys(session: Session, key: KeyInfo, limit: int, cursor: str | None) -> KeyList:
    """The owner's keys, revoked ones included, newest first."""
    q = select(ApiKey).where(ApiKey.owner_id == key.owner_id)
    rows, next_cursor = newest_first(session, q, ApiKey.created_at, ApiKey.id, limit, cursor)
    return KeyList(items=[KeyOut.model_validate(r) for (r,) in rows], next_cursor=next_cursor)


def all_keys(session: Session, key: KeyInfo) -> list[KeyOut]:
    """Every key of the owner (a page that shows them all), newest first."""
    found, cursor = [], None
    while True:
        page = list_keys(session, key, 1000, cursor)
        found += page.items
        if (cursor := page.next_cursor) is None:
            return found


def create_key(session: Session, settings: Settings, key: KeyInfo, body: KeyCreate) -> KeyCreated:
    """A new key of the caller's owner; its secret is in the answer and nowhere else."""
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


def revoke_key(session: Session, cache: KeyCache, key: KeyInfo, key_id: uuid.UUID) -> None:
    """Revoke one of the owner's keys: this process at once, the others on their next poll; 404 otherwise."""
    if revoke_api_key(session, key_id, key.owner_id) is None:
        raise not_found("key", key_id)
    session.commit()
    cache.drop([key_id])
