"""A job's inputs: its row, its teacher and audit configs (on this worker's device), its prepared data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.core.config import Settings
from app.core.db import session_scope
from app.core.models import Dataset, Job
from app.core.storage import ArtifactStore
from ml.audit import AuditConfig
from ml.data import Dataset as Data
from ml.data import load_dataset
from ml.train import TrainConfig
from worker.lease import JobContext


@dataclass
class JobInputs:
    job: Job  # detached from its session
    teacher: TrainConfig
    audit: AuditConfig
    data: Data  # prepared as the teacher's recipe says

    @property
    def model_id(self) -> str | None:
        """The uploaded model the job audits (None: it trains its teacher)."""
        return self.job.spec["teacher"].get("model_id")

    @property
    def endpoint(self) -> dict[str, Any] | None:
        """The deployed model the job audits through its endpoint, as its spec keeps it (None: not one)."""
        return self.job.spec["teacher"].get("endpoint")

    @property
    def fine_tune(self) -> bool:
        return bool(self.job.spec["teacher"].get("fine_tune", False))

    @property
    def marks(self) -> dict[str, object]:
        """The job's marks the report keeps: a preset, an `indicative` flag."""
        return {k: self.job.spec[k] for k in ("preset", "indicative") if k in self.job.spec}


def read_job(ctx: JobContext) -> Job:
    with ctx.session() as s:
        job = s.get(Job, ctx.claim.job_id)
        s.expunge(job)
    return job


def load_data(settings: Settings, store: ArtifactStore, job: Job, teacher: TrainConfig) -> Data:
    """The job's raw data: a named data set, or the owner's upload from the store."""
    if job.dataset_id is None:
        return load_dataset(teacher.dataset, **teacher.dataset_params)
    with session_scope(settings.database_url) as s:
        upload = s.get(Dataset, job.dataset_id)
        assert upload is not None, "uploaded datasets are never deleted while a job uses them"
        key = upload.storage_key
    return load_dataset(teacher.dataset, path=str(store.local_path(key)))


def job_inputs(ctx: JobContext, store: ArtifactStore) -> JobInputs:
    """The job's row, its teacher and audit configs, and its prepared data."""
    settings = ctx.settings
    job = ctx.retrying(lambda: read_job(ctx), "read the job")
    spec = {k: v for k, v in job.spec["teacher"].items() if k not in ("model_id", "fine_tune", "endpoint")}
    teacher_cfg = TrainConfig.model_validate(spec | {"device": settings.device})
    audit_cfg = AuditConfig.model_validate(job.spec["audit"] | {"device": settings.device})
    raw = ctx.retrying(lambda: load_data(settings, store, job, teacher_cfg), "load the data")
    return JobInputs(job, teacher_cfg, audit_cfg, teacher_cfg.prepare(raw))
