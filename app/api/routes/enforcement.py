"""Enforcement on a served model (`app.core.enforcement`): its policy, the keys it holds (the owner's review
list) and the append-only log of actions. Only the model's owner sees or changes them."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.api.deps import JobsRead, JobsWrite, KeysAdmin, SessionDep, get_owned
from app.api.pagination import Cursor, Limit, newest_first
from app.core.enforcement import ACTIVE, Enforcement, NotHeld, policy_of
from app.core.keys import KeyInfo
from app.core.models import ApiKey, EnforcementAction, EnforcementPolicyRow, Job, KeyStanding
from app.problems import Problem, validation_problem
from app.services.enforcement_schemas import (
    ActionList,
    ActionOut,
    EnforcementOut,
    EnforcementPatch,
    Review,
    StandingList,
    StandingOut,
)
from ml.enforcement import EnforcementPolicy

router = APIRouter(prefix="/models", tags=["enforcement"])
ModelId = Annotated[uuid.UUID, Path(description="the model's id: the id of the job that trained it")]


def read_policy(session: Session, key: KeyInfo, model_id: uuid.UUID) -> EnforcementOut:
    """The model's policy and where it comes from; 404 unless the caller's owner owns the model."""
    job = get_owned(session, Job, model_id, key, "model")
    row = session.get(EnforcementPolicyRow, model_id)
    return EnforcementOut(
        model_id=model_id,
        policy=policy_of(session, job),
        source="owner" if row else "job",
        updated_at=row.updated_at if row else None,
    )


def set_policy(
    session: Session, enforcement: Enforcement, key: KeyInfo, model_id: uuid.UUID, changes: dict[str, Any]
) -> EnforcementOut:
    """Lay `changes` over the model's policy, validate the whole, store it and hold it here at once."""
    job = get_owned(session, Job, model_id, key, "model")
    try:
        policy = EnforcementPolicy.model_validate(policy_of(session, job).model_dump() | changes)
    except ValidationError as e:
        errors = [
            {"loc": ["body", *err["loc"]], "msg": err["msg"], "type": err["type"]}
            for err in e.errors(include_url=False, include_input=False)
        ]
        raise validation_problem(errors) from None
    outcome = enforcement.set_policy(session, job, policy, key.id)
    session.commit()
    enforcement.committed(outcome)
    return read_policy(session, key, model_id)


def held_keys(
    session: Session, key: KeyInfo, model_id: uuid.UUID, limit: int, cursor: str | None
) -> StandingList:
    """The keys the model holds (throttled, on probation or suspended), most recently held first."""
    get_owned(session, Job, model_id, key, "model")
    q = (
        select(KeyStanding, ApiKey)
        .join(ApiKey, ApiKey.id == KeyStanding.key_id)
        .where(KeyStanding.model_id == model_id, KeyStanding.state != ACTIVE)
    )
    rows, next_cursor = newest_first(session, q, KeyStanding.since, KeyStanding.key_id, limit, cursor)
    items = [
        StandingOut(
            key_id=s.key_id,
            key_name=k.name,
            key_prefix=k.prefix,
            key_revoked=k.revoked_at is not None,
            state=s.state,
            alert_id=s.alert_id,
            since=s.since,
            rate_fraction=s.rate_fraction,
            budget_limit=s.budget_limit,
            reviewed_at=s.reviewed_at,
        )
        for s, k in rows
    ]
    return StandingList(items=items, next_cursor=next_cursor)


def review_key(
    request: Request, session: Session, key: KeyInfo, model_id: uuid.UUID, key_id: uuid.UUID, review: Review
) -> ActionOut:
    """The owner's decision on a held key, logged; 404 for another owner's model, 409 for a key not held."""
    job = get_owned(session, Job, model_id, key, "model")
    enforcement: Enforcement = request.app.state.enforcement
    try:
        outcome = enforcement.review(session, job, key_id, review.decision, key.id)
    except NotHeld as e:
        raise Problem(409, str(e), slug="key-not-held") from None
    session.commit()
    enforcement.committed(outcome)
    if review.decision == "revoke":
        request.app.state.keys.drop([key_id])  # this process at once; the others on their next poll
    return ActionOut.model_validate(outcome.actions[0])


def list_actions(
    session: Session, key: KeyInfo, model_id: uuid.UUID, limit: int, cursor: str | None
) -> ActionList:
    """The model's enforcement actions, newest first."""
    get_owned(session, Job, model_id, key, "model")
    q = select(EnforcementAction).where(EnforcementAction.model_id == model_id)
    rows, next_cursor = newest_first(
        session, q, EnforcementAction.created_at, EnforcementAction.id, limit, cursor
    )
    return ActionList(items=[ActionOut.model_validate(r) for (r,) in rows], next_cursor=next_cursor)


@router.get("/{model_id}/enforcement", response_model=EnforcementOut, summary="A model's enforcement policy")
async def get_enforcement(model_id: ModelId, session: SessionDep, key: JobsRead) -> EnforcementOut:
    return await run_in_threadpool(read_policy, session, key, model_id)


@router.put(
    "/{model_id}/enforcement",
    response_model=EnforcementOut,
    summary="Set a model's enforcement policy (fields left out take their defaults)",
)
async def put_enforcement(
    model_id: ModelId, body: EnforcementPolicy, request: Request, session: SessionDep, key: JobsWrite
) -> EnforcementOut:
    enforcement = request.app.state.enforcement
    return await run_in_threadpool(set_policy, session, enforcement, key, model_id, body.model_dump())


@router.patch(
    "/{model_id}/enforcement",
    response_model=EnforcementOut,
    summary="Change some fields of a model's enforcement policy",
)
async def patch_enforcement(
    model_id: ModelId, body: EnforcementPatch, request: Request, session: SessionDep, key: JobsWrite
) -> EnforcementOut:
    changes = body.model_dump(exclude_unset=True)
    # null leaves a field as it is, except the owner cap, where null means "no cap"
    changes = {k: v for k, v in changes.items() if v is not None or k == "owner_query_budget"}
    enforcement = request.app.state.enforcement
    return await run_in_threadpool(set_policy, session, enforcement, key, model_id, changes)


@router.get(
    "/{model_id}/enforcement/keys",
    response_model=StandingList,
    summary="The keys a model holds: throttled, on probation or suspended (the review list)",
)
async def get_held_keys(
    model_id: ModelId, session: SessionDep, key: JobsRead, limit: Limit = 50, cursor: Cursor = None
) -> StandingList:
    return await run_in_threadpool(held_keys, session, key, model_id, limit, cursor)


@router.post(
    "/{model_id}/enforcement/keys/{key_id}",
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
    return await run_in_threadpool(review_key, request, session, key, model_id, key_id, body)


@router.get(
    "/{model_id}/enforcement/actions",
    response_model=ActionList,
    summary="A model's enforcement actions, newest first (append-only)",
)
async def get_actions(
    model_id: ModelId, session: SessionDep, key: JobsRead, limit: Limit = 50, cursor: Cursor = None
) -> ActionList:
    return await run_in_threadpool(list_actions, session, key, model_id, limit, cursor)
