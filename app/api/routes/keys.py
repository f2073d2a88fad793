"""API keys: who am I, and making narrower keys (e.g. predict-only with a query budget)."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import AnyKey, KeysAdmin, SessionDep, SettingsDep
from app.api.schemas import KeyCreate, KeyCreated, KeyOut
from app.core.keys import create_api_key
from app.problems import Problem

router = APIRouter(prefix="/keys", tags=["keys"])


@router.get("/me", response_model=KeyOut, summary="The calling key")
def me(key: AnyKey) -> KeyOut:
    return KeyOut.model_validate(key)


@router.post("", status_code=201, response_model=KeyCreated, summary="Create a key for the same owner")
def create_key(body: KeyCreate, key: KeysAdmin, session: SessionDep, settings: SettingsDep) -> KeyCreated:
    scopes = body.scopes if body.scopes is not None else list(key.scopes)
    extra = sorted(set(scopes) - set(key.scopes))
    if extra:
        raise Problem(403, f"a key cannot grant scopes it lacks: {', '.join(extra)}", slug="forbidden")
    budget = body.query_budget if "query_budget" in body.model_fields_set else settings.default_query_budget
    new, secret = create_api_key(
        session,
        owner_id=key.owner_id,
        name=body.name,
        scopes=scopes,
        query_budget=budget,
        rate_limit_per_minute=body.rate_limit_per_minute,
    )
    session.commit()
    return KeyCreated(**KeyOut.model_validate(new).model_dump(), key=secret)
