"""The dashboard's model pages: a model's serving, budgets and alerts, trying it on a few inputs, its
enforcement (policy, held keys, actions), and two jobs compared."""

from __future__ import annotations

import json
import uuid
from typing import Any

from fastapi import Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from app.core.keys import KeyInfo
from app.core.models import JobStatus
from app.problems import Problem
from app.services import enforcement, jobs, keys
from app.services.access import SessionDep, StoreDep
from app.services.enforcement_schemas import Review
from app.services.jobs import list_jobs, owned_job, read_job
from app.services.predictor import Predictor
from app.services.serving import published_spec
from app.web.pages import (
    Form,
    JobsReader,
    JobsWriter,
    KeysAdmin,
    PredictKey,
    page_router,
    render,
)
from ml.charts import Bar, bar_chart
from ml.served import ACTIONS, PolicyConfig

MAX_PREDICT_ROWS = 64  # a page is for trying a model on a few inputs


router = page_router()


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
    predictor: Predictor = request.app.state.predictor
    served = await predictor.served(model_id, key)
    usage = []
    for k in await run_in_threadpool(keys.all_keys, session, key):
        info = KeyInfo(**k.model_dump() | {"scopes": tuple(k.scopes)})
        if info.live() and "models:predict" in info.scopes:
            usage.append((info, (await predictor.parameters(info, served))["query_budget"]))
    alerts = await run_in_threadpool(enforcement.list_alerts, session, key, model_id, 20, None)
    return context | {
        "meta": await predictor.metadata(key, model_id),
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
    request: Request, model_id: uuid.UUID, fields: Form, session: SessionDep, key: PredictKey
) -> HTMLResponse:
    raw = fields.get("inputs", "")
    predictions, error = None, None
    try:
        rows = json.loads(raw)
        if not isinstance(rows, list) or not rows:
            raise ValueError("give a JSON list of input rows, e.g. [[0.1, 0.2, ...], ...]")
        if len(rows) > MAX_PREDICT_ROWS:
            raise ValueError(f"at most {MAX_PREDICT_ROWS} rows from this page ({len(rows)} given)")
        answer, _ = await request.app.state.predictor.predict_rows(key, model_id, rows)
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
        enforcement=enforcement.read_policy(session, key, model_id),
        held=enforcement.held_keys(session, key, model_id, 200, None).items,
        actions=enforcement.list_actions(session, key, model_id, 50, None).items,
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
        state = request.app.state
        enforcement.review_key(session, state.enforcement, state.keys, key, model_id, key_id, review)
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
    try:
        enforcement.set_policy(session, request.app.state.enforcement, key, model_id, changes)
    except Problem as p:
        if p.status != 422:
            raise
        return _enforcement_page(request, session, key, model_id, 422, p.detail)
    return RedirectResponse(f"/models/{model_id}/enforcement", status_code=303)


def _side(session: SessionDep, store: StoreDep, key: KeyInfo, job_id: uuid.UUID) -> dict[str, Any]:
    """One job of the comparison: its row, its serving, and its report's headline and margins."""
    job = read_job(session, job_id, key)
    report: dict[str, Any] = {}
    audit = job.spec.get("audit", {})
    mode, policy = audit.get("output_mode", {}), PolicyConfig.model_validate(audit.get("policy") or {})
    if job.status == JobStatus.succeeded.value:
        row = owned_job(session, job_id, key)
        report = jobs.read_report(session, store, row)
        served = published_spec(session, store, row)  # as the model is served, not as it was asked for
        mode, policy = served.output_mode.model_dump(), served.policy
    margins = {}
    for arch, student in (report.get("students") or {}).items():
        for row_name, stats in (student.get("attacks") or {}).items():
            margins[f"{arch}: {row_name}"] = (stats.get("margin"), stats.get("margin_se"))
    return {
        "job": job,
        "report": report,
        "output_mode": mode,
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
