"""Extraction alerts of a served model (`app.api.monitor`): only the model's owner sees them."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Path
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from app.api.deps import JobsRead, SessionDep, get_owned
from app.api.pagination import Cursor, Limit, newest_first
from app.core.models import Job, MonitorAlert
from app.services.enforcement_schemas import AlertList, AlertOut

router = APIRouter(prefix="/models", tags=["monitoring"])


def list_alerts(
    session: SessionDep, key: JobsRead, model_id: uuid.UUID, limit: int, cursor: str | None
) -> AlertList:
    """Newest first; 404 unless the caller's owner owns the model."""
    get_owned(session, Job, model_id, key, "model")
    q = select(MonitorAlert).where(MonitorAlert.model_id == model_id)
    rows, next_cursor = newest_first(session, q, MonitorAlert.created_at, MonitorAlert.id, limit, cursor)
    items = [AlertOut.model_validate(r, from_attributes=True) for (r,) in rows]
    return AlertList(items=items, next_cursor=next_cursor)


@router.get("/{model_id}/alerts", response_model=AlertList, summary="Extraction alerts of a model")
async def alerts(
    model_id: Annotated[uuid.UUID, Path(description="the model's id: the id of the job that trained it")],
    session: SessionDep,
    key: JobsRead,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> AlertList:
    return await run_in_threadpool(list_alerts, session, key, model_id, limit, cursor)
