"""Jobs: create (validated, idempotent), list (cursor pages), read, cancel, their artifacts and report."""

from __future__ import annotations

import json
import uuid
from typing import Any

from sqlalchemy import and_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.models import (
    REPORT_NAME,
    ApiKey,
    Artifact,
    Job,
    JobEvent,
    JobStatus,
)
from app.core.queue import enqueue, request_cancel, status_event
from app.core.storage import ArtifactStore
from app.problems import Problem
from app.services.job_requests import job_spec, request_hash
from app.services.job_views import audit_starts, job_out, job_summary, progress_events
from app.services.pagination import newest_first
from app.services.schemas import (
    JobCreate,
    JobList,
    JobOut,
)
from app.services.tenancy import get_owned


def _with_last_event(q: Any) -> Any:
    return q.add_columns(JobEvent).outerjoin(
        JobEvent, and_(JobEvent.job_id == Job.id, JobEvent.seq == Job.last_event_seq)
    )


def read_job(session: Session, job_id: uuid.UUID, key: ApiKey) -> JobOut:
    """The caller's job with its progress (one query for its latest event); 404 for another owner's."""
    job = owned_job(session, job_id, key)
    last = session.scalar(
        select(JobEvent).where(JobEvent.job_id == job.id, JobEvent.seq == job.last_event_seq)
    )
    return job_out(
        job, progress_events(session, [(job, last)]).get(job.id), audit_starts(session, [job]).get(job.id)
    )


def _by_idempotency_key(session: Session, key: ApiKey, idempotency_key: str, digest: str) -> Job | None:
    job = session.scalar(
        select(Job).where(Job.owner_id == key.owner_id, Job.idempotency_key == idempotency_key)
    )
    if job is not None and job.request_hash != digest:
        raise Problem(
            422,
            "this Idempotency-Key was already used with a different request body",
            slug="idempotency-key-reused",
        )
    return job


def create_job(
    session: Session, settings: Settings, key: ApiKey, body: JobCreate, idempotency_key: str | None
) -> tuple[Job, bool]:
    """Validate and insert a queued job; returns (job, created): a reused Idempotency-Key gets the first."""
    digest = request_hash(body)
    if idempotency_key and (job := _by_idempotency_key(session, key, idempotency_key, digest)):
        return job, False
    spec = job_spec(session, settings, key, body)
    job = Job(
        owner_id=key.owner_id,
        status=JobStatus.queued.value,
        spec=spec,
        dataset_id=body.dataset_id,
        idempotency_key=idempotency_key,
        request_hash=digest,
        attempts=0,
        max_attempts=settings.max_attempts,
        last_event_seq=0,
    )
    try:
        session.add(job)
        session.flush()
        status_event(session, job.id, JobStatus.queued)
        session.commit()
    except IntegrityError:
        # A concurrent request with the same Idempotency-Key won the race: answer with its job.
        session.rollback()
        if idempotency_key and (job := _by_idempotency_key(session, key, idempotency_key, digest)):
            return job, False
        raise
    return job, True


def submit_job(
    session: Session, settings: Settings, key: ApiKey, body: JobCreate, idempotency_key: str | None
) -> tuple[Job, bool]:
    """`create_job`, then the new job's id is enqueued (a reused Idempotency-Key enqueues nothing)."""
    job, created = create_job(session, settings, key, body, idempotency_key)
    if created:
        enqueue(settings, job.id)
    return job, created


def list_jobs(
    session: Session,
    key: ApiKey,
    limit: int,
    cursor: str | None,
    status: JobStatus | None,
    verdict: str | None = None,
) -> JobList:
    """Newest first, each with its progress (read from its last event, joined); `next_cursor` continues
    after the last item. `verdict` keeps succeeded jobs with that verdict."""
    q = _with_last_event(select(Job)).where(Job.owner_id == key.owner_id)
    if status is not None:
        q = q.where(Job.status == status.value)
    if verdict is not None:
        q = q.where(Job.status == JobStatus.succeeded.value, JobEvent.data["verdict"].as_string() == verdict)
    page, next_cursor = newest_first(session, q, Job.created_at, Job.id, limit, cursor)
    rows = [tuple(r) for r in page]
    events = progress_events(session, rows)
    starts = audit_starts(session, [j for j, _ in rows])
    items = [job_summary(j, events.get(j.id), starts.get(j.id)) for j, _ in rows]
    return JobList(items=items, next_cursor=next_cursor)


def job_artifacts(session: Session, job_id: uuid.UUID) -> list[Artifact]:
    return list(session.scalars(select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.name)))


def job_artifact(session: Session, job_id: uuid.UUID, name: str) -> Artifact:
    a = session.scalar(select(Artifact).where(Artifact.job_id == job_id, Artifact.name == name))
    if a is None:
        raise Problem(404, f"job {job_id} has no artifact named {name!r}", slug="not-found")
    return a


def owned_job(session: Session, job_id: uuid.UUID, key: ApiKey) -> Job:
    return get_owned(session, Job, job_id, key, "job")


def cancel_job(session: Session, job_id: uuid.UUID, key: ApiKey) -> JobOut:
    """Ask the job's worker to stop; 409 when the job has already finished."""
    job = owned_job(session, job_id, key)
    if JobStatus(job.status).terminal:
        raise Problem(409, f"job {job_id} has already {job.status}", slug="job-finished")
    request_cancel(session, job_id)
    session.commit()
    session.refresh(job)
    return read_job(session, job_id, key)


def read_report(session: Session, store: ArtifactStore, job: Job) -> dict[str, Any]:
    """The succeeded job's report as stored (read hash-checked); 409 before it has succeeded."""
    return json.loads(store.read_bytes(report_artifact(session, job).storage_key))


def report_artifact(session: Session, job: Job) -> Artifact:
    """The job's report; 409 while the job has not succeeded."""
    if job.status != JobStatus.succeeded.value:
        raise Problem(
            409,
            f"job {job.id} is {job.status}; its report exists only once it has succeeded",
            slug="report-not-ready",
            title="Report not ready",
            status_of_job=job.status,
        )
    return job_artifact(session, job.id, REPORT_NAME)
