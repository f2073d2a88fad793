"""API keys: who am I, making narrower keys (predict-only by default), listing and revoking them."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from app.api.deps import AnyKey, KeysAdmin
from app.api.params import Cursor
from app.services import keys
from app.services.access import SessionDep, SettingsDep
from app.services.schemas import KeyCreate, KeyCreated, KeyList, KeyOut

router = APIRouter(prefix="/keys", tags=["keys"])


@router.get("/me", response_model=KeyOut, summary="The calling key")
def me(key: AnyKey) -> KeyOut:
    return KeyOut.model_validate(key)


@router.get("", response_model=KeyList, summary="The owner's keys, revoked ones included, newest first")
def list_keys(
    key: KeysAdmin,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=1000, description="items on a page")] = 100,
    cursor: Cursor = None,
) -> KeyList:
    return keys.list_keys(session, key, limit, cursor)


@router.post("", status_code=201, response_model=KeyCreated, summary="Create a key for the same owner")
def create_key(body: KeyCreate, key: KeysAdmin, session: SessionDep, settings: SettingsDep) -> KeyCreated:
    return keys.create_key(session, settings, key, body)


@router.delete("/{key_id}", status_code=204, summary="Revoke a key (every API replica within a second)")
def revoke_key(key_id: uuid.UUID, key: KeysAdmin, session: SessionDep, request: Request) -> Response:
    keys.revoke_key(session, request.app.state.keys, key, key_id)
    return Response(status_code=204)
