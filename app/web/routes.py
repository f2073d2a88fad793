"""The dashboard: server-rendered pages over the API's own service functions, signed in by a session cookie.

Every page reads and writes through what the API routes use (`app.api.job_service`, the keys and models
routes), with the same tenancy: another owner's object is the 404 page. Every form post carries the
session's CSRF token and must come from this server's own pages (Origin/Referer); otherwise 403.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from app.api.deps import SessionDep, SettingsDep, StoreDep, authorize
from app.api.job_events import events_after
from app.api.job_service import (
    create_job,
    list_jobs,
    owned_job,
    read_job,
    report_artifact,
)
from app.api.routes import alerts as alerts_routes
from app.api.routes import enforcement as enforcement_routes
from app.api.routes import jobs as jobs_routes
from app.api.routes import keys as keys_routes
from app.api.routes import models as models_routes
from app.core.keys import KeyInfo, hash_secret
from app.core.models import JobStatus
from app.core.queue import enqueue
from app.core.storage import CorruptObjectError
from app.problems import Problem, corrupt_object
from app.services.enforcement_schemas import Review
from app.services.schemas import JobCreate, KeyCreate
from app.web import session as web_session
from app.web.filters import register_filters
from ml.charts import Bar, Series, bar_chart, line_chart
from ml.enforcement import ACTIONS
from ml.policy import PolicyConfig
from ml.presets import PRESETS, merge

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")
VERDICTS = ("distillable", "undistillable", "inconclusive")
STATUSES = [s.value for s in JobStatus]
MAX_PREDICT_ROWS = 64  # a page is for trying a model on a few inputs
# Why the sign-in page was shown instead of the page asked for: a code in its link (`?reason=`) and the
# words the page shows for it. Only these: a link from elsewhere cannot put its own words on the page.
SIGN_IN_REASONS = {
    "ended": "Your session has ended (signed out, or 12 hours old): sign in again.",
    "key": "The API key of this session has been revoked or has expired: sign in with a live key.",
}


class SignIn(Exception):
    """Raised by a page whose visitor is not (or no longer) signed in: answered by the sign-in page."""

    def __init__(self, reason: Literal["ended", "key"] | None = None) -> None:
        self.reason = reason  # a key of SIGN_IN_REASONS


class PageRoute(APIRoute):
    """A dashboard route: API problems (404, 403, 422, ...) are answered as an HTML error page."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()

        async def page(request: Request) -> Response:
            await web_session.resolve(request)  # what every page and form check reads
            try:
                return await handler(request)
            except Problem as p:
                if p.status == 401:  # the session's key was revoked or has expired
                    raise SignIn("key") from None
                return error_page(request, p.status, p.title, p.detail)
            except CorruptObjectError as e:
                p = corrupt_object(e)
                return error_page(request, p.status, p.title, p.detail)
            except RequestValidationError as e:
                detail = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
                return error_page(request, 404 if "path" in detail else 422, "Not found", detail)

        return page


router = APIRouter(route_class=PageRoute, include_in_schema=False)


def mount(app: FastAPI) -> None:
    """Add the dashboard's pages, its static files and its sign-in redirect to the app."""
    app.include_router(router)
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


# ---------------------------------------------------------------- rendering


def render(
    request: Request,
    name: str,
    status_code: int = 200,
    session: web_session.WebSession | None = None,
    **context: Any,
) -> HTMLResponse:
    session = session or web_session.current(request)
    csrf = web_session.csrf_token(request, session)
    context |= {"request": request, "csrf": csrf, "signed_in": bool(session and session.digest)}
    # Its headers (content security policy, no framing elsewhere) are set by `SecurityHeaders`.
    return templates.TemplateResponse(request, name, context, status_code=status_code)


def error_page(request: Request, status: int, title: str, detail: str) -> HTMLResponse:
    return render(request, "error.html", status_code=status, status=status, title=title, detail=detail)


register_filters(templates.env)


# ---------------------------------------------------------------- who is signed in


def page_key(*scopes: str) -> Callable[[Request], Awaitable[KeyInfo]]:
    """A dependency: the signed-in key holding these scopes (exactly as the API checks a Bearer key)."""

    async def signed_in(request: Request) -> KeyInfo:
        session = web_session.current(request)
        if session is None or session.digest is None:
            raise SignIn("ended" if web_session.ended(request) else None)
        return await authorize(request, session.digest, list(scopes))

    return signed_in


JobsReader = Annotated[KeyInfo, Depends(page_key("jobs:read"))]
JobsWriter = Annotated[KeyInfo, Depends(page_key("jobs:write"))]
KeysAdmin = Annotated[KeyInfo, Depends(page_key("keys:admin"))]
Predictor = Annotated[KeyInfo, Depends(page_key("models:predict"))]


async def form(request: Request) -> dict[str, str]:
    """The posted form, after the CSRF token and the same-origin check; 403 otherwise."""
    data = await request.form()
    fields = {k: v for k, v in data.items() if isinstance(v, str)}
    if not web_session.csrf_ok(request, web_session.current(request), fields.get("csrf")):
        raise Problem(403, "refused: a form post must come from this dashboard's own pages", slug="forbidden")
    return fields


Form = Annotated[dict[str, str], Depends(form)]


# ---------------------------------------------------------------- sign in and out


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


# ---------------------------------------------------------------- jobs


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
        job, _ = create_job(session, settings, key, body, None)
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
    enqueue(settings, job.id)
    return RedirectResponse(f"/jobs/{job.id}", status_code=303)


@router.post("/jobs/{job_id}/cancel")
def cancel_job(job_id: uuid.UUID, fields: Form, key: JobsWriter, session: SessionDep) -> Response:
    jobs_routes.cancel_job(job_id, key, session)
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


# ---------------------------------------------------------------- models


async def _models_context(
    request: Request, session: SessionDep, key: KeyInfo, model_id: uuid.UUID | None
) -> dict[str, Any]:
    """The owner's models (succeeded jobs); for the chosen one its serving, and every key's budget on it."""
    page = await run_in_threadpool(list_jobs, session, key, 200, None, JobStatus.succeeded, None)
    model_id = model_id or (page.items[0].id if page.items else None)
    context: dict[str, Any] = {"models": page.items, "model_id": model_id, "meta": None, "usage": []}
    if model_id is None:
        return context
    await run_in_threadpool(owned_job, session, model_id, key)  # another owner's model: the 404 page
    keys = await run_in_threadpool(keys_routes.list_keys, key, session, 1000, None)
    usage = []
    for k in keys.items:
        info = KeyInfo(**k.model_dump() | {"scopes": tuple(k.scopes)})
        if info.live() and "models:predict" in info.scopes:
            budget = (await models_routes.metadata(model_id, request, info)).parameters["query_budget"]
            usage.append((info, budget))
    alerts = await run_in_threadpool(alerts_routes.list_alerts, session, key, model_id, 20, None)
    return context | {
        "meta": await models_routes.metadata(model_id, request, key),
        "usage": usage,
        "alerts": alerts.items,
    }


@router.get("/models")
async def models_page(
    request: Request, session: SessionDep, key: JobsReader, id: uuid.UUID | None = None
) -> HTMLResponse:
    context = await _models_context(request, session, key, id)
    return render(request, "models.html", inputs="", predictions=None, error=None, **context)


@router.post("/models/{model_id}/predict")
async def predict(
    request: Request, model_id: uuid.UUID, fields: Form, session: SessionDep, key: Predictor
) -> HTMLResponse:
    raw = fields.get("inputs", "")
    predictions, error = None, None
    try:
        rows = json.loads(raw)
        if not isinstance(rows, list) or not rows:
            raise ValueError("give a JSON list of input rows, e.g. [[0.1, 0.2, ...], ...]")
        if len(rows) > MAX_PREDICT_ROWS:
            raise ValueError(f"at most {MAX_PREDICT_ROWS} rows from this page ({len(rows)} given)")
        answer, _ = await models_routes.predict_rows(request, key, model_id, rows)
        predictions = answer["predictions"]
    except ValueError as e:  # JSONDecodeError included
        error = f"the inputs are not valid: {e}"
    except Problem as p:
        if p.status in (401, 404):
            raise
        error = p.detail
    context = await _models_context(request, session, key, model_id)
    status = 200 if error is None else 422
    return render(
        request,
        "models.html",
        status_code=status,
        inputs=raw,
        predictions=predictions,
        error=error,
        **context,
    )


# ---------------------------------------------------------------- keys


def _keys_page(request: Request, session: SessionDep, key: KeyInfo, **extra: Any) -> HTMLResponse:
    keys = keys_routes.list_keys(key, session, limit=1000, cursor=None).items
    return render(request, "keys.html", status_code=extra.pop("status_code", 200), keys=keys, me=key, **extra)


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
        created = keys_routes.create_key(KeyCreate.model_validate(values), key, session, settings)
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
    keys_routes.revoke_key(key_id, key, session, request)
    return RedirectResponse("/keys", status_code=303)


# ---------------------------------------------------------------- enforcement


def _enforcement_page(
    request: Request,
    session: SessionDep,
    key: KeyInfo,
    model_id: uuid.UUID,
    status_code: int = 200,
    error: str | None = None,
) -> HTMLResponse:
    """A model's enforcement: the keys it holds (the review list), its policy, its latest actions."""
    return render(
        request,
        "enforcement.html",
        status_code=status_code,
        model_id=model_id,
        enforcement=enforcement_routes.read_policy(session, key, model_id),
        held=enforcement_routes.held_keys(session, key, model_id, 200, None).items,
        actions=enforcement_routes.list_actions(session, key, model_id, 50, None).items,
        choices=ACTIONS,
        error=error,
    )


@router.get("/models/{model_id}/enforcement")
def enforcement_page(
    request: Request, model_id: uuid.UUID, session: SessionDep, key: JobsReader
) -> HTMLResponse:
    return _enforcement_page(request, session, key, model_id)


@router.post("/models/{model_id}/enforcement/keys/{key_id}")
def review_held_key(
    request: Request,
    model_id: uuid.UUID,
    key_id: uuid.UUID,
    fields: Form,
    session: SessionDep,
    key: KeysAdmin,
) -> Response:
    try:
        review = Review.model_validate({"decision": fields.get("decision")})
        enforcement_routes.review_key(request, session, key, model_id, key_id, review)
    except ValidationError:
        error = "choose reinstate, keep or revoke"
        return _enforcement_page(request, session, key, model_id, 422, error)
    except Problem as p:
        if p.status != 409:
            raise
        return _enforcement_page(request, session, key, model_id, 409, p.detail)
    return RedirectResponse(f"/models/{model_id}/enforcement", status_code=303)


@router.post("/models/{model_id}/enforcement")
def save_enforcement(
    request: Request, model_id: uuid.UUID, fields: Form, session: SessionDep, key: JobsWriter
) -> Response:
    names = ("on_key_alert", "on_model_alert", "throttle_fraction", "probation_queries", "owner_query_budget")
    changes: dict[str, Any] = {n: fields[n].strip() for n in names if n in fields}
    if "owner_query_budget" in changes:
        changes["owner_query_budget"] = changes["owner_query_budget"] or None  # empty: no owner cap
    enforcement = request.app.state.enforcement
    try:
        enforcement_routes.set_policy(session, enforcement, key, model_id, changes)
    except Problem as p:
        if p.status != 422:
            raise
        return _enforcement_page(request, session, key, model_id, 422, p.detail)
    return RedirectResponse(f"/models/{model_id}/enforcement", status_code=303)


# ---------------------------------------------------------------- compare


def _side(session: SessionDep, store: StoreDep, key: KeyInfo, job_id: uuid.UUID) -> dict[str, Any]:
    """One job of the comparison: its row, its serving, and its report's headline and margins."""
    job = read_job(session, job_id, key)
    report: dict[str, Any] = {}
    if job.status == JobStatus.succeeded.value:
        report = json.loads(
            store.read_bytes(report_artifact(session, owned_job(session, job_id, key)).storage_key)
        )
    margins = {}
    for arch, student in (report.get("students") or {}).items():
        for row, stats in (student.get("attacks") or {}).items():
            margins[f"{arch}: {row}"] = (stats.get("margin"), stats.get("margin_se"))
    audit = job.spec.get("audit", {})
    policy = PolicyConfig.model_validate(audit.get("policy") or {})
    return {
        "job": job,
        "report": report,
        "output_mode": audit.get("output_mode", {}),  # as the model is served (`app.api.inference`)
        "policy": None if policy == PolicyConfig() else policy.model_dump(),  # the default serves without one
        "margins": margins,
    }


@router.get("/compare")
def compare_page(
    request: Request,
    session: SessionDep,
    store: StoreDep,
    key: JobsReader,
    a: uuid.UUID | None = None,
    b: uuid.UUID | None = None,
) -> HTMLResponse:
    done = list_jobs(session, key, 200, None, JobStatus.succeeded, None).items
    sides = [_side(session, store, key, j) for j in (a, b) if j is not None]
    chart = ""
    if len(sides) == 2:
        rows = sorted(set(sides[0]["margins"]) | set(sides[1]["margins"]))
        bars = [
            Bar(f"{tag} {row}", float(m), float(se or 0.0), highlight=tag == "A")
            for row in rows
            for tag, side in (("A", sides[0]), ("B", sides[1]))
            if (m := side["margins"].get(row, (None, None))[0]) is not None
            for se in [side["margins"][row][1]]
        ]
        if bars:
            chart = bar_chart(bars, "knockoff margin over the best LS student", "points", reference=0.0)
    return render(request, "compare.html", jobs=done, a=a, b=b, sides=sides, chart=chart)
