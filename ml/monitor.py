"""Extraction monitor across keys: near-duplicate queries, counted by sequential tests per key and per model.

A knockoff needs many queries near a limited set of inputs: the attacker's labelled data, augmented and
mixed anew every epoch (fm_edge: a real input mixed 70-100 % with another one). Its queries keep coming
back close to earlier queries, whichever of its keys sent them; honest users' inputs are fresh draws of
the data distribution. The monitor keeps, per model, a ring buffer ("bank") of the last `bank` queries
in a random projection to `dim` dimensions (SEAT, Zhang et al. AISec 2021, counts similar pairs per
account; here the pairs are counted over all keys together). A query is a *hit* when its nearest
neighbour in the bank is closer than `tau`, calibrated on the model's held-out test inputs so that an
honest query hits with probability about p0. A query far closer still (a *repeat*: the same input sent
again, or with a sensor's jitter) is no evidence either way and is not counted at all.

Hits feed two CUSUM tests (Page 1954) of the hit rate p0 against p1 (log-likelihood ratio per query,
batches aggregated): one per key and one per model over every key. A key whose statistic reaches
`key_threshold` raises a key alert (once per key); the model's statistic reaching `model_threshold`
raises a model alert naming the suspect keys (a binomial test of each key's hits against p0), again
only once the model has seen twice the queries of its last model alert. State is O(bank * dim) per
model and O(1) per key (at most `max_keys` keys per model, least recently seen dropped first).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from scipy import stats

from ml.policy import l2_distances


class MonitorConfig(BaseModel):
    """How the monitor sees queries and when it alerts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dim: int = Field(32, ge=1, le=1024, description="random projection of a query's flattened input")
    bank: int = Field(4096, ge=16, le=1_000_000, description="recent queries kept per model (ring buffer)")
    quantile: float = Field(
        0.01, gt=0, lt=0.5, description="tau = this quantile of honest nearest-neighbour distances"
    )
    p1: float = Field(0.25, gt=0, lt=1, description="hit rate the CUSUM tests are tuned to detect")
    key_threshold: float = Field(12.0, gt=0, description="per-key CUSUM threshold (log-likelihood ratio)")
    model_threshold: float = Field(20.0, gt=0, description="per-model CUSUM threshold (log-likelihood ratio)")
    suspect_p: float = Field(
        1e-4,
        gt=0,
        lt=1,
        description="a model alert names the keys whose hits are this unlikely under the honest rate "
        "(binomial tail P(X >= hits | queries, p0))",
    )
    max_keys: int = Field(10_000, ge=1, le=10_000_000, description="keys tracked per model")
    repeat_radius: float = Field(
        0.05,
        ge=0,
        lt=1,
        description="a query closer than this fraction of tau to an earlier query is a repeat (a retry, "
        "a sensor's jitter): it is not evidence either way, so it is neither a hit nor counted, and it "
        "does not enter the bank",
    )


@dataclass(frozen=True)
class Reference:
    """A monitor calibrated for one model: the projection, tau, the honest hit rate and the LLR weights."""

    config: MonitorConfig
    input_size: int  # flattened input length
    seed: int
    tau: float
    p0: float  # honest hit rate against a full bank
    calibration: dict[str, Any] = field(default_factory=dict)

    @property
    def hit_llr(self) -> float:
        """log(p1 / p0): what one hit adds to a CUSUM."""
        return math.log(self.config.p1 / self.p0)

    @property
    def miss_llr(self) -> float:
        """log((1 - p1) / (1 - p0)) < 0: what one miss adds."""
        return math.log((1 - self.config.p1) / (1 - self.p0))

    def llr(self, queries: int, hits: int) -> float:
        """Log-likelihood ratio of `hits` among `queries` under p1 against p0."""
        return hits * self.hit_llr + (queries - hits) * self.miss_llr

    def projection(self) -> np.ndarray:
        """(input_size, dim) Gaussian projection scaled to keep distances (Johnson-Lindenstrauss)."""
        rng = np.random.default_rng(self.seed)
        dim = min(self.config.dim, self.input_size)
        return (rng.standard_normal((self.input_size, dim)) / math.sqrt(dim)).astype(np.float32)

    def to_json(self) -> dict[str, Any]:
        return {
            "config": self.config.model_dump(),
            "input_size": self.input_size,
            "seed": self.seed,
            "tau": self.tau,
            "p0": self.p0,
            "calibration": self.calibration,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Reference:
        return cls(
            MonitorConfig.model_validate(data["config"]),
            int(data["input_size"]),
            int(data["seed"]),
            float(data["tau"]),
            float(data["p0"]),
            dict(data.get("calibration", {})),
        )


def _flat(x: torch.Tensor | np.ndarray) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return arr.reshape(len(arr), -1).astype(np.float32, copy=False)


def calibrate(
    x_honest: torch.Tensor | np.ndarray, config: MonitorConfig | None = None, seed: int = 0
) -> Reference:
    """tau and p0 from held-out clean inputs: half of them form a bank, the other half query it.

    tau is the `quantile` of the queries' nearest-neighbour distances to a bank of m = min(bank, n/2)
    honest inputs. A live bank of `bank` queries holds more neighbours: for small rates the hit rate
    grows about linearly with the bank, so p0 = quantile * bank / m (capped at 0.5 * p1).
    """
    config = config or MonitorConfig()
    flat = _flat(x_honest)
    if len(flat) < 20:
        raise ValueError(f"monitor calibration needs at least 20 held-out inputs, got {len(flat)}")
    perm = np.random.default_rng(seed).permutation(len(flat))
    m = min(config.bank, len(flat) // 2)
    ref = Reference(config, flat.shape[1], seed, 0.0, 1.0)
    proj = flat[perm] @ ref.projection()
    bank, queries = proj[:m], proj[m:]
    nearest = np.concatenate(
        [l2_distances(q, bank).min(1) for q in np.array_split(queries, max(len(queries) // 1000, 1))]
    )
    tau = float(np.quantile(nearest, config.quantile))
    p0 = min(config.quantile * config.bank / m, 0.5 * config.p1)
    stats = {"honest_inputs": len(flat), "bank_used": m, "honest_hit_rate": float((nearest < tau).mean())}
    return Reference(config, flat.shape[1], seed, tau, p0, stats)


@dataclass(frozen=True)
class Tested:
    """A batch tested against the bank: per row, whether it is a hit, and whether it is a repeat."""

    hits: np.ndarray  # (B,) bool: nearest earlier query within tau, and not a repeat
    repeats: np.ndarray  # (B,) bool: nearest earlier query within repeat_radius * tau

    @property
    def counted(self) -> int:
        """The rows that count as queries (every row but the repeats)."""
        return int(np.count_nonzero(~self.repeats))


class QueryBank:
    """One model's ring buffer of recent projected queries; `test` tests a batch, then adds it.

    A repeat (within `repeat_radius` of tau of an earlier query) tells its sender nothing it could not
    have kept from the first answer, and a thief gains nothing by sending it: it is neither a hit nor a
    counted query, and it is kept out of the bank, so a client resending one input never fills the bank
    with it (which would push the thief's earlier queries out)."""

    def __init__(self, ref: Reference) -> None:
        self.ref = ref
        self.proj = ref.projection()
        self.items = np.zeros((ref.config.bank, self.proj.shape[1]), np.float32)
        self.sq = np.zeros(ref.config.bank, np.float32)  # squared norms of the items
        self.filled = self.next = 0
        self._lock = threading.Lock()

    def test(self, x: torch.Tensor | np.ndarray) -> Tested:
        """Each query's nearest earlier query (the bank, or this batch's earlier rows): a hit when within
        tau, a repeat when within repeat_radius * tau; then the batch's other rows enter the bank."""
        z = _flat(x) @ self.proj
        zsq = (z * z).sum(1)
        nearest = np.full(len(z), np.inf, np.float32)  # squared distances
        with self._lock:
            n = self.filled
            if n:
                nearest = (zsq[:, None] + self.sq[None, :n] - 2 * (z @ self.items[:n].T)).min(1)
            if len(z) > 1:  # duplicates inside one batch count too
                within = zsq[:, None] + zsq[None, :] - 2 * (z @ z.T)
                within[np.triu_indices(len(z))] = np.inf
                nearest = np.minimum(nearest, within.min(1))
            repeats = nearest < (self.ref.config.repeat_radius * self.ref.tau) ** 2
            self._add(z[~repeats], zsq[~repeats])
        return Tested(hits=(nearest < self.ref.tau**2) & ~repeats, repeats=repeats)

    def hits(self, x: torch.Tensor | np.ndarray) -> np.ndarray:
        """(B,) bool: `test`'s hits."""
        return self.test(x).hits

    def _add(self, z: np.ndarray, zsq: np.ndarray) -> None:
        size = len(self.items)
        z, zsq = z[-size:], zsq[-size:]
        idx = (self.next + np.arange(len(z))) % size
        self.items[idx], self.sq[idx] = z, zsq
        self.next = int((self.next + len(z)) % size)
        self.filled = min(self.filled + len(z), size)


@dataclass
class KeyState:
    statistic: float = 0.0
    queries: int = 0
    hits: int = 0
    alerted: bool = False


@dataclass(frozen=True)
class Alert:
    """A threshold crossing: "key" (one key's test) or "model" (the model's test over all keys)."""

    kind: str
    statistic: float
    threshold: float
    queries: int  # queries the model's monitor had seen when it fired
    keys: list[dict[str, Any]]  # {"key_id", "statistic", "queries", "hits"}, highest statistic first


class ModelMonitor:
    """One model's CUSUM statistics, per key and over all keys, in memory (the embedded service and the
    benchmark's simulation; the deployed service keeps the same state in Redis)."""

    def __init__(self, config: MonitorConfig, p0: float) -> None:
        self.config, self.p0 = config, p0
        self.keys: OrderedDict[Any, KeyState] = OrderedDict()
        self.statistic, self.queries, self.hits, self.rearm_at = 0.0, 0, 0, 0

    def record(self, key: Any, queries: int, hits: int, llr: float) -> list[Alert]:
        """Add a batch of `queries` from `key` with `hits` hits and log-likelihood ratio `llr`; new alerts."""
        cfg = self.config
        state = self.keys.pop(key, None) or KeyState()
        self.keys[key] = state
        while len(self.keys) > cfg.max_keys:
            self.keys.popitem(last=False)
        state.statistic = max(0.0, state.statistic + llr)
        state.queries += queries
        state.hits += hits
        self.statistic = max(0.0, self.statistic + llr)
        self.queries += queries
        self.hits += hits
        alerts = []
        if not state.alerted and state.statistic >= cfg.key_threshold:
            state.alerted = True
            alerts.append(Alert("key", state.statistic, cfg.key_threshold, self.queries, [_key(key, state)]))
        if self.queries >= self.rearm_at and self.statistic >= cfg.model_threshold:
            self.rearm_at = 2 * self.queries
            suspects = suspect_keys([_key(k, s) for k, s in self.keys.items()], self.p0, cfg.suspect_p)
            alerts.append(Alert("model", self.statistic, cfg.model_threshold, self.queries, suspects))
        return alerts


def suspect_keys(keys: list[dict[str, Any]], p0: float, p: float, limit: int = 100) -> list[dict[str, Any]]:
    """The keys whose hits are unlikely under the honest rate: P(X >= hits | queries, p0) < p, most
    unlikely first, at most `limit`."""
    out = []
    for k in keys:
        tail = float(stats.binom.sf(k["hits"] - 1, k["queries"], p0)) if k["hits"] else 1.0
        if tail < p:
            out.append(k | {"p_value": tail})
    return sorted(out, key=lambda k: k["p_value"])[:limit]


def _key(key: Any, s: KeyState) -> dict[str, Any]:
    return {"key_id": str(key), "statistic": round(s.statistic, 3), "queries": s.queries, "hits": s.hits}
