"""API keys: random secrets shown once, stored as sha256 hashes, with scopes and a query budget."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.config import ALL_SCOPES
from app.core.models import ApiKey

KEY_PREFIX = "cmim_"


def hash_secret(secret: str) -> str:
    """sha256 hex of a key's secret: what the database stores and looks keys up by."""
    return hashlib.sha256(secret.encode()).hexdigest()


def create_api_key(
    session: Session,
    *,
    owner_id: uuid.UUID | None = None,
    name: str = "default",
    scopes: Iterable[str] = ALL_SCOPES,
    query_budget: int | None = None,
    rate_limit_per_minute: int | None = None,
) -> tuple[ApiKey, str]:
    """A new key (for a new owner unless owner_id is given); returns the row and the secret, shown once."""
    scopes = list(dict.fromkeys(scopes))
    unknown = sorted(set(scopes) - set(ALL_SCOPES))
    if unknown:
        raise ValueError(f"unknown scope(s) {', '.join(unknown)}; valid choices: {', '.join(ALL_SCOPES)}")
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(
        owner_id=owner_id or uuid.uuid4(),
        name=name,
        prefix=secret[: len(KEY_PREFIX) + 6],
        key_hash=hash_secret(secret),
        scopes=scopes,
        query_budget=query_budget,
        queries_used=0,
        rate_limit_per_minute=rate_limit_per_minute,
    )
    session.add(key)
    session.flush()
    return key, secret


def find_api_key(session: Session, secret: str) -> ApiKey | None:
    """The live (not revoked) key with this secret, if any."""
    key = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_secret(secret)))
    return key if key is not None and key.revoked_at is None else None
