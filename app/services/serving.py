"""Serving a model as it was audited: a small LRU of loaded models with what their job published to serve
them through (`serving.json`: output mode, fitted policy, budgets, enforcement; `ml.served`), the extraction
monitor's calibration, and per-key policy state."""

from __future__ import annotations

import json
import secrets
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file
from sqlalchemy import select
from sqlalchemy.orm import Session
from torch import nn

from app.core.coalesce import Coalescer
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
from app.problems import Problem, not_found
from app.services.jobs import job_artifact, job_artifacts
from ml.loading import CONFIG_NAME, ONNX_NAME, WEIGHTS_NAME, ModelMeta, load_model
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
    serve,
    served_spec,
)


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
    if (endpoint := (job.spec.get("teacher") or {}).get("endpoint")) is not None:
        raise Problem(
            409,
            f"model {job.id} is served elsewhere, at {endpoint['url']}: cmim audited it as deployed and "
            "holds no weights to serve; send its queries to its own endpoint",
            slug="model-served-elsewhere",
        )
    published = {a.name: a.storage_key for a in job_artifacts(session, job.id)}
    if CONFIG_NAME not in published:
        raise Problem(409, f"model {job.id} has no published {CONFIG_NAME}", slug="model-not-ready")
    # An owner's ONNX model is served as a black box through onnxruntime; a zoo checkpoint through torch.
    weights = published.get(ONNX_NAME) or job_artifact(session, job.id, WEIGHTS_NAME).storage_key
    model, meta = load_model(store, weights, published[CONFIG_NAME])
    assert meta is not None  # a published model always has its config
    spec = published_spec(session, store, job)
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


def published_spec(session: Session, store: ArtifactStore, job: Job) -> ServedSpec:
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
