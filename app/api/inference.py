"""Serving a job's teacher: a small LRU of loaded checkpoints, input checks, output mode, query accounting."""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass

import numpy as np
import torch
from sqlalchemy import or_, update
from sqlalchemy.orm import Session
from torch import nn

from app.api.job_service import job_artifact
from app.core.models import ApiKey, Job, JobStatus
from app.core.storage import ArtifactStore
from app.problems import Problem, validation_problem
from ml.checkpoint import CONFIG_NAME, WEIGHTS_NAME, ModelMeta, load_checkpoint
from ml.oracle import OutputMode, apply_output_mode

WEIGHTS, CONFIG = WEIGHTS_NAME, CONFIG_NAME  # the artifact names a job publishes its checkpoint under


@dataclass(frozen=True)
class ServedModel:
    job_id: uuid.UUID
    model: nn.Module
    meta: ModelMeta
    mode: OutputMode

    def serve(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C) answers exactly as deployed: softmax of the teacher, then the job's output mode."""
        with torch.inference_mode():
            probs = torch.softmax(self.model(x).float(), dim=-1)
        return apply_output_mode(probs, self.mode)


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
            self._items[job.id] = served
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return served


def _load(session: Session, store: ArtifactStore, job: Job) -> ServedModel:
    if job.status != JobStatus.succeeded.value:
        raise Problem(409, f"model {job.id} is not ready: its job is {job.status}", slug="model-not-ready")
    weights = store.local_path(job_artifact(session, job.id, WEIGHTS).storage_key)
    config = store.local_path(job_artifact(session, job.id, CONFIG).storage_key)
    model, meta = load_checkpoint(weights, config)
    mode = OutputMode.model_validate(job.spec["audit"].get("output_mode", {}))
    return ServedModel(job.id, model, meta, mode)


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


def charge(
    session: Session, limiter: RateLimiter, key: ApiKey, queries: int, default_rate: int
) -> dict[str, str]:
    """Count one request and `queries` rows against the key; returns the headers to send. 429 when over."""
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
        )
        .values(queries_used=ApiKey.queries_used + queries)
        .returning(ApiKey.queries_used)
        .execution_options(synchronize_session=False)
    ).scalar_one_or_none()
    session.commit()
    if key.query_budget is not None:
        left = key.query_budget - (used if used is not None else key.queries_used)
        headers |= {"X-Query-Budget-Limit": str(key.query_budget), "X-Query-Budget-Remaining": str(left)}
    if used is None:
        raise Problem(
            429,
            f"query budget exhausted: {key.queries_used} of {key.query_budget} queries used; "
            f"this request needs {queries}",
            slug="query-budget-exhausted",
            headers=headers,
        )
    return headers
