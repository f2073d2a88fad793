"""The dashboard: server-rendered pages over the service layer (`app.services`), signed in by a session
cookie: signing in and out, jobs and keys here, models, enforcement and the comparison in `model_pages`.

Every page reads and writes through the same services as the API, with the same tenancy: another owner's
object is the 404 page. Every form post carries the session's CSRF token and must come from this server's
own pages (Origin/Referer); otherwise 403."""

from __future__ import annotations

import json
import uuid
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from app.core.keys import KeyInfo, hash_secret
from app.core.models import JobStatus
from app.problems import Problem
from app.services import jobs, keys
from app.services import sessions as web_session
from app.services.access import SessionDep, SettingsDep, authorize
from app.services.job_events import events_after
from app.services.jobs import list_jobs, read_job
from app.services.schemas import JobCreate, KeyCreate
from app.web import model_pages
from app.web.pages import (
    HERE,
    SIGN_IN_REASONS,
    Form,
    JobsReader,
    JobsWriter,
    KeysAdmin,
    SignIn,
    page_router,
    render,
)
from ml.catalog import PRESETS, merge
from ml.charts import Series, line_chart

VERDICTS = ("distillable", "undistillable", "inconclusive")


STATUSES = [s.value for s in JobStatus]


router = page_router()


def mount(app: FastAPI) -> None:
    """Add the dashboard's pages, its static files and its sign-in redirect to the app."""
    app.include_router(router)
    app.include_router(model_pages.router)
    app.mount("/static/web", StaticFiles(directory=HERE / "static"), name="web-static")

    async def to_sign_in(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, SignIn)
        target = f"/login?next={quote(request.url.path)}"
        if exc.reason:
            target += f"&reason={exc.reason}"
        response = RedirectResponse(target, status_code=303)
        web_session.clear_cookie(response)
        return response

    app.add_exception_handler(SignIn, to_sign_in)


@router.get("/")
def home(request: Request) -> Response:
    session = web_session.current(request)
    return RedirectResponse("/jobs" if session and session.digest else "/login", status_code=303)


def _safe_next(target: str | None) -> str:
    return target if target and target.startswith("/") and not target.startswith("//") else "/jobs"


@router.get("/login")
def login_page(request: Request, next: str = "/jobs", reason: str | None = None) -> Response:
    session = web_session.current(request)
    fresh = web_session.SessionStore.anonymous() if session is None else None  # for the form's CSRF token
    error = SIGN_IN_REASONS.get(reason or "")  # an unknown code shows nothing
    response = render(request, "login.html", session=session or fresh, next=_safe_next(next), error=error)
    if fresh is not None:
        web_session.set_cookie(request, response, fresh)
    return response


@router.post("/login")
async def login(request: Request, fields: Form) -> Response:
    target = _safe_next(fields.get("next"))
    digest = hash_secret(fields.get("key", "").strip())
    try:
        await authorize(request, digest, [])
    except Problem as p:
        return render(request, "login.html", status_code=401, next=target, error=p.detail)
    store, previous = web_session.store_of(request), web_session.current(request)
    if previous is not None and previous.digest is not None:  # signing in again ends the former session
        await run_in_threadpool(store.end, previous)
    response = RedirectResponse(target, status_code=303)
    web_session.set_cookie(request, response, await run_in_threadpool(store.sign_in, digest))
    return response


@router.post("/logout")
def logout(request: Request, fields: Form) -> Response:
    session = web_session.current(request)
    if session is not None and session.digest is not None:
        web_session.store_of(request).end(session)  # on every API process: a copied cookie signs in nobody
    response = RedirectResponse("/login", status_code=303)
    web_session.clear_cookie(response)
    return response


def _jobs_page(
    request: Request,
    session: SessionDep,
    key: KeyInfo,
    status: str | None,
    verdict: str | None,
    cursor: str | None,
    **extra: Any,
) -> HTMLResponse:
    status = status if status in STATUSES else None
    verdict = verdict if verdict in VERDICTS else None
    page = list_jobs(session, key, 50, cursor, JobStatus(status) if status else None, verdict)
    return render(
        request,
        "jobs.html",
        status_code=extra.pop("status_code", 200),
        jobs=page.items,
        next_cursor=page.next_cursor,
        status=status,
        verdict=verdict,
        statuses=STATUSES,
        verdicts=VERDICTS,
        presets=[p for _, p in PRESETS.items()],
        running=any(not JobStatus(j.status).terminal for j in page.items),
        **extra,
    )


@router.get("/jobs")
def jobs_page(
    request: Request,
    session: SessionDep,
    key: JobsReader,
    status: str | None = None,
    verdict: str | None = None,
    cursor: str | None = None,
) -> HTMLResponse:
    return _jobs_page(request, session, key, status or None, verdict or None, cursor or None)


def _job_body(fields: dict[str, str]) -> dict[str, Any]:
    """A job body from the submit form: the preset, the few numbers given, then the JSON overrides."""
    body: dict[str, Any] = {"preset": fields.get("preset") or None, "teacher": {}, "audit": {}}
    numbers = {
        ("teacher", "epochs"): "teacher_epochs",
        ("audit", "seeds"): "seeds",
        ("audit", "epochs"): "audit_epochs",
    }
    for (section, field), name in numbers.items():
        raw = fields.get(name, "").strip()
        if raw:
            if not raw.isdigit():
                raise ValueError(f"{name.replace('_', ' ')} must be a whole number, got {raw!r}")
            body[section][field] = int(raw)
    raw = fields.get("overrides", "").strip()
    if raw:
        try:
            overrides = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"overrides are not JSON: {e}") from None
        if not isinstance(overrides, dict):
            raise ValueError('overrides must be a JSON object, e.g. {"teacher": {"seed": 1}}')
        body = merge(body, overrides)
    return {k: v for k, v in body.items() if v not in ({}, None)}


@router.post("/jobs")
def submit_job(
    request: Request, fields: Form, key: JobsWriter, session: SessionDep, settings: SettingsDep
) -> Response:
    try:
        body = JobCreate.model_validate(_job_body(fields))
        job, _ = jobs.submit_job(session, settings, key, body, None)
    except (ValueError, ValidationError, Problem) as e:
        if isinstance(e, ValidationError):
            message = "; ".join(
                f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in e.errors()
            )
        else:
            message = e.detail if isinstance(e, Problem) else str(e)
        return _jobs_page(
            request, session, key, None, None, None, status_code=422, error=message, form=fields
        )
    return RedirectResponse(f"/jobs/{job.id}", status_code=303)


@router.post("/jobs/{job_id}/cancel")
def cancel_job(job_id: uuid.UUID, fields: Form, key: JobsWriter, session: SessionDep) -> Response:
    jobs.cancel_job(session, job_id, key)
    return RedirectResponse(f"/jobs/{job_id}", status_code=303)


def _progress_context(session: SessionDep, key: KeyInfo, job_id: uuid.UUID) -> dict[str, Any]:
    job = read_job(session, job_id, key)
    epochs = [e.data for e in events_after(session, job_id, 0, limit=100_000) if e.kind == "epoch"]
    series = [
        Series(stage, [float(e["epoch"]) for e in rows], [float(e["test_acc"]) for e in rows])
        for stage in dict.fromkeys(e.get("stage", "teacher") for e in epochs)
        if (rows := [e for e in epochs if e.get("stage", "teacher") == stage])
    ]
    chart = line_chart(series, "test accuracy per epoch", "epoch", "accuracy (%)") if series else ""
    return {"job": job, "chart": chart, "terminal": JobStatus(job.status).terminal}


@router.get("/jobs/{job_id}")
def job_page(request: Request, job_id: uuid.UUID, session: SessionDep, key: JobsReader) -> HTMLResponse:
    context = _progress_context(session, key, job_id)
    return render(request, "job.html", **context)


@router.get("/jobs/{job_id}/progress")
def job_progress(request: Request, job_id: uuid.UUID, session: SessionDep, key: JobsReader) -> HTMLResponse:
    return render(request, "_progress.html", **_progress_context(session, key, job_id))


def _keys_page(request: Request, session: SessionDep, key: KeyInfo, **extra: Any) -> HTMLResponse:
    listed = keys.all_keys(session, key)
    status = extra.pop("status_code", 200)
    return render(request, "keys.html", status_code=status, keys=listed, me=key, **extra)


@router.get("/keys")
def keys_page(request: Request, session: SessionDep, key: KeysAdmin) -> HTMLResponse:
    return _keys_page(request, session, key)


@router.post("/keys")
def create_key(
    request: Request, fields: Form, session: SessionDep, settings: SettingsDep, key: KeysAdmin
) -> HTMLResponse:
    values: dict[str, Any] = {"name": fields.get("name", "").strip() or "key"}
    for name in ("query_budget", "rate_limit_per_minute"):
        if fields.get(name, "").strip():
            values[name] = fields[name].strip()
    if fields.get("expires_at", "").strip():
        values["expires_at"] = fields["expires_at"].strip()
    try:
        created = keys.create_key(session, settings, key, KeyCreate.model_validate(values))
    except ValidationError as e:
        message = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        return _keys_page(request, session, key, status_code=422, error=message)
    except Problem as p:
        return _keys_page(request, session, key, status_code=p.status, error=p.detail)
    return _keys_page(request, session, key, created=created)


@router.post("/keys/{key_id}/revoke")
def revoke_key(
    request: Request, key_id: uuid.UUID, fields: Form, session: SessionDep, key: KeysAdmin
) -> Response:
    keys.revoke_key(session, request.app.state.keys, key, key_id)
    return RedirectResponse("/keys", status_code=303)
