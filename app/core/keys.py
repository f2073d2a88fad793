"""API keys: random secrets shown once, stored as sha256 hashes, with scopes, a query budget, an optional
expiry; revocation; and the per-process cache of key lookups that revocations are pushed to."""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.core.config import ALL_SCOPES
from app.core.models import ApiKey, utcnow

KEY_PREFIX = "cmim_"
PREDICT_ONLY: tuple[str, ...] = ("models:predict",)
# Revocations are looked for over this much past time on every poll, so that a lookup racing a
# revocation, or a revoker whose clock runs behind, is still caught by a later poll.
REVOKED_LOOKBACK = timedelta(minutes=2)


@dataclass(frozen=True)
class KeyInfo:
    """What a request needs of its API key; read once, then served from `KeyCache`."""

    id: uuid.UUID
    owner_id: uuid.UUID
    name: str
    prefix: str
    scopes: tuple[str, ...]
    query_budget: int | None
    rate_limit_per_minute: int | None
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None

    @classmethod
    def of(cls, row: ApiKey) -> KeyInfo:
        return cls(
            row.id,
            row.owner_id,
            row.name,
            row.prefix,
            tuple(row.scopes),
            row.query_budget,
            row.rate_limit_per_minute,
            row.created_at,
            row.expires_at,
            row.revoked_at,
        )

    def live(self, now: datetime | None = None) -> bool:
        """Neither revoked nor expired."""
        return self.revoked_at is None and (self.expires_at is None or (now or utcnow()) < self.expires_at)


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
    expires_at: datetime | None = None,
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
        rate_limit_per_minute=rate_limit_per_minute,
        expires_at=expires_at,
    )
    session.add(key)
    session.flush()
    return key, secret


def find_api_key(session: Session, secret: str) -> ApiKey | None:
    """The live (neither revoked nor expired) key with this secret, if any."""
    key = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_secret(secret)))
    return key if key is not None and KeyInfo.of(key).live() else None


def list_api_keys(session: Session, owner_id: uuid.UUID | None = None) -> list[ApiKey]:
    """The owner's keys (every key when owner_id is None), oldest first, revoked ones included."""
    q = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
    if owner_id is not None:
        q = q.where(ApiKey.owner_id == owner_id)
    return list(session.scalars(q))


def revoke_api_key(session: Session, key_id: uuid.UUID, owner_id: uuid.UUID | None = None) -> ApiKey | None:
    """Revoke the key (of this owner, when given); None when there is no such key. Idempotent."""
    key = session.get(ApiKey, key_id)
    if key is None or (owner_id is not None and key.owner_id != owner_id):
        return None
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        session.flush()
    return key


class KeyCache:
    """Key lookups by secret hash, cached per process for at most `ttl` seconds.

    Revocation reaches every process sooner: `poll` (run every `CMIM_KEY_POLL_SECONDS` by the app's
    background thread) drops every key revoked lately; `drop` does so at once in the revoking process.
    Expiry is checked on every use. Unknown secrets are not cached (a flood of them could evict real keys).
    """

    def __init__(self, sessions: sessionmaker[Session], ttl: float, size: int = 10_000) -> None:
        self.sessions, self.ttl, self.size = sessions, ttl, size
        self._items: OrderedDict[str, tuple[KeyInfo, float]] = OrderedDict()
        self._lock = threading.Lock()

    def cached(self, digest: str) -> KeyInfo | None:
        """The cached key for this secret hash, if fresh; no database access."""
        hit = self._items.get(digest)
        if hit is None or time.monotonic() - hit[1] > self.ttl:
            return None
        return hit[0]

    def load(self, digest: str) -> KeyInfo | None:
        """Look the key up in the database and cache it; None when unknown."""
        with self.sessions() as session:
            row = session.scalar(select(ApiKey).where(ApiKey.key_hash == digest))
            info = None if row is None else KeyInfo.of(row)
        if info is not None:
            with self._lock:
                self._items[digest] = (info, time.monotonic())
                self._items.move_to_end(digest)
                while len(self._items) > self.size:
                    self._items.popitem(last=False)
        return info

    def drop(self, ids: Iterable[uuid.UUID]) -> None:
        """Forget these keys: their next use reads the database again."""
        gone = set(ids)
        if not gone:
            return
        with self._lock:
            for digest in [d for d, (info, _) in self._items.items() if info.id in gone]:
                del self._items[digest]

    def poll(self) -> None:
        """Drop every key revoked within `REVOKED_LOOKBACK` (one indexed query)."""
        since = utcnow() - REVOKED_LOOKBACK
        with self.sessions() as session:
            self.drop(session.scalars(select(ApiKey.id).where(ApiKey.revoked_at >= since)))
