"""The extraction monitor in the service: hits counted on the predict path, statistics kept per key and per
model, alerts stored and acted on (`ml.monitor` has the statistic, `app.core.enforcement` the actions).

The hot path only tests a request's rows against the model's bank of recent queries (in this process) and
adds (rows, hits) to a pending count per (model, key): no network, no database. The app's background
thread (`flush`) applies the pending counts to the CUSUM statistics and stores the alerts they raise.
Embedded, the statistics live in this process (`ml.monitor.ModelMonitor`); deployed (a Redis broker
configured), in Redis, updated by one Lua script per (model, key), so that the keys of one attacker are
counted together whichever API replica answered them. Each replica keeps its own bank: a query is
compared with the recent queries that replica answered.
"""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from sqlalchemy.orm import Session, sessionmaker

from app.core.enforcement import Enforcement, Outcome
from app.core.models import MonitorAlert
from app.core.queue import append_event
from app.services.serving import ServedModel
from ml.served import Alert, ModelMonitor, Reference, suspect_keys

KEY_TTL_SECONDS = 90 * 86400  # a key's statistics in Redis outlive 90 idle days
MODELS_KEPT = 1000  # embedded: models whose statistics stay in memory, least recently used dropped first
UNSAVED_KEPT = 10_000  # alerts kept for the next flush while the database is unreachable


@dataclass
class _Pending:
    owner_id: uuid.UUID
    ref: Reference
    counts: dict[uuid.UUID, list[int]] = field(default_factory=dict)  # key -> [rows, hits]


# KEYS: the model's hash, the key's hash, the model's set of keys by statistic. ARGV: rows, hits, llr,
# key threshold, model threshold, key id, keys kept, key TTL. Returns {key alert, key statistic, key rows,
# key hits, model alert, model statistic, model rows} (statistics as strings: Lua numbers lose floats).
_RECORD = """
local rows, hits, llr = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local ks = math.max(0, tonumber(redis.call('HGET', KEYS[2], 's') or '0') + llr)
local kn = redis.call('HINCRBY', KEYS[2], 'n', rows)
local kh = redis.call('HINCRBY', KEYS[2], 'h', hits)
redis.call('HSET', KEYS[2], 's', tostring(ks))
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[8]))
local key_alert = 0
if ks >= tonumber(ARGV[4]) and redis.call('HSETNX', KEYS[2], 'alerted', 1) == 1 then key_alert = 1 end
redis.call('ZADD', KEYS[3], ks, ARGV[6])
redis.call('ZREMRANGEBYRANK', KEYS[3], 0, -(tonumber(ARGV[7]) + 1))
local ms = math.max(0, tonumber(redis.call('HGET', KEYS[1], 's') or '0') + llr)
local mn = redis.call('HINCRBY', KEYS[1], 'n', rows)
redis.call('HINCRBY', KEYS[1], 'h', hits)
redis.call('HSET', KEYS[1], 's', tostring(ms))
local model_alert = 0
if ms >= tonumber(ARGV[5]) and mn >= tonumber(redis.call('HGET', KEYS[1], 'rearm') or '0') then
  model_alert = 1
  redis.call('HSET', KEYS[1], 'rearm', 2 * mn)
end
return {key_alert, tostring(ks), kn, kh, model_alert, tostring(ms), mn}
"""


class MemoryStats:
    """Embedded: each model's statistics in this process."""

    def __init__(self) -> None:
        self._models: OrderedDict[uuid.UUID, ModelMonitor] = OrderedDict()

    def apply(self, model: uuid.UUID, ref: Reference, key: uuid.UUID, rows: int, hits: int) -> list[Alert]:
        monitor = self._models.pop(model, None) or ModelMonitor(ref.config, ref.p0)
        self._models[model] = monitor
        while len(self._models) > MODELS_KEPT:
            self._models.popitem(last=False)
        return monitor.record(str(key), rows, hits, ref.llr(rows, hits))


class RedisStats:
    """Deployed: the statistics in Redis, shared by every API replica."""

    def __init__(self, url: str, prefix: str) -> None:
        import redis

        self._redis = redis.Redis.from_url(url)
        self._script = self._redis.register_script(_RECORD)
        self.prefix = prefix

    def apply(self, model: uuid.UUID, ref: Reference, key: uuid.UUID, rows: int, hits: int) -> list[Alert]:
        cfg, base = ref.config, f"{self.prefix}:monitor:{model}"
        names = [base, f"{base}:key:{key}", f"{base}:keys"]
        args = [rows, hits, ref.llr(rows, hits), cfg.key_threshold, cfg.model_threshold, str(key)]
        out = self._script(keys=names, args=[*args, cfg.max_keys, KEY_TTL_SECONDS])
        key_alert, ks, kn, kh, model_alert, ms, mn = out
        alerts = []
        if key_alert:
            entry = {
                "key_id": str(key),
                "statistic": round(float(ks), 3),
                "queries": int(kn),
                "hits": int(kh),
            }
            alerts.append(Alert("key", float(ks), cfg.key_threshold, int(mn), [entry]))
        if model_alert:
            alerts.append(Alert("model", float(ms), cfg.model_threshold, int(mn), self._suspects(base, ref)))
        return alerts

    def _suspects(self, base: str, ref: Reference) -> list[dict[str, Any]]:
        top = self._redis.zrevrange(f"{base}:keys", 0, 999, withscores=True)
        pipe = self._redis.pipeline()
        for name, _ in top:
            pipe.hmget(f"{base}:key:{name.decode()}", "n", "h")
        keys = [
            {
                "key_id": name.decode(),
                "statistic": round(score, 3),
                "queries": int(n or 0),
                "hits": int(h or 0),
            }
            for (name, score), (n, h) in zip(top, pipe.execute(), strict=True)
        ]
        return suspect_keys(keys, ref.p0, ref.config.suspect_p)


class Monitor:
    """Counts hits on the predict path; `flush` (the background thread) updates statistics, stores alerts,
    and has `enforcement` act on them in the same transaction."""

    def __init__(
        self, sessions: sessionmaker[Session], broker_url: str | None, prefix: str, enforcement: Enforcement
    ) -> None:
        self.sessions, self.enforcement = sessions, enforcement
        self.stats = RedisStats(broker_url, prefix) if broker_url else MemoryStats()
        self._pending: dict[uuid.UUID, _Pending] = {}
        self._unsaved: list[tuple[uuid.UUID, uuid.UUID, Alert]] = []  # alerts a database outage held back
        self._lock = threading.Lock()
        self._flushing = threading.Lock()

    def record(self, served: ServedModel, key: uuid.UUID, x: torch.Tensor) -> None:
        """Test a request's rows against the model's bank and count them for the key (no I/O); repeats
        count for nothing (`ml.monitor.QueryBank`)."""
        if served.monitor is None or served.bank is None:
            return
        tested = served.bank.test(x)
        if not tested.counted:
            return
        with self._lock:
            pending = self._pending.setdefault(served.model_id, _Pending(served.owner_id, served.monitor))
            count = pending.counts.setdefault(key, [0, 0])
            count[0] += tested.counted
            count[1] += int(np.count_nonzero(tested.hits))

    def flush(self) -> None:
        """Apply the pending counts to the statistics and store the alerts they raised."""
        with self._flushing:
            with self._lock:
                pending, self._pending = self._pending, {}
            alerts, self._unsaved = self._unsaved, []
            for model, p in pending.items():
                for key, (rows, hits) in p.counts.items():
                    alerts += [
                        (model, p.owner_id, a) for a in self.stats.apply(model, p.ref, key, rows, hits)
                    ]
            if not alerts:
                return
            try:
                self._store(alerts)
            except Exception:
                self._unsaved = alerts[-UNSAVED_KEPT:]  # stored next time
                raise

    def _store(self, alerts: list[tuple[uuid.UUID, uuid.UUID, Alert]]) -> None:
        acted = Outcome()
        with self.sessions() as session, session.begin():
            for model, owner, a in alerts:
                row = MonitorAlert(
                    model_id=model,
                    owner_id=owner,
                    kind=a.kind,
                    statistic=a.statistic,
                    threshold=a.threshold,
                    queries=a.queries,
                    keys=a.keys,
                )
                session.add(row)
                session.flush()
                data = {
                    "alert_id": str(row.id),
                    "kind": a.kind,
                    "statistic": a.statistic,
                    "queries": a.queries,
                }
                append_event(session, model, "alert", data | {"keys": [k["key_id"] for k in a.keys]})
                acted += self.enforcement.act(session, row)
        self.enforcement.committed(acted)
