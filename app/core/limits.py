"""Rate limits and query budgets on the predict hot path, without a database round trip per request.

Every request is first counted against its key's rate limit (a sliding 60 s window), then reserves its
rows on three counters at once, or on none: the (key, model), (owner, model) and (model) counters, each
against its cap. Deployed (a Redis broker configured) both live in Redis and one Lua script does the
whole check-and-reserve atomically, so every API replica shares them; embedded they live in the API
process under one lock. Either way the counters are written back to `query_usage` in batches by the
app's background thread, and a counter is seeded from there the first time it is used (after a
restart, or after Redis lost it): at most the last write-back interval of counts can be lost.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import anyio.to_thread
from sqlalchemy import func, select, tuple_
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session, sessionmaker

from app.core.coalesce import Coalescer
from app.core.models import QueryUsage, utcnow
from ml.served import first_exhausted

log = logging.getLogger(__name__)
Scope = Literal["key", "owner", "global"]
SCOPES: tuple[Scope, ...] = ("key", "owner", "global")
WINDOW_SECONDS = 60


@dataclass(frozen=True)
class Counter:
    """One usage counter: rows answered by `model` for a key, an owner, or everyone (subject = model)."""

    scope: Scope
    subject: uuid.UUID
    model: uuid.UUID


@dataclass(frozen=True)
class Cap:
    """A counter and its limit (None: counted, not capped), with why that limit applies."""

    counter: Counter
    limit: int | None
    reason: str


@dataclass(frozen=True)
class Admission:
    """The outcome of one request: its rate limit state, and the budget that ran out, if one did."""

    rate_ok: bool
    rate_remaining: int
    rate_reset: int  # seconds until a slot frees
    used: tuple[int, ...]  # per cap, after this request's rows (before them when refused)
    exhausted: int | None = None  # index of the first cap the rows did not fit in


def counters_for(key_id: uuid.UUID, owner_id: uuid.UUID, model_id: uuid.UUID) -> tuple[Counter, ...]:
    """The three counters a request on model_id by this key is charged to."""
    return (
        Counter("key", key_id, model_id),
        Counter("owner", owner_id, model_id),
        Counter("global", model_id, model_id),
    )


# ---------------------------------------------------------------- the durable copy in the database


def read_usage(session: Session, counters: list[Counter]) -> dict[Counter, int]:
    """The stored counts of these counters (0 for a counter never written)."""
    found = session.execute(
        select(QueryUsage.scope, QueryUsage.subject_id, QueryUsage.model_id, QueryUsage.used).where(
            tuple_(QueryUsage.scope, QueryUsage.subject_id, QueryUsage.model_id).in_(
                [(c.scope, c.subject, c.model) for c in counters]
            )
        )
    )
    stored = {Counter(s, k, m): used for s, k, m, used in found}
    return {c: stored.get(c, 0) for c in counters}


def write_usage(session: Session, values: dict[Counter, int]) -> None:
    """Store these counts; a count never goes down, so replicas writing one counter in any order agree."""
    if not values:
        return
    dialect = session.get_bind().dialect.name
    insert, greatest = (pg_insert, func.greatest) if dialect == "postgresql" else (sqlite_insert, func.max)
    rows = [
        {"scope": c.scope, "subject_id": c.subject, "model_id": c.model, "used": v, "updated_at": utcnow()}
        for c, v in sorted(values.items(), key=lambda kv: (kv[0].scope, str(kv[0].subject), str(kv[0].model)))
    ]
    stmt = insert(QueryUsage).values(rows)
    stmt = stmt.on_conflict_do_update(
        index_elements=["scope", "subject_id", "model_id"],
        set_={"used": greatest(QueryUsage.used, stmt.excluded.used), "updated_at": stmt.excluded.updated_at},
    )
    session.execute(stmt)


# ---------------------------------------------------------------- back ends


class Limits(Protocol):
    """Where rate limits and budget counters live: this process (embedded) or Redis (deployed)."""

    async def admit(self, key_id: uuid.UUID, rate: int, caps: list[Cap], rows: int) -> Admission: ...

    async def usage(self, counters: list[Counter]) -> list[int]: ...

    def flush(self) -> None: ...


class MemoryLimits:
    """Embedded: counters and rate windows in this process (one API process), written back in batches."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions
        self._used: dict[Counter, int] = {}
        self._dirty: set[Counter] = set()
        self._hits: dict[uuid.UUID, deque[float]] = {}
        self._lock = threading.Lock()

    def _seed(self, counters: list[Counter]) -> None:
        with self.sessions() as session:
            stored = read_usage(session, counters)
        with self._lock:
            for c, v in stored.items():
                self._used.setdefault(c, v)

    async def _ensure(self, counters: list[Counter]) -> None:
        missing = [c for c in counters if c not in self._used]
        if missing:
            await anyio.to_thread.run_sync(self._seed, missing)

    async def admit(self, key_id: uuid.UUID, rate: int, caps: list[Cap], rows: int) -> Admission:
        await self._ensure([c.counter for c in caps])
        now = time.monotonic()
        with self._lock:
            hits = self._hits.setdefault(key_id, deque())
            while hits and hits[0] <= now - WINDOW_SECONDS:
                hits.popleft()
            used = tuple(self._used[c.counter] for c in caps)
            if len(hits) >= rate:
                return Admission(False, 0, max(math.ceil(hits[0] + WINDOW_SECONDS - now), 1), used)
            hits.append(now)
            remaining, reset = rate - len(hits), max(math.ceil(hits[0] + WINDOW_SECONDS - now), 1)
            exhausted = first_exhausted([cap.limit for cap in caps], used, rows)
            if exhausted is not None:
                return Admission(True, remaining, reset, used, exhausted=exhausted)
            for cap in caps:
                self._used[cap.counter] += rows
                self._dirty.add(cap.counter)
            return Admission(True, remaining, reset, tuple(u + rows for u in used))

    async def usage(self, counters: list[Counter]) -> list[int]:
        await self._ensure(counters)
        return [self._used[c] for c in counters]

    def flush(self) -> None:
        """Write the counters changed since the last flush to the database, in one transaction."""
        with self._lock:
            values = {c: self._used[c] for c in self._dirty}
            self._dirty.clear()
        if not values:
            return
        try:
            with self.sessions() as session, session.begin():
                write_usage(session, values)
        except Exception:
            with self._lock:  # written next time
                self._dirty |= set(values)
            raise


# KEYS: rate window, dirty set, then the counters. ARGV: rate limit, window, rows, a unique member,
# then one limit per counter (-1: none). Returns {status, rate remaining, rate reset, index, used...}:
# status 1 admitted, 0 rate limited, 2 budget exhausted (index: which counter, from 1), -1 a counter
# is missing and must be seeded from the database first (nothing was counted).
_ADMIT = """
local used = {}
for i = 3, #KEYS do
  local v = redis.call('GET', KEYS[i])
  if not v then return {-1, 0, 0, i - 2} end
  used[#used + 1] = tonumber(v)
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local count = redis.call('ZCARD', KEYS[1])
local function reset()
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  if #oldest == 0 then return math.ceil(window) end
  return math.max(math.ceil(tonumber(oldest[2]) + window - now), 1)
end
if count >= tonumber(ARGV[1]) then
  local out = {0, 0, reset(), 0}
  for i = 1, #used do out[#out + 1] = used[i] end
  return out
end
redis.call('ZADD', KEYS[1], now, ARGV[4])
redis.call('EXPIRE', KEYS[1], math.ceil(window) + 1)
local remaining = tonumber(ARGV[1]) - count - 1
local rows = tonumber(ARGV[3])
for i = 1, #used do
  local limit = tonumber(ARGV[4 + i])
  if limit >= 0 and used[i] + rows > limit then
    local out = {2, remaining, reset(), i}
    for j = 1, #used do out[#out + 1] = used[j] end
    return out
  end
end
local out = {1, remaining, reset(), 0}
for i = 3, #KEYS do
  out[#out + 1] = redis.call('INCRBY', KEYS[i], rows)
  redis.call('SADD', KEYS[2], KEYS[i])
end
return out
"""


class RedisLimits:
    """Deployed: rate windows and counters in Redis, shared by every API replica; one script per request."""

    def __init__(self, url: str, prefix: str, sessions: sessionmaker[Session]) -> None:
        import redis

        self.url, self.prefix, self.sessions = url, prefix, sessions
        self._sync = redis.Redis.from_url(url)
        self._clients: dict[int, Any] = {}  # one asyncio client per event loop (TestClient runs several)
        self._sha = hashlib.sha1(_ADMIT.encode()).hexdigest()  # how Redis names a script it has loaded
        self._dirty = f"{prefix}:usage:dirty"

    def _client(self) -> tuple[Any, Coalescer[tuple[list, list], list]]:
        """This event loop's client, and its coalescer of script calls (one pipeline per batch)."""
        import asyncio

        import redis.asyncio

        loop = id(asyncio.get_running_loop())
        if loop not in self._clients:
            client = redis.asyncio.Redis.from_url(self.url)

            async def run(calls: list[tuple[list, list]]) -> list[list | BaseException]:
                # One round trip for the requests that arrived together, instead of one each.
                for attempt in range(2):
                    pipe = client.pipeline(transaction=False)
                    for keys, args in calls:
                        pipe.evalsha(self._sha, len(keys), *keys, *args)
                    results = await pipe.execute(raise_on_error=False)
                    if attempt or not any(isinstance(r, redis.exceptions.NoScriptError) for r in results):
                        return results
                    await client.script_load(_ADMIT)  # Redis restarted and forgot the script
                return results

            self._clients[loop] = (client, Coalescer(run))
        return self._clients[loop]

    def _name(self, c: Counter) -> str:
        return f"{self.prefix}:usage:{c.scope}:{c.subject}:{c.model}"

    def _counter(self, name: bytes) -> Counter:
        scope, subject, model = name.decode().rsplit(":", 3)[1:]
        return Counter(scope, uuid.UUID(subject), uuid.UUID(model))  # type: ignore[arg-type]

    def _seed(self, counters: list[Counter]) -> None:
        with self.sessions() as session:
            stored = read_usage(session, counters)
        pipe = self._sync.pipeline()
        for c, v in stored.items():
            pipe.set(self._name(c), v, nx=True)  # a replica that seeded first (and counted since) wins
        pipe.execute()

    async def admit(self, key_id: uuid.UUID, rate: int, caps: list[Cap], rows: int) -> Admission:
        _, call = self._client()
        keys = [f"{self.prefix}:rate:{key_id}", self._dirty, *(self._name(c.counter) for c in caps)]
        args = [
            rate,
            WINDOW_SECONDS,
            rows,
            uuid.uuid4().hex,
            *(-1 if c.limit is None else c.limit for c in caps),
        ]
        while True:
            status, remaining, reset, index, *used = await call((keys, args))
            if status != -1:
                break
            await anyio.to_thread.run_sync(self._seed, [c.counter for c in caps])
        used_t = tuple(int(u) for u in used)
        if status == 0:
            return Admission(False, 0, int(reset), used_t)
        return Admission(
            True, int(remaining), int(reset), used_t, exhausted=index - 1 if status == 2 else None
        )

    async def usage(self, counters: list[Counter]) -> list[int]:
        client, _ = self._client()
        values = await client.mget([self._name(c) for c in counters])
        if any(v is None for v in values):
            await anyio.to_thread.run_sync(self._seed, counters)
            values = await client.mget([self._name(c) for c in counters])
        return [int(v or 0) for v in values]

    def flush(self) -> None:
        """Write back the counters any replica changed since they were last written (SPOP: each once)."""
        while names := self._sync.spop(self._dirty, 500):
            values = self._sync.mget(names)
            batch = {self._counter(n): int(v) for n, v in zip(names, values, strict=True) if v is not None}
            try:
                with self.sessions() as session, session.begin():
                    write_usage(session, batch)
            except Exception:
                self._sync.sadd(self._dirty, *names)  # written next time
                raise


def make_limits(broker_url: str | None, prefix: str, sessions: sessionmaker[Session]) -> Limits:
    """Redis when a broker is configured (deployed, shared by replicas), else this process (embedded)."""
    return RedisLimits(broker_url, prefix, sessions) if broker_url else MemoryLimits(sessions)


class Background:
    """A daemon thread running `tasks` (interval seconds, function) until `stop`; errors are logged."""

    def __init__(self, tasks: list[tuple[float, Any]], last_run: bool = True) -> None:
        self.tasks, self.last_run = tasks, last_run
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cmim-background", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        due = [0.0] * len(self.tasks)
        tick = min(interval for interval, _ in self.tasks)
        while not self._stop.wait(tick):
            now = time.monotonic()
            for i, (interval, fn) in enumerate(self.tasks):
                if now >= due[i]:
                    due[i] = now + interval
                    _logged(fn)

    def stop(self) -> None:
        """Stop the thread, then (`last_run`) run every task once more: the last counts reach the database."""
        self._stop.set()
        self._thread.join(timeout=10)
        for _, fn in self.tasks if self.last_run else []:
            _logged(fn)


def _logged(fn: Any) -> None:
    try:
        fn()
    except Exception:  # noqa: BLE001 - a database or broker outage must not end the thread or the app
        log.exception("background task %s failed", getattr(fn, "__qualname__", fn))
