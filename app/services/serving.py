"""Serving a model as it was audited: a small LRU of loaded models (with the fitted serving policy a job
published), per-key policy state, input decoding (v2 JSON and binary tensors, datatypes), and the caps a
request's rows are charged against."""

from __future__ import annotations

import json
import math
import secrets
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from sqlalchemy import select
from sqlalchemy.orm import Session
from torch import nn

from app.api.job_service import job_artifact
from app.core.coalesce import Coalescer
from app.core.config import Settings
from app.core.keys import KeyInfo
from app.core.limits import Cap, Limits, counters_for
from app.core.models import (
    MONITOR_NAME,
    POLICY_CONFIG_NAME,
    POLICY_NAME,
    REPORT_NAME,
    SERVING_NAME,
    Artifact,
    Job,
    JobStatus,
)
from app.core.storage import ArtifactStore
from app.problems import Problem, not_found, validation_problem
from ml.checkpoint import CONFIG_NAME, WEIGHTS_NAME, ModelMeta, load_checkpoint, load_meta
from ml.onnx_model import ONNX_ARCH, ONNX_NAME, OnnxModule
from ml.served import (
    EnforcementPolicy,
    FittedPolicy,
    OutputMode,
    PolicyConfig,
    QueryBank,
    QueryHistory,
    Reference,
    Served,
    ServedSpec,
    Standing,
    serve,
    served_spec,
)

WEIGHTS, CONFIG = WEIGHTS_NAME, CONFIG_NAME  # the artifact names a job publishes its checkpoint under


@dataclass(frozen=True)
class ServedModel:
    """A loaded teacher with everything it is served through: output mode, fitted policy, query budget."""

    model_id: uuid.UUID
    owner_id: uuid.UUID
    model: nn.Module
    meta: ModelMeta
    mode: OutputMode
    policy: FittedPolicy | None = None
    # report["safe_budget"]["teacher"]: per audited student, the largest tested per-key query budget at
    # which no knockoff beat label smoothing; None when the audit ran no query budgets.
    safe_budget: dict[str, int] | None = None
    # Which budgets the audit tested and where they came from, in words (`budget_curve`).
    budget_curve: str | None = None
    # The perturb action's noise: one generator per loaded model, seeded from the OS so that no client
    # can replay the draws (the model id is public), shared by all keys under `lock`.
    generator: torch.Generator = field(
        default_factory=lambda: torch.Generator().manual_seed(secrets.randbits(63))
    )
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # The extraction monitor calibrated at job end (None: an older job, not monitored) and this process's
    # bank of the model's recent queries (`ml.monitor`).
    monitor: Reference | None = None
    # What alerts do to its keys as its job's spec set it (`serving.enforcement`); an owner's later
    # change is the process's `Enforcement.policy`.
    enforcement: EnforcementPolicy = field(default_factory=EnforcementPolicy)
    batcher: MicroBatcher = field(init=False, repr=False)
    bank: QueryBank | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "batcher", MicroBatcher(self.model))
        object.__setattr__(self, "bank", None if self.monitor is None else QueryBank(self.monitor))

    @property
    def keeps_history(self) -> bool:
        """Whether each key needs its own `QueryHistory` (the prada detector decides on a key's history)."""
        return self.policy is not None and self.policy.config.detector == "prada"

    def serve(self, x: torch.Tensor, history: QueryHistory | None = None) -> Served:
        """Answers exactly as audited: the teacher's softmax, the serving policy (when the job has one)
        deciding on the raw output, then the job's output mode (`ml.policy.serve`). Refused rows are zero."""
        with torch.inference_mode():
            return self.answer(x, self.model(x).float(), history)

    def answer(self, x: torch.Tensor, logits: torch.Tensor, history: QueryHistory | None = None) -> Served:
        """`serve` given the teacher's logits for x (computed alone or in a micro-batch)."""
        with torch.inference_mode():
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
                f"all: {json.dumps(self.safe_budget, sort_keys=True)}"
                + (f"; {self.budget_curve})" if self.budget_curve else ")")
                + (
                    "; 0 means a knockoff beat label smoothing even at the smallest tested budget, so "
                    "the model answers no queries until the operator sets CMIM_MODEL_QUERY_BUDGET"
                    if low == 0
                    else ""
                )
            )
        return None, (
            "none: the audit ran no query budgets (audit.query_budgets: []) and the operator configured "
            "none (CMIM_MODEL_QUERY_BUDGET)"
        )


class MicroBatcher:
    """Coalesces the forward passes of concurrent small requests for one model into one (micro-batching):
    on a CPU a tiny model's forward pass costs about as much for 8 rows as for 1."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.logits = Coalescer(self._forward)

    async def _forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor | BaseException]:
        with torch.inference_mode():
            out = self.model(torch.cat(xs)).float()
        return list(out.split([len(x) for x in xs]))


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
        ident = (key_id, served.model_id)
        with self._lock:
            if ident in self._items:
                self._items.move_to_end(ident)
                return self._items[ident]
            history = self._items[ident] = served.policy.new_history()
            while len(self._items) > self.size:
                self._items.popitem(last=False)
            return history


class ModelCache:
    """Loaded models by id, least recently used evicted first (a served model never changes)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[uuid.UUID, ServedModel] = OrderedDict()
        self._lock = threading.Lock()

    def cached(self, model_id: uuid.UUID, owner_id: uuid.UUID) -> ServedModel | None:
        """The loaded model if it is cached and the owner's; no database access."""
        served = self._items.get(model_id)
        return served if served is not None and served.owner_id == owner_id else None

    def get(
        self, session: Session, store: ArtifactStore, model_id: uuid.UUID, owner_id: uuid.UUID
    ) -> ServedModel:
        """The owner's model, loaded on first use (`load_served`)."""
        with self._lock:
            if model_id in self._items and self._items[model_id].owner_id == owner_id:
                self._items.move_to_end(model_id)
                return self._items[model_id]
        served = load_served(session, store, model_id, owner_id)
        with self._lock:
            # Two requests may load the same model at once: all must share one (its lock, its generator).
            served = self._items.setdefault(model_id, served)
            self._items.move_to_end(model_id)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return served


def load_served(
    session: Session, store: ArtifactStore, model_id: uuid.UUID, owner_id: uuid.UUID
) -> ServedModel:
    """Load the served model with this id for this owner: 404 when it is not theirs, 409 while not ready.

    A model id is the id of the job that trained it."""
    job = session.get(Job, model_id)
    if job is None or job.owner_id != owner_id:
        raise not_found("model", model_id)
    return _load_job_model(session, store, job)


def _load_job_model(session: Session, store: ArtifactStore, job: Job) -> ServedModel:
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
    spec = _served_spec(session, store, job)
    policy = _load_policy(session, store, job, meta, spec.policy)
    found = session.scalars(select(Artifact).where(Artifact.job_id == job.id, Artifact.name == MONITOR_NAME))
    monitor = next((Reference.from_json(json.loads(store.read_bytes(a.storage_key))) for a in found), None)
    return ServedModel(
        job.id,
        job.owner_id,
        model,
        meta,
        spec.output_mode,
        policy,
        spec.safe_budget,
        spec.budget_curve,
        monitor=monitor,
        enforcement=spec.enforcement,
    )


def _served_spec(session: Session, store: ArtifactStore, job: Job) -> ServedSpec:
    """What the job published to serve its model through (`serving.json`, read hash-checked). A job
    published before that artifact existed has none: its spec is built once from the job's spec and
    report, as publishing builds it today, and cached with the model."""
    found = session.scalars(select(Artifact).where(Artifact.job_id == job.id, Artifact.name == SERVING_NAME))
    artifact = next(iter(found), None)
    if artifact is not None:
        return ServedSpec.model_validate_json(store.read_bytes(artifact.storage_key))
    report = json.loads(store.read_bytes(job_artifact(session, job.id, REPORT_NAME).storage_key))
    return served_spec(job.spec, report)


def _load_policy(
    session: Session, store: ArtifactStore, job: Job, meta: ModelMeta, spec: PolicyConfig
) -> FittedPolicy | None:
    """The serving policy the job published, fitted to its teacher; None when it was audited without one."""
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


# ---------------------------------------------------------------- inputs

# v2 datatypes a model takes: float tensors, cast to the model's FP32. Integers and booleans are refused
# rather than silently reinterpreted (an INT8 tensor carrying 1000.5 is not an INT8 tensor).
ACCEPTED_DATATYPES: dict[str, np.dtype] = {"FP32": np.dtype("<f4"), "FP64": np.dtype("<f8")}


def _bad(loc: list, msg: str) -> Problem:
    return validation_problem([{"loc": loc, "msg": msg, "type": "value_error"}])


def check_datatype(datatype: str, loc: list) -> np.dtype:
    """The numpy dtype of an accepted v2 datatype; 422 naming the accepted ones otherwise."""
    if datatype not in ACCEPTED_DATATYPES:
        raise _bad(
            loc,
            f"datatype {datatype!r} is not accepted: send {' or '.join(ACCEPTED_DATATYPES)} "
            "(FP64 is cast to the model's FP32)",
        )
    return ACCEPTED_DATATYPES[datatype]


def as_batch(
    values: object,
    shape: list[int] | None,
    meta: ModelMeta,
    max_batch: int,
    loc: list,
    dtype: np.dtype = ACCEPTED_DATATYPES["FP32"],
) -> torch.Tensor:
    """A (B, *input_shape) float32 batch from nested or flat numbers (or raw bytes); 422 on any mismatch."""
    if math.prod(shape or [0]) > max_batch * math.prod(meta.input_shape):
        raise _bad(loc, f"shape {shape} holds more than {max_batch} inputs")
    if isinstance(values, bytes):
        if shape is None or len(values) != math.prod(shape) * dtype.itemsize:
            raise _bad(loc, f"binary data of {len(values)} bytes does not hold shape {shape} of {dtype.name}")
        arr = np.frombuffer(values, dtype=dtype)
    else:
        try:
            arr = np.asarray(values, dtype=dtype)
        except (ValueError, TypeError) as e:
            raise _bad(loc, f"inputs must be a rectangular array of numbers: {e}") from None
    if shape is not None:
        if math.prod(shape) != arr.size:
            raise _bad(loc, f"shape {shape} holds {math.prod(shape)} values but data has {arr.size}")
        arr = arr.reshape(shape)
    expected = tuple(meta.input_shape)
    if arr.ndim != len(expected) + 1 or tuple(arr.shape[1:]) != expected:
        raise _bad(loc, f"expected shape (batch, {', '.join(map(str, expected))}), got {tuple(arr.shape)}")
    if not 1 <= arr.shape[0] <= max_batch:
        raise _bad(loc, f"batch size must be between 1 and {max_batch}, got {arr.shape[0]}")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise _bad(loc, "inputs contain NaN or infinite values (or FP64 values beyond FP32)")
    return torch.from_numpy(arr.copy() if not arr.flags.writeable else arr)


# ---------------------------------------------------------------- query budgets


@dataclass(frozen=True)
class Budget:
    """The per-key query budget on one model, and why: the smaller of the key's own and the model's."""

    limit: int | None  # None: unlimited
    source: str  # "key", "model" or "none": whose number applies
    reason: str
    key_budget: int | None
    model_budget: int | None
    model_reason: str


def budget_for(key: KeyInfo, served: ServedModel, operator_budget: int | None) -> Budget:
    """The smaller of the key's own budget and the model's per-key budget (see `ServedModel.model_budget`)."""
    model_limit, model_reason = served.model_budget(operator_budget)
    key_limit = key.query_budget
    if model_limit is not None and (key_limit is None or model_limit < key_limit):
        reason = f"the model's per-key budget, {model_reason}"
        return Budget(model_limit, "model", reason, key_limit, model_limit, model_reason)
    if key_limit is not None:
        why = "the key's own budget" + ("" if model_limit is None else ", smaller than the model's")
        return Budget(key_limit, "key", why, key_limit, model_limit, model_reason)
    return Budget(None, "none", "neither the key nor the model has a query budget", None, None, model_reason)


def caps_for(
    key: KeyInfo,
    served: ServedModel,
    settings: Settings,
    policy: EnforcementPolicy,
    standing: Standing | None = None,
) -> list[Cap]:
    """What a request's rows count against: the key's budget on this model (cut while the key is on
    probation), the owner's (the model's enforcement policy's, else the operator's), the global one."""
    budget = budget_for(key, served, settings.model_query_budget)
    key_cap: tuple[int | None, str] = (budget.limit, budget.reason)
    if standing is not None and standing.budget_limit is not None:
        key_cap = (
            standing.limit(budget.limit),
            f"probation after extraction alert {standing.alert_id} (the model's enforcement policy), "
            f"at most {standing.budget_limit} rows in all; before it, {budget.reason}",
        )
    owner: tuple[int | None, str]
    if policy.owner_query_budget is not None:
        owner = (
            policy.owner_query_budget,
            "the owner's cap over all its keys on this model, set in the model's enforcement policy",
        )
    elif settings.owner_query_budget is not None:
        owner = (
            settings.owner_query_budget,
            "the owner's budget per model, configured by the operator (CMIM_OWNER_QUERY_BUDGET)",
        )
    else:
        owner = (
            None,
            "none: neither the model's enforcement policy nor the operator (CMIM_OWNER_QUERY_BUDGET) sets "
            "an owner cap; the per-key budget holds each key, the enforcement policy a thief with many keys",
        )
    glob = settings.global_query_budget
    glob_reason = (
        "the model's global budget over every key, configured by the operator (CMIM_GLOBAL_QUERY_BUDGET)"
        if glob is not None
        else "none configured (CMIM_GLOBAL_QUERY_BUDGET)"
    )
    k, o, g = counters_for(key.id, key.owner_id, served.model_id)
    return [Cap(k, *key_cap), Cap(o, *owner), Cap(g, glob, glob_reason)]


def describe_budget(budget: Budget, caps: list[Cap], used: list[int] | tuple[int, ...]) -> dict[str, Any]:
    """The budgets that apply to a key on a model, as `GET /v2/models/{id}` reports them."""

    def cap(c: Cap, u: int) -> dict[str, Any]:
        left = None if c.limit is None else max(c.limit - u, 0)
        return {"limit": c.limit, "used": u, "remaining": left, "reason": c.reason}

    key = cap(caps[0], used[0])
    return key | {
        "applies": budget.source,
        "key_budget": budget.key_budget,
        "model_budget": budget.model_budget,
        "model_budget_reason": budget.model_reason,
        "counted": "rows sent by this key to this model; the owner's and the global budget count rows "
        "to this model over all the owner's keys and over every key; a request is answered only if its "
        "rows fit in all three, and budgets do not reset",
        "owner": cap(caps[1], used[1]),
        "global": cap(caps[2], used[2]),
    }


def describe_standing(standing: Standing | None) -> dict[str, Any]:
    """The key's standing on a model, as `GET /v2/models/{id}` reports it (docs/enforcement.md)."""
    if standing is None:
        return {"state": "good"}
    return {
        "state": standing.state,
        "alert_id": standing.alert_id,
        "since": standing.since.isoformat(),
        "rate_fraction": standing.rate_fraction,
        "budget_limit": standing.budget_limit,
    }


SCOPE_NAMES = {
    "key": "this key's budget on this model",
    "owner": "the owner's budget on this model (all the owner's keys together)",
    "global": "the model's global budget (every key together)",
}


def refuse_suspended(model_id: uuid.UUID, standing: Standing | None) -> None:
    """403 of its own type when the key is suspended on the model, naming the alert."""
    if standing is None or not standing.suspended:
        return
    raise Problem(
        403,
        f"this key is suspended on model {model_id} after extraction alert {standing.alert_id} (its "
        "queries looked like a copy being made); the model's owner can reinstate it",
        slug="key-suspended",
        title="Key suspended",
        alert_id=standing.alert_id,
        suspended_at=standing.since.isoformat(),
    )


async def charge(
    limits: Limits,
    key: KeyInfo,
    caps: list[Cap],
    rows: int,
    default_rate: int,
    budget: Budget,
    standing: Standing | None = None,
) -> dict[str, str]:
    """Count one request against the key's rate limit (cut while the key is throttled) and reserve its rows
    on every cap, atomically; returns the headers to send. 429 saying which limit or budget ran out."""
    own = key.rate_limit_per_minute or default_rate
    rate = own if standing is None else standing.rate(own)
    got = await limits.admit(key.id, rate, caps, rows)
    headers = {
        "X-RateLimit-Limit": str(rate),
        "X-RateLimit-Remaining": str(got.rate_remaining),
        "X-RateLimit-Reset": str(got.rate_reset),
    }
    if not got.rate_ok:
        throttled = ""
        if standing is not None and rate != own:
            throttled = f" (throttled from {own} after extraction alert {standing.alert_id})"
        raise Problem(
            429,
            f"rate limit of {rate} requests per minute{throttled} reached; a slot frees in "
            f"{got.rate_reset} s",
            slug="rate-limited",
            headers=headers | {"Retry-After": str(got.rate_reset)},
            limit={"scope": "rate", "limit": rate, "window_seconds": 60, "resets_in_seconds": got.rate_reset},
        )
    capped = [(c, u) for c, u in zip(caps, got.used, strict=True) if c.limit is not None]
    if capped:
        # The headers name the cap closest to running out (the key's on a tie).
        c, u = min(capped, key=lambda cu: cu[0].limit - cu[1])  # type: ignore[operator]
        source = budget.source if c.counter.scope == "key" else c.counter.scope
        if c.counter.scope == "key" and standing is not None and standing.budget_limit is not None:
            source = "probation"
        assert c.limit is not None
        headers |= {
            "X-Query-Budget-Limit": str(c.limit),
            "X-Query-Budget-Remaining": str(max(c.limit - u, 0)),
            "X-Query-Budget-Source": source,
        }
    if got.exhausted is not None:
        c, u = caps[got.exhausted], got.used[got.exhausted]
        raise Problem(
            429,
            f"query budget exhausted: {SCOPE_NAMES[c.counter.scope]}, {c.reason}: {u} of {c.limit} "
            f"rows used, this request needs {rows}; it does not reset",
            slug="query-budget-exhausted",
            headers=headers,
            budget={
                "scope": c.counter.scope,
                "limit": c.limit,
                "used": u,
                "requested": rows,
                "reason": c.reason,
                "resets": None,
            },
        )
    return headers
