"""Enforcement on a served model (`app.core.enforcement`), for the API and the dashboard alike: its policy,
the keys it holds (the owner's review list), the append-only log of actions, and the extraction alerts
that drive them (`app.services.monitor`). Only the model's owner sees or changes them."""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.enforcement import ACTIVE, Enforcement, NotHeld, policy_of
from app.core.keys import KeyCache, KeyInfo
from app.core.models import ApiKey, EnforcementAction, EnforcementPolicyRow, Job, KeyStanding, MonitorAlert
from app.problems import Problem, validation_problem
from app.services.enforcement_schemas import (
    ActionList,
    ActionOut,
    AlertList,
    AlertOut,
    EnforcementOut,
    Review,
    StandingList,
    StandingOut,
)
from app.services.pagination import newest_first
from app.services.tenancy import get_owned
from ml.served import EnforcementPolicy


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
    session: Session,
    enforcement: Enforcement,
    keys: KeyCache,
    key: KeyInfo,
    model_id: uuid.UUID,
    key_id: uuid.UUID,
    review: Review,
) -> ActionOut:
    """The owner's decision on a held key, logged; 404 for another owner's model, 409 for a key not held."""
    job = get_owned(session, Job, model_id, key, "model")
    try:
        outcome = enforcement.review(session, job, key_id, review.decision, key.id)
    except NotHeld as e:
        raise Problem(409, str(e), slug="key-not-held") from None
    session.commit()
    enforcement.committed(outcome)
    if review.decision == "revoke":
        keys.drop([key_id])  # this process at once; the others on their next poll
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


def list_alerts(
    session: Session, key: KeyInfo, model_id: uuid.UUID, limit: int, cursor: str | None
) -> AlertList:
    """Newest first; 404 unless the caller's owner owns the model."""
    get_owned(session, Job, model_id, key, "model")
    q = select(MonitorAlert).where(MonitorAlert.model_id == model_id)
    rows, next_cursor = newest_first(session, q, MonitorAlert.created_at, MonitorAlert.id, limit, cursor)
    items = [AlertOut.model_validate(r, from_attributes=True) for (r,) in rows]
    return AlertList(items=items, next_cursor=next_cursor)
