"""Jobs behind the routes: create (validated, idempotent), list (cursor pages), events, artifacts."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any

from sqlalchemy import and_, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from app.api.deps import get_owned
from app.api.schemas import ArtifactOut, EventOut, JobCreate, JobList, JobOut, Links
from app.core.config import Settings
from app.core.models import REPORT_NAME, ApiKey, Artifact, Dataset, Job, JobEvent, JobStatus, UploadedModel
from app.core.queue import status_event
from app.problems import Problem, validation_problem
from ml.data import DATASETS
from ml.data.augment import check_augmentation
from ml.train import fine_tune_defaults

API = "/api/v1"
UPLOADED_DATASET = "npz"  # the ML library's loader for a user's npz file


# ---------------------------------------------------------------- representation


def job_links(job_id: uuid.UUID) -> Links:
    base = f"{API}/jobs/{job_id}"
    return Links(
        self=base,
        events=f"{base}/events",
        report=f"{base}/report",
        report_html=f"{base}/report.html",
        artifacts=f"{base}/artifacts",
        model=f"/v2/models/{job_id}",
    )


def job_out(job: Job) -> JobOut:
    return JobOut(
        id=job.id,
        status=job.status,
        attempts=job.attempts,
        max_attempts=job.max_attempts,
        error=job.error,
        cancel_requested=job.cancel_requested_at is not None,
        spec=job.spec,
        dataset_id=job.dataset_id,
        created_at=job.created_at,
        updated_at=job.updated_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        links=job_links(job.id),
    )


def event_out(event: JobEvent) -> EventOut:
    return EventOut(id=event.seq, kind=event.kind, data=event.data, created_at=event.created_at)


def artifact_out(a: Artifact) -> ArtifactOut:
    return ArtifactOut(
        name=a.name,
        kind=a.kind,
        media_type=a.media_type,
        sha256=a.sha256,
        size_bytes=a.size_bytes,
        created_at=a.created_at,
        url=f"{API}/jobs/{a.job_id}/artifacts/{a.name}",
    )


# ---------------------------------------------------------------- create


def _dataset_spec(session: Session, key: ApiKey, body: JobCreate) -> dict[str, Any]:
    """The teacher's dataset fields after checking them: an owned upload, or a built-in with valid params."""
    if body.dataset_id is not None:
        ds = session.get(Dataset, body.dataset_id)
        if ds is None or ds.owner_id != key.owner_id:
            uploads = session.scalars(select(Dataset.id).where(Dataset.owner_id == key.owner_id)).all()
            raise validation_problem(
                [
                    {
                        "loc": ["body", "dataset_id"],
                        "type": "unknown_choice",
                        "msg": f"no uploaded dataset {body.dataset_id}",
                        "choices": [str(u) for u in uploads],
                    }
                ]
            )
        return {"dataset": UPLOADED_DATASET, "dataset_params": {}}
    loader = DATASETS.get(body.teacher.dataset)
    if body.teacher.dataset == UPLOADED_DATASET:
        raise validation_problem(
            [
                {
                    "loc": ["body", "teacher", "dataset"],
                    "type": "value_error",
                    "msg": "to train on your own npz, upload it (POST /api/v1/datasets) "
                    "and pass its id as dataset_id",
                }
            ]
        )
    try:
        params = loader.params_model.model_validate(body.teacher.dataset_params)
    except ValueError as e:
        raise validation_problem(
            [
                {
                    "loc": ["body", "teacher", "dataset_params", *err["loc"]],
                    "msg": err["msg"],
                    "type": err["type"],
                }
                for err in e.errors()  # type: ignore[attr-defined]
            ]
        ) from None
    return {"dataset": body.teacher.dataset, "dataset_params": params.model_dump(mode="json")}


def _field_error(loc: list[str], msg: str, kind: str = "value_error", **extra: Any) -> Problem:
    return validation_problem([{"loc": ["body", *loc], "type": kind, "msg": msg, **extra}])


def _uploaded_teacher(
    session: Session, key: ApiKey, body: JobCreate, teacher: dict[str, Any], audit: dict[str, Any]
) -> None:
    """Check a job's uploaded teacher against its data and fill in what follows from it (in place): the
    architecture, the fine-tuning recipe, and no control for an ONNX model without a named one."""
    spec = body.teacher
    row = session.get(UploadedModel, spec.model_id)
    if row is None or row.owner_id != key.owner_id:
        owned = session.scalars(select(UploadedModel.id).where(UploadedModel.owner_id == key.owner_id)).all()
        raise _field_error(
            ["teacher", "model_id"],
            f"no uploaded model {spec.model_id}",
            "unknown_choice",
            choices=[str(m) for m in owned],
        )
    if body.dataset_id is not None:
        ds = session.get(Dataset, body.dataset_id)
        shape, classes = tuple(ds.input_shape), ds.num_classes
    else:
        info = DATASETS.get(teacher["dataset"]).info
        shape, classes = info.input_shape, info.num_classes
    if (shape is not None and tuple(row.input_shape) != tuple(shape)) or (
        classes is not None and row.num_classes != classes
    ):
        raise _field_error(
            ["teacher", "model_id"],
            f"model {row.id} takes {tuple(row.input_shape)} with {row.num_classes} classes; "
            f"the job's data has {shape} with {classes} classes",
        )
    if row.format == "onnx":
        if spec.fine_tune:
            raise _field_error(
                ["teacher", "fine_tune"],
                "an ONNX model is audited as a black box; fine-tuning needs a zoo checkpoint",
            )
        if body.audit.control_arch is None:
            audit["control"] = False  # no zoo architecture to train a CE control with
        else:
            teacher["arch"] = body.audit.control_arch
        return
    teacher["arch"] = row.arch
    if spec.fine_tune:
        tuned = fine_tune_defaults(spec)
        teacher |= {"lr": tuned.lr, "warmup_epochs": tuned.warmup_epochs}


def _check_augmentation(session: Session, body: JobCreate, teacher: dict[str, Any]) -> None:
    """422 when the requested augmentation does not fit the data's inputs (e.g. shifts on tabular data)."""
    if body.teacher.augmentation is None:
        return
    if body.dataset_id is not None:
        shape = tuple(session.get(Dataset, body.dataset_id).input_shape)
    else:
        shape = DATASETS.get(teacher["dataset"]).info.input_shape
    if shape is None:
        return
    try:
        check_augmentation(body.teacher.augmentation, shape)
    except ValueError as e:
        raise _field_error(["teacher", "augmentation"], str(e)) from None


def request_hash(body: JobCreate) -> str:
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


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
    teacher = body.teacher.model_dump(mode="json") | _dataset_spec(session, key, body)
    teacher["device"] = "auto"  # the worker decides where to run
    audit = body.audit.model_dump(mode="json")
    _check_augmentation(session, body, teacher)
    if body.teacher.model_id is not None:
        _uploaded_teacher(session, key, body, teacher, audit)
    elif body.teacher.fine_tune:
        raise _field_error(
            ["teacher", "fine_tune"], "fine_tune needs teacher.model_id: the model to start from"
        )
    job = Job(
        owner_id=key.owner_id,
        status=JobStatus.queued.value,
        spec={"teacher": teacher, "audit": audit},
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


# ---------------------------------------------------------------- list


def _encode_cursor(job: Job) -> str:
    raw = json.dumps([job.created_at.isoformat(), str(job.id)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        created, ident = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        return datetime.fromisoformat(created), uuid.UUID(ident)
    except (ValueError, TypeError) as e:
        raise validation_problem(
            [{"loc": ["query", "cursor"], "msg": f"invalid cursor: {e}", "type": "value_error"}]
        ) from None


def list_jobs(
    session: Session, key: ApiKey, limit: int, cursor: str | None, status: JobStatus | None
) -> JobList:
    """Newest first; `next_cursor` continues after the last item."""
    q = select(Job).where(Job.owner_id == key.owner_id)
    if status is not None:
        q = q.where(Job.status == status.value)
    if cursor:
        created, ident = _decode_cursor(cursor)
        q = q.where(or_(Job.created_at < created, and_(Job.created_at == created, Job.id < ident)))
    jobs = session.scalars(q.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)).all()
    more = len(jobs) > limit
    jobs = jobs[:limit]
    return JobList(items=[job_out(j) for j in jobs], next_cursor=_encode_cursor(jobs[-1]) if more else None)


# ---------------------------------------------------------------- events


def events_after(session: Session, job_id: uuid.UUID, after: int, limit: int = 1000) -> list[JobEvent]:
    q = select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.seq > after).order_by(JobEvent.seq)
    return list(session.scalars(q.limit(limit)))


def _poll(sessions: sessionmaker[Session], job_id: uuid.UUID, after: int) -> tuple[list[EventOut], bool]:
    with sessions() as s:
        events = [event_out(e) for e in events_after(s, job_id, after)]
        status = JobStatus(s.scalar(select(Job.status).where(Job.id == job_id)))
    return events, status.terminal


def sse_frame(event: EventOut) -> str:
    data = event.model_dump_json(include={"data", "created_at"})
    return f"id: {event.id}\nevent: {event.kind}\ndata: {data}\n\n"


async def sse_events(
    sessions: sessionmaker[Session],
    job_id: uuid.UUID,
    after: int,
    is_disconnected: Callable[[], Any],
    poll_seconds: float = 0.5,
    heartbeat_seconds: float = 15.0,
) -> AsyncIterator[str]:
    """The job's events from `after` on as SSE frames; ends once the job is finished and all are sent."""
    yield "retry: 2000\n\n"
    idle = 0.0
    while not await is_disconnected():
        events, terminal = await run_in_threadpool(_poll, sessions, job_id, after)
        for event in events:
            yield sse_frame(event)
            after = event.id
        if events:
            idle = 0.0
            continue
        if terminal:
            return
        await asyncio.sleep(poll_seconds)
        idle += poll_seconds
        if idle >= heartbeat_seconds:  # keeps proxies from closing a quiet stream
            idle = 0.0
            yield ": keep-alive\n\n"


# ---------------------------------------------------------------- artifacts and report


def job_artifacts(session: Session, job_id: uuid.UUID) -> list[Artifact]:
    return list(session.scalars(select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.name)))


def job_artifact(session: Session, job_id: uuid.UUID, name: str) -> Artifact:
    a = session.scalar(select(Artifact).where(Artifact.job_id == job_id, Artifact.name == name))
    if a is None:
        raise Problem(404, f"job {job_id} has no artifact named {name!r}", slug="not-found")
    return a


def owned_job(session: Session, job_id: uuid.UUID, key: ApiKey) -> Job:
    return get_owned(session, Job, job_id, key, "job")


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
