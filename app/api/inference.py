"""Serving a job's teacher as it was audited: a small LRU of loaded checkpoints (with the fitted serving
policy a job published), per-key policy state, input checks, query accounting."""

from __future__ import annotations

import json
import math
import secrets
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session
from torch import nn

from app.api.job_service import job_artifact
from app.core.models import POLICY_CONFIG_NAME, POLICY_NAME, REPORT_NAME, ApiKey, Artifact, Job, JobStatus
from app.core.storage import ArtifactStore
from app.problems import Problem, validation_problem
from ml.checkpoint import CONFIG_NAME, WEIGHTS_NAME, ModelMeta, load_checkpoint, load_meta
from ml.onnx_model import ONNX_ARCH, ONNX_NAME, OnnxModule
from ml.oracle import OutputMode
from ml.policy import FittedPolicy, PolicyConfig, QueryHistory, Served, serve

WEIGHTS, CONFIG = WEIGHTS_NAME, CONFIG_NAME  # the artifact names a job publishes its checkpoint under


@dataclass(frozen=True)
class ServedModel:
    """A loaded teacher with everything it is served through: output mode, fitted policy, query budget."""

    job_id: uuid.UUID
    model: nn.Module
    meta: ModelMeta
    mode: OutputMode
    policy: FittedPolicy | None = None
    # report["safe_budget"]["teacher"]: per audited student, the largest tested per-key query budget at
    # which no knockoff beat label smoothing; None when the audit ran no query budgets.
    safe_budget: dict[str, int] | None = None
    # The perturb action's noise: one generator per loaded model, seeded from the OS so that no client
    # can replay the draws (the model id is public), shared by all keys under `lock`.
    generator: torch.Generator = field(
        default_factory=lambda: torch.Generator().manual_seed(secrets.randbits(63))
    )
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def keeps_history(self) -> bool:
        """Whether each key needs its own `QueryHistory` (the prada detector decides on a key's history)."""
        return self.policy is not None and self.policy.config.detector == "prada"

    def serve(self, x: torch.Tensor, history: QueryHistory | None = None) -> Served:
        """Answers exactly as audited: the teacher's softmax, the serving policy (when the job has one)
        deciding on the raw output, then the job's output mode (`ml.policy.serve`). Refused rows are zero."""
        with torch.inference_mode():
            logits = self.model(x).float()
            probs = torch.softmax(logits, dim=-1)
            if self.policy is None:
                return serve(probs, logits, self.mode, None)
            # The history (prada) and the generator (perturb) are state: one batch at a time.
            with self.lock:
                return serve(probs, logits, self.mode, self.policy, history, x, self.generator)

    def model_budget(self, operator_budget: int | None) -> tuple[int | None, str]:
        """This model's per-key query budget and why: the operator's, else the audit's safe budget."""
        if operator_budget is not None:
            return operator_budget, "configured by the operator (CMIM_MODEL_QUERY_BUDGET)"
        if self.safe_budget:
            low = min(self.safe_budget.values())
            at = sorted(s for s, b in self.safe_budget.items() if b == low)
            return low, (
                f"the audit's safe budget: the smallest over the audited students of the largest tested "
                f"query budget at which no knockoff beat label smoothing ({', '.join(at)}: {low}; "
                f"all: {json.dumps(self.safe_budget, sort_keys=True)})"
                + (
                    "; 0 means a knockoff beat label smoothing even at the smallest tested budget, so "
                    "the model answers no queries until the operator sets CMIM_MODEL_QUERY_BUDGET"
                    if low == 0
                    else ""
                )
            )
        return None, "none: the audit ran no query budgets and the operator configured none"


class HistoryCache:
    """One `QueryHistory` per (API key, model) in this process, least recently used evicted first.

    Only models served with the prada detector keep one. An evicted key starts a fresh history (and
    loses its flag): size the cache above the number of keys querying such models at a time.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[tuple[uuid.UUID, uuid.UUID], QueryHistory] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key_id: uuid.UUID, served: ServedModel) -> QueryHistory | None:
        if not served.keeps_history:
            return None
        assert served.policy is not None
        ident = (key_id, served.job_id)
        with self._lock:
            if ident in self._items:
                self._items.move_to_end(ident)
                return self._items[ident]
            history = self._items[ident] = served.policy.new_history()
            while len(self._items) > self.size:
                self._items.popitem(last=False)
            return history


class ModelCache:
    """Loaded models by job id, least recently used evicted first (checkpoints are immutable)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[uuid.UUID, ServedModel] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, session: Session, store: ArtifactStore, job: Job) -> ServedModel:
        with self._lock:
            if job.id in self._items:
                self._items.move_to_end(job.id)
                return self._items[job.id]
        served = _load(session, store, job)
        with self._lock:
            # Two requests may load the same model at once: all must share one (its lock, its generator).
            served = self._items.setdefault(job.id, served)
            self._items.move_to_end(job.id)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return served


def _load(session: Session, store: ArtifactStore, job: Job) -> ServedModel:
    if job.status != JobStatus.succeeded.value:
        raise Problem(409, f"model {job.id} is not ready: its job is {job.status}", slug="model-not-ready")
    config = store.local_path(job_artifact(session, job.id, CONFIG).storage_key)
    meta = load_meta(config)
    if meta.arch == ONNX_ARCH:  # an owner's ONNX model: a black box through onnxruntime
        model: nn.Module = OnnxModule(
            store.read_bytes(job_artifact(session, job.id, ONNX_NAME).storage_key), meta.output
        )
    else:
        model, meta = load_checkpoint(
            store.local_path(job_artifact(session, job.id, WEIGHTS).storage_key), config
        )
    mode = OutputMode.model_validate(job.spec["audit"].get("output_mode", {}))
    report = json.loads(store.read_bytes(job_artifact(session, job.id, REPORT_NAME).storage_key))
    safe = report.get("safe_budget", {}).get("teacher")
    return ServedModel(job.id, model, meta, mode, _load_policy(session, store, job, meta), safe)


def _load_policy(session: Session, store: ArtifactStore, job: Job, meta: ModelMeta) -> FittedPolicy | None:
    """The serving policy the job published, fitted to its teacher; None when it was audited without one."""
    spec = PolicyConfig.model_validate(job.spec["audit"].get("policy", {}))
    names = {POLICY_NAME, POLICY_CONFIG_NAME}
    found = {
        a.name: a
        for a in session.scalars(select(Artifact).where(Artifact.job_id == job.id, Artifact.name.in_(names)))
    }
    if not found and spec == PolicyConfig():
        return None
    if set(found) != names:
        # Never serve a model without the policy it was audited with.
        raise Problem(
            409,
            f"model {job.id} was audited with a serving policy but its job published no fitted policy",
            slug="model-not-ready",
        )
    config = PolicyConfig.model_validate_json(store.read_bytes(found[POLICY_CONFIG_NAME].storage_key))
    if config != spec:
        raise Problem(
            409, f"model {job.id}: the published policy is not the audited one", slug="model-not-ready"
        )
    policy = FittedPolicy.from_tensors(
        config, load_file(str(store.local_path(found[POLICY_NAME].storage_key)))
    )
    if policy.centroids.shape[0] != meta.num_classes:
        raise Problem(
            409, f"model {job.id}: the published policy has the wrong classes", slug="model-not-ready"
        )
    return policy


def as_batch(
    values: object, shape: list[int] | None, meta: ModelMeta, max_batch: int, loc: list
) -> torch.Tensor:
    """A (B, *input_shape) float32 batch from nested or flat values; 422 on any mismatch."""

    def bad(msg: str) -> Problem:
        return validation_problem([{"loc": loc, "msg": msg, "type": "value_error"}])

    try:
        arr = np.asarray(values, dtype=np.float32)
    except (ValueError, TypeError) as e:
        raise bad(f"inputs must be a rectangular array of numbers: {e}") from None
    if shape is not None:
        if math.prod(shape) != arr.size:
            raise bad(f"shape {shape} holds {math.prod(shape)} values but data has {arr.size}")
        arr = arr.reshape(shape)
    expected = tuple(meta.input_shape)
    if arr.ndim != len(expected) + 1 or tuple(arr.shape[1:]) != expected:
        raise bad(f"expected shape (batch, {', '.join(map(str, expected))}), got {tuple(arr.shape)}")
    if not 1 <= arr.shape[0] <= max_batch:
        raise bad(f"batch size must be between 1 and {max_batch}, got {arr.shape[0]}")
    if not np.isfinite(arr).all():
        raise bad("inputs contain NaN or infinite values")
    return torch.from_numpy(arr)


# ---------------------------------------------------------------- rate limit and query budget


class RateLimiter:
    """Requests per key in a sliding 60 s window (per API process)."""

    window = 60.0

    def __init__(self) -> None:
        self._hits: dict[uuid.UUID, deque[float]] = {}
        self._lock = threading.Lock()

    def hit(self, key_id: uuid.UUID, limit: int) -> tuple[bool, int, int]:
        """Record a request if allowed; returns (allowed, remaining, seconds until a slot frees)."""
        now = time.monotonic()
        with self._lock:
            hits = self._hits.setdefault(key_id, deque())
            while hits and hits[0] <= now - self.window:
                hits.popleft()
            reset = math.ceil(hits[0] + self.window - now) if hits else 0
            if len(hits) >= limit:
                return False, 0, max(reset, 1)
            hits.append(now)
            return True, limit - len(hits), reset or int(self.window)


@dataclass(frozen=True)
class Budget:
    """The query budget that applies to one key on one model, and why."""

    limit: int | None  # None: unlimited
    source: str  # "key", "model" or "none"
    reason: str
    key_budget: int | None
    model_budget: int | None
    model_reason: str

    def describe(self, used: int) -> dict[str, Any]:
        return {
            "limit": self.limit,
            "applies": self.source,
            "reason": self.reason,
            "used": used,
            "remaining": None if self.limit is None else max(self.limit - used, 0),
            "key_budget": self.key_budget,
            "model_budget": self.model_budget,
            "model_budget_reason": self.model_reason,
            "counted": "every row this key sent to any model's predict endpoints (a key's rows on one "
            "model are never more, so a model's budget holds per key; a key used for several models "
            "reaches it sooner)",
        }


def budget_for(key: ApiKey, served: ServedModel, operator_budget: int | None) -> Budget:
    """The smaller of the key's own budget and the model's per-key budget (see `ServedModel.model_budget`)."""
    model_limit, model_reason = served.model_budget(operator_budget)
    key_limit = key.query_budget
    if model_limit is not None and (key_limit is None or model_limit < key_limit):
        return Budget(
            model_limit,
            "model",
            f"the model's per-key budget, {model_reason}",
            key_limit,
            model_limit,
            model_reason,
        )
    if key_limit is not None:
        why = "the key's own budget" + ("" if model_limit is None else ", smaller than the model's")
        return Budget(key_limit, "key", why, key_limit, model_limit, model_reason)
    return Budget(None, "none", "neither the key nor the model has a query budget", None, None, model_reason)


def charge(
    session: Session,
    limiter: RateLimiter,
    key: ApiKey,
    queries: int,
    default_rate: int,
    budget: Budget | None = None,
) -> dict[str, str]:
    """Count one request and `queries` rows against the key; returns the headers to send. 429 when over.

    `budget` (default: the key's own) caps the key's rows: the rows of this request are counted only
    when the total stays within it."""
    if budget is None:
        budget = Budget(key.query_budget, "key", "the key's own budget", key.query_budget, None, "")
    limit = budget.limit
    rate = key.rate_limit_per_minute or default_rate
    allowed, remaining, reset = limiter.hit(key.id, rate)
    headers = {
        "X-RateLimit-Limit": str(rate),
        "X-RateLimit-Remaining": str(remaining),
        "X-RateLimit-Reset": str(reset),
    }
    if not allowed:
        raise Problem(
            429,
            f"rate limit of {rate} requests per minute reached",
            slug="rate-limited",
            headers=headers | {"Retry-After": str(reset)},
        )
    used = session.execute(
        update(ApiKey)
        .where(
            ApiKey.id == key.id,
            or_(ApiKey.query_budget.is_(None), ApiKey.queries_used + queries <= ApiKey.query_budget),
            *([] if limit is None else [ApiKey.queries_used + queries <= limit]),
        )
        .values(queries_used=ApiKey.queries_used + queries)
        .returning(ApiKey.queries_used)
        .execution_options(synchronize_session=False)
    ).scalar_one_or_none()
    session.commit()
    if limit is not None:
        left = max(limit - (used if used is not None else key.queries_used), 0)
        headers |= {
            "X-Query-Budget-Limit": str(limit),
            "X-Query-Budget-Remaining": str(left),
            "X-Query-Budget-Source": budget.source,
        }
    if used is None:
        raise Problem(
            429,
            f"query budget exhausted: {key.queries_used} of {limit} queries used ({budget.reason}); "
            f"this request needs {queries}",
            slug="query-budget-exhausted",
            headers=headers,
        )
    return headers
