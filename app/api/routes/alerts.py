"""Extraction alerts of a served model (`app.api.monitor`): only the model's owner sees them."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Path, Query
from sqlalchemy import and_, or_, select
from starlette.concurrency import run_in_threadpool

from app.api.deps import JobsRead, SessionDep, get_owned
from app.api.job_service import decode_cursor, encode_cursor
from app.api.schemas import AlertList, AlertOut
from app.core.models import Job, MonitorAlert

router = APIRouter(prefix="/models", tags=["monitoring"])


def list_alerts(
    session: SessionDep, key: JobsRead, model_id: uuid.UUID, limit: int, cursor: str | None
) -> AlertList:
    """Newest first; 404 unless the caller's owner owns the model."""
    get_owned(session, Job, model_id, key, "model")
    q = select(MonitorAlert).where(MonitorAlert.model_id == model_id)
    if cursor:
        created, ident = decode_cursor(cursor)
        q = q.where(
            or_(
                MonitorAlert.created_at < created,
                and_(MonitorAlert.created_at == created, MonitorAlert.id < ident),
            )
        )
    rows = session.scalars(
        q.order_by(MonitorAlert.created_at.desc(), MonitorAlert.id.desc()).limit(limit + 1)
    ).all()
    items = [AlertOut.model_validate(r, from_attributes=True) for r in rows[:limit]]
    return AlertList(items=items, next_cursor=encode_cursor(rows[limit - 1]) if len(rows) > limit else None)


@router.get("/{model_id}/alerts", response_model=AlertList, summary="Extraction alerts of a model")
async def alerts(
    model_id: Annotated[uuid.UUID, Path(description="the model's id: the id of the job that trained it")],
    session: SessionDep,
    key: JobsRead,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(description="`next_cursor` of the previous page")] = None,
) -> AlertList:
    return await run_in_threadpool(list_alerts, session, key, model_id, limit, cursor)
