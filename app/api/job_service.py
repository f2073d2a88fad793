"""Jobs behind the routes: create (validated, idempotent), list (cursor pages), events, artifacts."""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import and_, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.api.deps import get_owned
from app.api.pagination import newest_first
from app.core.config import Settings
from app.core.models import (
    REPORT_NAME,
    ApiKey,
    Artifact,
    Dataset,
    Job,
    JobEvent,
    JobStatus,
    UploadedModel,
    utcnow,
)
from app.core.queue import status_event
from app.problems import Problem, validation_problem
from app.services.schemas import (
    ArtifactOut,
    JobCreate,
    JobList,
    JobOut,
    JobResult,
    JobSummary,
    Links,
    Progress,
)
from ml.data import DATASETS
from ml.data.augment import check_augmentation
from ml.presets import PRESETS
from ml.train import fine_tune_defaults

API = "/api/v1"
UPLOADED_DATASET = "npz"  # the ML library's loader for a user's npz file
# Training-set size assumed for a built-in dataset whose parameters do not say (the largest, CIFAR).
DEFAULT_TRAIN_SIZE = 50_000


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


PROGRESS_KINDS = ("status", "epoch", "progress")  # the events a job's progress is read from
# The share of the audit's work units done before its own pace is trusted to estimate the time left: the
# first units carry the audit's set-up, and their pace alone misleads by more than the wait costs.
AUDIT_MEASURED = 0.05


def _stage_weights(spec: dict[str, Any]) -> dict[str, float]:
    """Each stage's share of the job's estimated cost (recorded at creation; equal shares before that)."""
    cost = spec.get("cost") or {"teacher": 1.0, "control": 1.0, "audit": 1.0}
    total = sum(cost.values()) or 1.0
    return {stage: cost.get(stage, 0.0) / total for stage in ("teacher", "control", "audit")}


def job_progress(job: Job, event: JobEvent | None, audit_started: datetime | None = None) -> Progress:
    """Where the job stands, from its latest progress event (`event`: a status, epoch or progress event)
    and, while it audits, when its audit began (`audit_starts`)."""
    status = JobStatus(job.status)
    if status.terminal:
        when = job.finished_at
        return Progress(
            stage=status.value, fraction=1.0 if status == JobStatus.succeeded else None, updated_at=when
        )
    if status == JobStatus.queued or event is None:
        return Progress(stage="queued", fraction=0.0, updated_at=job.created_at)
    w, data = _stage_weights(job.spec), event.data
    fields: dict[str, Any] = {}
    if event.kind == "epoch":
        stage, epochs = data.get("stage", "teacher"), max(int(data.get("epochs") or 1), 1)
        before = w["teacher"] if stage == "control" else 0.0
        fraction = before + w.get(stage, 0.0) * min(int(data.get("epoch", 0)), epochs) / epochs
        fields = {"epoch": data.get("epoch"), "epochs": data.get("epochs"), "test_acc": data.get("test_acc")}
    elif event.kind == "progress":
        stage, total = "audit", max(int(data.get("total") or 1), 1)
        fraction = w["teacher"] + w["control"] + w["audit"] * min(int(data.get("done", 0)), total) / total
        fields = {"done": data.get("done"), "total": data.get("total"), "message": data.get("message")}
    elif status == JobStatus.auditing:
        stage, fraction = "audit", w["teacher"] + w["control"]
    else:
        stage, fraction = "teacher", 0.0
    fraction = min(max(fraction, 0.0), 1.0)
    return Progress(
        stage=stage,
        fraction=fraction,
        eta_seconds=_audit_time_left(event, audit_started),
        updated_at=event.created_at,
        **fields,
    )


def _audit_time_left(event: JobEvent, audit_started: datetime | None) -> float | None:
    """Seconds left, from the audit's own pace once it has done AUDIT_MEASURED of its work; else None.

    Only the audit's pace predicts the time left: it is the last stage and most of the job, and a student's
    sample-pass takes another time than the teacher's (another architecture, students trained side by side),
    so the teacher's pace scaled by the stages' costs was off by 10x and more (a quick job was shown 35
    minutes for 3). No number is better than a wrong one.
    """
    if event.kind != "progress" or audit_started is None:
        return None
    total = max(int(event.data.get("total") or 1), 1)
    done = min(max(int(event.data.get("done") or 0), 0), total)
    if done / total < AUDIT_MEASURED:
        return None
    elapsed = (utcnow() - audit_started).total_seconds()
    return max(elapsed * (total - done) / done, 0.0)


def job_result(job: Job, event: JobEvent | None) -> JobResult | None:
    """A succeeded job's verdict, teacher accuracy and safe budget, as its final status event records them."""
    if job.status != JobStatus.succeeded.value or event is None or event.kind != "status":
        return None
    return JobResult.model_validate({k: event.data.get(k) for k in JobResult.model_fields})


def job_summary(job: Job, event: JobEvent | None = None, audit_started: datetime | None = None) -> JobSummary:
    """The job as listed; `event` is its latest progress event (see `progress_events`), `audit_started`
    when its audit began (see `audit_starts`)."""
    return JobSummary(
        id=job.id,
        status=job.status,
        attempts=job.attempts,
        max_attempts=job.max_attempts,
        error=job.error,
        cancel_requested=job.cancel_requested_at is not None,
        dataset_id=job.dataset_id,
        created_at=job.created_at,
        updated_at=job.updated_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        preset=job.spec.get("preset"),
        indicative=bool(job.spec.get("indicative", False)),
        progress=job_progress(job, event, audit_started),
        result=job_result(job, event),
        links=job_links(job.id),
    )


def job_out(job: Job, event: JobEvent | None = None, audit_started: datetime | None = None) -> JobOut:
    return JobOut(**job_summary(job, event, audit_started).model_dump(), spec=job.spec)


def progress_events(session: Session, jobs: list[tuple[Job, JobEvent | None]]) -> dict[uuid.UUID, JobEvent]:
    """Each job's latest progress event: its last event, or (rarely, after a warning) the latest before it."""
    found = {job.id: e for job, e in jobs if e is not None and e.kind in PROGRESS_KINDS}
    for job, e in jobs:
        if e is not None and job.id not in found:  # one short indexed look back per such job
            q = (
                select(JobEvent)
                .where(JobEvent.job_id == job.id, JobEvent.kind.in_(PROGRESS_KINDS))
                .order_by(JobEvent.seq.desc())
                .limit(1)
            )
            if (last := session.scalar(q)) is not None:
                found[job.id] = last
    return found


def audit_starts(session: Session, jobs: list[Job]) -> dict[uuid.UUID, datetime]:
    """When each auditing job's audit began (its latest `auditing` status event), in one query for all."""
    auditing = [j.id for j in jobs if j.status == JobStatus.auditing.value]
    if not auditing:
        return {}
    q = (
        select(JobEvent.job_id, func.max(JobEvent.created_at))
        .where(
            JobEvent.job_id.in_(auditing),
            JobEvent.kind == "status",
            JobEvent.data["status"].as_string() == JobStatus.auditing.value,
        )
        .group_by(JobEvent.job_id)
    )
    return {job_id: when for job_id, when in session.execute(q)}


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


def _train_size(session: Session, body: JobCreate, teacher: dict[str, Any]) -> int:
    """How many training samples the teacher sees: the upload's, else the built-in's parameters say."""
    if body.dataset_id is not None:
        ds = session.get(Dataset, body.dataset_id)
        return ds.n_train if ds is not None else DEFAULT_TRAIN_SIZE
    return int(teacher["dataset_params"].get("num_train", DEFAULT_TRAIN_SIZE))


def stage_costs(body: JobCreate, n_train: int) -> dict[str, float]:
    """A job's estimated cost in sample-passes per stage: training samples x epochs of every model trained.

    The teacher, its CE control, then the audit: per seed and student, each LS row on the attacker's
    labelled data, and each attack row against each attacked black box, once plus once per query budget.
    """
    t, a = body.teacher, body.audit
    teachers = 2 if a.control else 1
    attacked = teachers + (1 if a.compare_raw else 0)
    labelled = max(1, int(n_train * a.labelled_fraction))
    queried = labelled + (a.transfer_size or 0)
    ls_rows = len(a.ls_eps) * (2 if a.ls_mixup else 1)
    try:
        attack_rows = len(a.attack_rows())
    except ValueError as e:
        raise validation_problem(
            [{"loc": ["body", "audit", "attack_params"], "msg": str(e), "type": "value_error"}]
        ) from None
    phases = 1 + len(a.budgets(labelled))
    per_student = ls_rows * labelled + attack_rows * attacked * phases * queried
    return {
        "teacher": float(n_train * t.epochs),
        "control": float(n_train * t.epochs * (teachers - 1)),
        "audit": float(a.epochs * a.seeds * len(a.students) * per_student),
    }


def job_cost(body: JobCreate, n_train: int) -> float:
    """A job's estimated cost in sample-passes: training samples x epochs, summed over every model trained."""
    return sum(stage_costs(body, n_train).values())


def _check_cost(
    session: Session, settings: Settings, body: JobCreate, teacher: dict[str, Any]
) -> dict[str, float]:
    """The job's cost per stage; 422 when their sum is over the server's ceiling."""
    costs = stage_costs(body, _train_size(session, body, teacher))
    cost = sum(costs.values())
    if cost > settings.max_job_cost:
        raise validation_problem(
            [
                {
                    "loc": ["body"],
                    "type": "too_costly",
                    "msg": f"the job's estimated cost is {cost:.3g} sample-passes (training samples x "
                    f"epochs over every model it trains), over this server's ceiling of "
                    f"{settings.max_job_cost:.3g}: fewer epochs, seeds, students, attacks, LS rows, "
                    "query budgets or samples",
                    "ctx": {"estimated_cost": cost, "max_job_cost": settings.max_job_cost},
                }
            ]
        )
    return costs


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
    costs = _check_cost(session, settings, body, teacher)
    audit = body.audit.model_dump(mode="json")
    _check_augmentation(session, body, teacher)
    if body.teacher.model_id is not None:
        _uploaded_teacher(session, key, body, teacher, audit)
    elif body.teacher.fine_tune:
        raise _field_error(
            ["teacher", "fine_tune"], "fine_tune needs teacher.model_id: the model to start from"
        )
    serving = body.serving.model_dump(mode="json")
    spec: dict[str, Any] = {"teacher": teacher, "audit": audit, "serving": serving}
    if body.preset is not None:
        spec |= {"preset": body.preset, "indicative": PRESETS.get(body.preset).indicative}
    # What each stage weighs in the job's progress: a stage that trains nothing weighs nothing.
    trained = body.teacher.model_id is None or body.teacher.fine_tune
    spec["cost"] = costs | {"teacher": costs["teacher"] if trained else 0.0}
    spec["cost"]["control"] = costs["control"] if audit["control"] else 0.0
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


# ---------------------------------------------------------------- list


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
