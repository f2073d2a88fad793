"""An owner's webhooks (`app.core.webhooks`): register a URL (its signing secret is shown once), list,
delete, and read each webhook's delivery log."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Path, Response
from starlette.concurrency import run_in_threadpool

from app.api.deps import KeysAdmin
from app.api.params import Cursor, Limit
from app.services import webhooks
from app.services.access import SessionDep, SettingsDep
from app.services.enforcement_schemas import (
    DeliveryList,
    WebhookCreate,
    WebhookCreated,
    WebhookList,
)

router = APIRouter(prefix="/webhooks", tags=["webhooks"])
HookId = Annotated[uuid.UUID, Path(description="the webhook's id")]


@router.post(
    "",
    status_code=201,
    response_model=WebhookCreated,
    summary="Register a webhook: alerts and enforcement actions on the owner's models are POSTed to it",
)
async def post_webhook(
    body: WebhookCreate, session: SessionDep, settings: SettingsDep, key: KeysAdmin
) -> WebhookCreated:
    # A thread: the URL's host is resolved (blocking) to refuse private addresses.
    return await run_in_threadpool(webhooks.create_webhook, session, settings, key, body)


@router.get("", response_model=WebhookList, summary="The owner's webhooks, newest first")
async def get_webhooks(
    session: SessionDep, key: KeysAdmin, limit: Limit = 50, cursor: Cursor = None
) -> WebhookList:
    return await run_in_threadpool(webhooks.list_webhooks, session, key, limit, cursor)


@router.delete("/{hook_id}", status_code=204, summary="Delete a webhook (its delivery log stays)")
async def remove_webhook(hook_id: HookId, session: SessionDep, key: KeysAdmin) -> Response:
    await run_in_threadpool(webhooks.delete_webhook, session, key, hook_id)
    return Response(status_code=204)


@router.get(
    "/{hook_id}/deliveries",
    response_model=DeliveryList,
    summary="A webhook's delivery log: every event sent to it and every attempt, newest first",
)
async def get_deliveries(
    hook_id: HookId, session: SessionDep, key: KeysAdmin, limit: Limit = 50, cursor: Cursor = None
) -> DeliveryList:
    return await run_in_threadpool(webhooks.list_deliveries, session, key, hook_id, limit, cursor)
