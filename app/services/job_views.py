"""How a job is shown, to the API and the dashboard alike: its links, its progress and time left, its
result, its summary, and its artifacts."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.core.models import (
    Artifact,
    Job,
    JobEvent,
    JobStatus,
    utcnow,
)
from app.services.schemas import (
    ArtifactOut,
    JobOut,
    JobResult,
    JobSummary,
    Links,
    Progress,
)

API = "/api/v1"


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
