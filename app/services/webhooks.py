"""An owner's webhooks (delivered by `app.core.webhooks`): registering a URL (its signing secret is shown
once), listing and deleting them, and each webhook's delivery log."""

from __future__ import annotations

import uuid

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.keys import KeyInfo
from app.core.models import Webhook, WebhookDelivery, utcnow
from app.core.webhooks import check_url, new_secret
from app.problems import Problem, validation_problem
from app.services.enforcement_schemas import (
    DeliveryList,
    DeliveryOut,
    WebhookCreate,
    WebhookCreated,
    WebhookList,
    WebhookOut,
)
from app.services.pagination import newest_first
from app.services.tenancy import get_owned

MAX_WEBHOOKS = 10  # live webhooks per owner: each event is one delivery per webhook


def create_webhook(session: Session, settings: Settings, key: KeyInfo, body: WebhookCreate) -> WebhookCreated:
    """A new webhook for the caller's owner; 422 for a URL deliveries may not go to."""
    try:
        url = check_url(body.url, settings.webhook_private_targets)
    except ValueError as e:
        raise validation_problem([{"loc": ["body", "url"], "msg": str(e), "type": "value_error"}]) from None
    live = session.scalar(
        select(func.count())
        .select_from(Webhook)
        .where(Webhook.owner_id == key.owner_id, Webhook.deleted_at.is_(None))
    )
    if live and live >= MAX_WEBHOOKS:
        raise Problem(
            409,
            f"this owner has {MAX_WEBHOOKS} webhooks already, the most it may have; delete one first",
            slug="too-many-webhooks",
        )
    hook = Webhook(owner_id=key.owner_id, url=url, secret=new_secret(), description=body.description)
    session.add(hook)
    session.commit()
    return WebhookCreated(**WebhookOut.model_validate(hook).model_dump(), secret=hook.secret)


def list_webhooks(session: Session, key: KeyInfo, limit: int, cursor: str | None) -> WebhookList:
    """The owner's live webhooks, newest first."""
    q = select(Webhook).where(Webhook.owner_id == key.owner_id, Webhook.deleted_at.is_(None))
    rows, next_cursor = newest_first(session, q, Webhook.created_at, Webhook.id, limit, cursor)
    return WebhookList(items=[WebhookOut.model_validate(r) for (r,) in rows], next_cursor=next_cursor)


def delete_webhook(session: Session, key: KeyInfo, hook_id: uuid.UUID) -> None:
    """Stop deliveries to the webhook (its pending ones fail); its log stays readable. Idempotent."""
    hook = get_owned(session, Webhook, hook_id, key, "webhook")
    if hook.deleted_at is None:
        hook.deleted_at = utcnow()
        session.commit()


def list_deliveries(
    session: Session, key: KeyInfo, hook_id: uuid.UUID, limit: int, cursor: str | None
) -> DeliveryList:
    """The webhook's deliveries, newest first, each with its attempts."""
    get_owned(session, Webhook, hook_id, key, "webhook")
    q = select(WebhookDelivery).where(WebhookDelivery.webhook_id == hook_id)
    rows, next_cursor = newest_first(
        session, q, WebhookDelivery.created_at, WebhookDelivery.id, limit, cursor
    )
    return DeliveryList(items=[DeliveryOut.model_validate(r) for (r,) in rows], next_cursor=next_cursor)
