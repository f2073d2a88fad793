"""Enforcement on a served model (`app.services.enforcement`): its policy, the keys it holds (the owner's
review list), the append-only log of actions and the extraction alerts behind them. Only the model's owner
sees or changes them."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import Path, Request
from starlette.concurrency import run_in_threadpool

from app.api.deps import JobsRead, JobsWrite, KeysAdmin
from app.api.model_router import router
from app.api.params import Cursor, Limit, ModelId
from app.services import enforcement
from app.services.access import SessionDep
from app.services.enforcement_schemas import (
    ActionList,
    ActionOut,
    AlertList,
    EnforcementOut,
    EnforcementPatch,
    Review,
    StandingList,
)
from ml.served import EnforcementPolicy

TAGS = ["enforcement"]


@router.get(
    "/{model_id}/enforcement",
    tags=TAGS,
    response_model=EnforcementOut,
    summary="A model's enforcement policy",
)
async def get_enforcement(model_id: ModelId, session: SessionDep, key: JobsRead) -> EnforcementOut:
    return await run_in_threadpool(enforcement.read_policy, session, key, model_id)


@router.put(
    "/{model_id}/enforcement",
    tags=TAGS,
    response_model=EnforcementOut,
    summary="Set a model's enforcement policy (fields left out take their defaults)",
)
async def put_enforcement(
    model_id: ModelId, body: EnforcementPolicy, request: Request, session: SessionDep, key: JobsWrite
) -> EnforcementOut:
    held = request.app.state.enforcement
    return await run_in_threadpool(enforcement.set_policy, session, held, key, model_id, body.model_dump())


@router.patch(
    "/{model_id}/enforcement",
    tags=TAGS,
    response_model=EnforcementOut,
    summary="Change some fields of a model's enforcement policy",
)
async def patch_enforcement(
    model_id: ModelId, body: EnforcementPatch, request: Request, session: SessionDep, key: JobsWrite
) -> EnforcementOut:
    changes = body.model_dump(exclude_unset=True)
    # null leaves a field as it is, except the owner cap, where null means "no cap"
    changes = {k: v for k, v in changes.items() if v is not None or k == "owner_query_budget"}
    held = request.app.state.enforcement
    return await run_in_threadpool(enforcement.set_policy, session, held, key, model_id, changes)


@router.get(
    "/{model_id}/enforcement/keys",
    tags=TAGS,
    response_model=StandingList,
    summary="The keys a model holds: throttled, on probation or suspended (the review list)",
)
async def get_held_keys(
    model_id: ModelId, session: SessionDep, key: JobsRead, limit: Limit = 50, cursor: Cursor = None
) -> StandingList:
    return await run_in_threadpool(enforcement.held_keys, session, key, model_id, limit, cursor)


@router.post(
    "/{model_id}/enforcement/keys/{key_id}",
    tags=TAGS,
    response_model=ActionOut,
    summary="Review a held key: reinstate it, keep it held, or revoke it",
)
async def post_review(
    model_id: ModelId,
    key_id: Annotated[uuid.UUID, Path(description="the held API key's id")],
    body: Review,
    request: Request,
    session: SessionDep,
    key: KeysAdmin,
) -> ActionOut:
    state = request.app.state
    return await run_in_threadpool(
        enforcement.review_key, session, state.enforcement, state.keys, key, model_id, key_id, body
    )


@router.get(
    "/{model_id}/enforcement/actions",
    tags=TAGS,
    response_model=ActionList,
    summary="A model's enforcement actions, newest first (append-only)",
)
async def get_actions(
    model_id: ModelId, session: SessionDep, key: JobsRead, limit: Limit = 50, cursor: Cursor = None
) -> ActionList:
    return await run_in_threadpool(enforcement.list_actions, session, key, model_id, limit, cursor)


@router.get(
    "/{model_id}/alerts",
    response_model=AlertList,
    summary="Extraction alerts of a model",
    tags=["monitoring"],
)
async def alerts(
    model_id: ModelId,
    session: SessionDep,
    key: JobsRead,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> AlertList:
    return await run_in_threadpool(enforcement.list_alerts, session, key, model_id, limit, cursor)
