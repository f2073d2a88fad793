"""ORM: API keys and their query usage, the dashboard's sessions, datasets, jobs, job events, artifacts,
uploaded models; each owned object carries its owner_id."""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every back end (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to a UTCDateTime column")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON(), list[Any]: JSON()}


class JobStatus(enum.StrEnum):
    queued = "queued"
    training = "training"
    auditing = "auditing"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL

    @property
    def running(self) -> bool:
        return self in RUNNING


TERMINAL = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled})
RUNNING = frozenset({JobStatus.training, JobStatus.auditing})
REPORT_NAME = "report.json"  # the audit report artifact of a succeeded job
# A job audited with a serving policy also publishes it, fitted to its teacher: tensors + config.
POLICY_NAME, POLICY_CONFIG_NAME = "policy.safetensors", "policy.json"
MONITOR_NAME = "monitor.json"  # the extraction monitor calibrated at job end (`ml.monitor.Reference`)
SERVING_NAME = "serving.json"  # what the model is served through (`ml.served.ServedSpec`), kind "serving"


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    owner_id: Mapped[uuid.UUID] = mapped_column(index=True)
    name: Mapped[str] = mapped_column(String(200))
    prefix: Mapped[str] = mapped_column(String(16))  # shown to people to tell keys apart
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex of the secret
    scopes: Mapped[list[Any]]
    query_budget: Mapped[int | None] = mapped_column(Integer)  # rows per model; None: unlimited
    rate_limit_per_minute: Mapped[int | None] = mapped_column(Integer)  # None: the server default
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None] = mapped_column(index=True)


class DashboardSession(Base):
    """A signed-in dashboard session (`app.services.sessions`), kept server-side so that it can end everywhere
    at once. Keyed by the sha256 of the session id, which only the browser's signed cookie holds."""

    __tablename__ = "dashboard_sessions"

    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_hash: Mapped[str] = mapped_column(String(64))  # the signed-in key (`ApiKey.key_hash`)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(index=True)
    revoked_at: Mapped[datetime | None]  # signed out


class QueryUsage(Base):
    """Rows answered per model, counted per key, per owner and over all (`scope`); the durable copy of the
    live counters. `model_id` is any served model's id (a job's or an upload's), hence no foreign key."""

    __tablename__ = "query_usage"

    scope: Mapped[str] = mapped_column(String(8), primary_key=True)  # key | owner | model
    subject_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)  # key id, owner id, or the model id
    model_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    used: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Dataset(Base):
    __tablename__ = "datasets"
    __table_args__ = (UniqueConstraint("owner_id", "sha256"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    owner_id: Mapped[uuid.UUID] = mapped_column(index=True)
    name: Mapped[str] = mapped_column(String(200))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int]
    storage_key: Mapped[str] = mapped_column(String(200))
    input_shape: Mapped[list[Any]]
    num_classes: Mapped[int]
    n_train: Mapped[int]
    n_test: Mapped[int]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("owner_id", "idempotency_key"),
        Index("ix_jobs_owner_created", "owner_id", "created_at", "id"),
        Index("ix_jobs_status_lease", "status", "lease_expires_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    owner_id: Mapped[uuid.UUID]
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.queued.value)
    spec: Mapped[dict[str, Any]]  # the validated request: teacher TrainConfig + AuditConfig
    dataset_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("datasets.id"))
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    request_hash: Mapped[str] = mapped_column(String(64))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer)
    worker_id: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None]
    # last time a broker message was sent (a running job: its audit, `mark_handed_off`); None: none in flight
    enqueued_at: Mapped[datetime | None]
    cancel_requested_at: Mapped[datetime | None]
    error: Mapped[str | None] = mapped_column(Text)
    last_event_seq: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class JobEvent(Base):
    __tablename__ = "job_events"
    __table_args__ = (UniqueConstraint("job_id", "seq"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    seq: Mapped[int]  # 1, 2, ... per job: the SSE event id
    kind: Mapped[str] = mapped_column(String(32))  # status | epoch | progress
    data: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Artifact(Base):
    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("job_id", "name"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    owner_id: Mapped[uuid.UUID] = mapped_column(index=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))  # file name offered on download
    kind: Mapped[str] = mapped_column(String(32))  # report | weights | config | policy | policy_config
    media_type: Mapped[str] = mapped_column(String(100))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int]
    storage_key: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class UploadedModel(Base):
    """An owner's own model: an ONNX file, or a zoo checkpoint (safetensors + its JSON config)."""

    __tablename__ = "uploaded_models"
    __table_args__ = (Index("ix_uploaded_models_owner_created", "owner_id", "created_at"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    owner_id: Mapped[uuid.UUID]
    name: Mapped[str] = mapped_column(String(200))
    format: Mapped[str] = mapped_column(String(16))  # onnx | checkpoint
    sha256: Mapped[str] = mapped_column(String(64))  # of the model file (the .onnx or the .safetensors)
    size_bytes: Mapped[int]
    storage_key: Mapped[str] = mapped_column(String(200))
    config_key: Mapped[str | None] = mapped_column(String(200))  # the checkpoint's model.json
    arch: Mapped[str] = mapped_column(String(64))  # the zoo architecture, or "onnx"
    output: Mapped[str] = mapped_column(String(16))  # logits | probabilities
    input_shape: Mapped[list[Any]]
    num_classes: Mapped[int]
    class_names: Mapped[list[Any]]
    dataset_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("datasets.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class MonitorAlert(Base):
    """An extraction alert on a served model (`ml.monitor`): a key's test or the model's test over all keys
    crossed its threshold. `model_id` is the job's id (the model's)."""

    __tablename__ = "monitor_alerts"
    __table_args__ = (Index("ix_monitor_alerts_model_created", "model_id", "created_at", "id"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    model_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    owner_id: Mapped[uuid.UUID]
    kind: Mapped[str] = mapped_column(String(8))  # key | model
    statistic: Mapped[float]
    threshold: Mapped[float]
    queries: Mapped[int] = mapped_column(BigInteger)  # queries the model's monitor had seen
    keys: Mapped[list[Any]]  # [{"key_id", "statistic", "queries", "hits", ...}]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class EnforcementPolicyRow(Base):
    """A served model's enforcement policy as its owner last set it (`ml.enforcement.EnforcementPolicy`);
    a model without a row follows its job's `serving.enforcement`."""

    __tablename__ = "enforcement_policies"

    model_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    owner_id: Mapped[uuid.UUID]
    policy: Mapped[dict[str, Any]]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class KeyStanding(Base):
    """A key's standing on a model now (`ml.enforcement.Standing`): `state` throttled, probation or
    suspended, or `active` once the owner reinstated it (the row stays, so that every API process sees the
    change by `updated_at`)."""

    __tablename__ = "key_standings"

    model_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    key_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"), primary_key=True)
    owner_id: Mapped[uuid.UUID]
    state: Mapped[str] = mapped_column(String(16), index=True)  # throttled | probation | suspended | active
    alert_id: Mapped[uuid.UUID | None]
    rate_fraction: Mapped[float | None]
    budget_limit: Mapped[int | None] = mapped_column(BigInteger)
    since: Mapped[datetime] = mapped_column(default=utcnow)
    reviewed_at: Mapped[datetime | None]  # the owner looked and kept the key held
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class EnforcementAction(Base):
    """One enforcement action, append-only: what was done to which key on which model, after which alert,
    when, and by whom (the monitor, or the owner through one of its keys)."""

    __tablename__ = "enforcement_actions"
    __table_args__ = (Index("ix_enforcement_actions_model_created", "model_id", "created_at", "id"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    model_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    owner_id: Mapped[uuid.UUID]
    key_id: Mapped[uuid.UUID]
    # notify | throttle | probation | suspend (the monitor); reinstate | keep | revoke (the owner)
    action: Mapped[str] = mapped_column(String(16))
    alert_id: Mapped[uuid.UUID | None]
    actor: Mapped[str] = mapped_column(String(8))  # monitor | owner
    actor_key_id: Mapped[uuid.UUID | None]  # the owner's key that acted
    detail: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Webhook(Base):
    """An owner's webhook: alerts and enforcement actions on its models are POSTed to `url`, signed with
    `secret` (HMAC-SHA256; the secret is kept to sign with, and shown once). Deleting sets deleted_at, so
    that its delivery log stays."""

    __tablename__ = "webhooks"
    __table_args__ = (Index("ix_webhooks_owner_created", "owner_id", "created_at", "id"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    owner_id: Mapped[uuid.UUID]
    url: Mapped[str] = mapped_column(String(2000))
    secret: Mapped[str] = mapped_column(String(100))
    description: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    deleted_at: Mapped[datetime | None]


class WebhookDelivery(Base):
    """One event to one webhook and every attempt to deliver it: `status` pending (next try at
    `next_attempt_at`), delivered, or failed (attempts used up, or the webhook was deleted)."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_hook_created", "webhook_id", "created_at", "id"),
        Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    webhook_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("webhooks.id", ondelete="CASCADE"))
    owner_id: Mapped[uuid.UUID]
    event: Mapped[str] = mapped_column(String(32))  # alert | enforcement
    payload: Mapped[dict[str, Any]]  # the body sent, as JSON
    status: Mapped[str] = mapped_column(String(16))  # pending | delivered | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    log: Mapped[list[Any]]  # per attempt: {"at", "status_code", "error", "ms"}
    next_attempt_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None]


class Verification(Base):
    """One verification of a suspect against a model's committed challenge: the suspect (an uploaded model,
    posted answers, or a remote endpoint whose headers are kept only in `headers_sealed`, encrypted), its
    status (running | done | failed), the verdict, the suspect's answers and, for an endpoint, the log of
    every request; `commitment` names the challenge generation it used."""

    __tablename__ = "verifications"
    __table_args__ = (Index("ix_verifications_model_created", "model_id", "created_at", "id"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    owner_id: Mapped[uuid.UUID]
    model_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16))  # answers | model | endpoint
    request: Mapped[dict[str, Any]]  # what was asked, without secrets (an endpoint's header names only)
    headers_sealed: Mapped[bytes | None] = mapped_column(LargeBinary)
    status: Mapped[str] = mapped_column(String(16))  # running | done | failed
    verdict: Mapped[dict[str, Any] | None]
    answers: Mapped[list[Any] | None]
    log: Mapped[list[Any] | None]
    commitment: Mapped[dict[str, Any]]  # {sha256, committed_at, generation}
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]
