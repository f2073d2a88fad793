"""Jobs: create, list, read, cancel, follow (SSE), report (JSON and HTML), artifacts."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.responses import HTMLResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from app.api.deps import JobsRead, JobsWrite
from app.api.params import Cursor, Limit
from app.core.models import JobStatus
from app.services import jobs
from app.services.access import SessionDep, SettingsDep, StoreDep
from app.services.job_events import MAX_EVENT_ID, event_out, events_after, sse_events
from app.services.job_views import artifact_out
from app.services.jobs import (
    job_artifact,
    job_artifacts,
    job_out,
    list_jobs,
    owned_job,
    read_job,
    report_artifact,
)
from app.services.report_page import render_report
from app.services.schemas import (
    PRINTABLE,
    ArtifactOut,
    EventOut,
    JobCreate,
    JobList,
    JobOut,
    PresetOut,
    PrintableText,
)
from ml.catalog import PRESETS

router = APIRouter(prefix="/jobs", tags=["jobs"])
presets = APIRouter(prefix="/presets", tags=["jobs"])
Verdict = Literal["distillable", "undistillable", "inconclusive"]
JobId = Annotated[uuid.UUID, Path(description="the job's id")]


def _link(path: str, method: str, param: str) -> dict[str, Any]:
    ref = "#/paths/" + path.replace("~", "~0").replace("/", "~1") + f"/{method}"
    return {"operationRef": ref, "parameters": {param: "$response.body#/id"}}


# OpenAPI links: from a job to everything about it, so clients (and the fuzzer) can follow them.
JOB_LINKS = {
    "links": {
        "job": _link("/api/v1/jobs/{job_id}", "get", "job_id"),
        "events": _link("/api/v1/jobs/{job_id}/events", "get", "job_id"),
        "cancel": _link("/api/v1/jobs/{job_id}/cancel", "post", "job_id"),
        "report": _link("/api/v1/jobs/{job_id}/report", "get", "job_id"),
        "report_html": _link("/api/v1/jobs/{job_id}/report.html", "get", "job_id"),
        "artifacts": _link("/api/v1/jobs/{job_id}/artifacts", "get", "job_id"),
        "model": _link("/v2/models/{model_id}", "get", "model_id"),
        "model_ready": _link("/v2/models/{model_id}/ready", "get", "model_id"),
        "infer": _link("/v2/models/{model_id}/infer", "post", "model_id"),
        "predict": _link("/api/v1/models/{model_id}/predict", "post", "model_id"),
    }
}


@router.post(
    "", status_code=202, response_model=JobOut, summary="Submit a protection job", responses={202: JOB_LINKS}
)
async def submit_job(
    body: JobCreate,
    response: Response,
    key: JobsWrite,
    session: SessionDep,
    settings: SettingsDep,
    idempotency_key: Annotated[
        str | None,
        PRINTABLE,
        Header(min_length=1, max_length=200, description="retries with the same key return the first job"),
    ] = None,
) -> JobOut:
    job, _ = await run_in_threadpool(jobs.submit_job, session, settings, key, body, idempotency_key)
    response.headers["Location"] = f"/api/v1/jobs/{job.id}"
    return job_out(job)


@router.get("", response_model=JobList, summary="Your jobs, newest first")
def get_jobs(
    key: JobsRead,
    session: SessionDep,
    limit: Limit = 50,
    cursor: Cursor = None,
    status: JobStatus | None = None,
    verdict: Annotated[Verdict | None, Query(description="only succeeded jobs with this verdict")] = None,
) -> JobList:
    return list_jobs(session, key, limit, cursor, status, verdict)


@router.get(
    "/{job_id}", response_model=JobOut, summary="One job, with its progress", responses={200: JOB_LINKS}
)
def get_job(job_id: JobId, key: JobsRead, session: SessionDep) -> JobOut:
    return read_job(session, job_id, key)


@router.post("/{job_id}/cancel", status_code=202, response_model=JobOut, summary="Cancel a job")
def cancel_job(job_id: JobId, key: JobsWrite, session: SessionDep) -> JobOut:
    return jobs.cancel_job(session, job_id, key)


@router.get(
    "/{job_id}/events",
    summary="Progress events: SSE (resumable with Last-Event-ID), or JSON with ?after=N",
    responses={200: {"content": {"text/event-stream": {}, "application/json": {}}}},
    response_model=list[EventOut],
)
def job_events(
    request: Request,
    job_id: JobId,
    key: JobsRead,
    session: SessionDep,
    after: Annotated[
        int | None, Query(ge=0, le=MAX_EVENT_ID, description="return the events after this id as JSON")
    ] = None,
    last_event_id: Annotated[
        int | None, Header(ge=0, le=MAX_EVENT_ID, description="resume the stream after this event id")
    ] = None,
) -> list[EventOut] | StreamingResponse:
    owned_job(session, job_id, key)
    if after is not None:
        return [event_out(e) for e in events_after(session, job_id, after)]
    # The stream holds no connection while it waits: give this request's back to the pool now.
    session.close()
    watch = request.app.state.events
    watch.open(key.id)
    stream = sse_events(watch, key.id, job_id, last_event_id or 0, request.is_disconnected)
    return StreamingResponse(
        stream,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.get("/{job_id}/report", summary="The audit report (409 until the job has succeeded)")
def job_report(job_id: JobId, key: JobsRead, session: SessionDep, store: StoreDep) -> Response:
    artifact = report_artifact(session, owned_job(session, job_id, key))
    return Response(
        store.read_bytes(artifact.storage_key),
        media_type="application/json",
        headers={"ETag": f'"{artifact.sha256}"'},
    )


@router.get("/{job_id}/report.html", response_class=HTMLResponse, summary="The audit report as a page")
def job_report_html(job_id: JobId, key: JobsRead, session: SessionDep, store: StoreDep) -> HTMLResponse:
    job = owned_job(session, job_id, key)
    report = jobs.read_report(session, store, job)
    epochs = [e.data for e in events_after(session, job_id, 0, limit=100_000) if e.kind == "epoch"]
    return HTMLResponse(render_report(job_out(job), report, epochs))


@router.get("/{job_id}/artifacts", response_model=list[ArtifactOut], summary="The job's files")
def list_artifacts(job_id: JobId, key: JobsRead, session: SessionDep) -> list[ArtifactOut]:
    owned_job(session, job_id, key)
    return [artifact_out(a) for a in job_artifacts(session, job_id)]


@router.get(
    "/{job_id}/artifacts/{name}",
    summary="Download one file (ETag = its sha256)",
    responses={200: {"content": {"application/octet-stream": {}}}, 304: {"description": "not modified"}},
)
def download_artifact(
    job_id: JobId,
    name: PrintableText,
    key: JobsRead,
    session: SessionDep,
    store: StoreDep,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    owned_job(session, job_id, key)
    a = job_artifact(session, job_id, name)
    etag = f'"{a.sha256}"'
    headers = {
        "ETag": etag,
        "Content-Disposition": f'attachment; filename="{a.name}"',
        "Cache-Control": "private, max-age=31536000, immutable",
    }
    if if_none_match is not None and etag in {t.strip() for t in if_none_match.split(",")}:
        return Response(status_code=304, headers=headers)
    # Checked whole before the first byte goes out, so a changed object is a clear 502 problem, not a
    # cut-off download (the stream is checked again as it goes: iter_chunks withholds a bad ending).
    store.verify(a.storage_key)
    return StreamingResponse(
        store.iter_chunks(a.storage_key),
        media_type=a.media_type,
        headers=headers | {"Content-Length": str(a.size_bytes)},
    )


@presets.get(
    "", response_model=list[PresetOut], summary='Job presets: POST /api/v1/jobs with {"preset": name}'
)
def list_presets() -> list[PresetOut]:
    return [
        PresetOut(**p.model_dump(include={"name", "description", "expected_time", "indicative"}), job=p.job())
        for _, p in PRESETS.items()
    ]
