"""Tenancy: every object belongs to an owner, and another owner's object is the same 404 as a missing one."""

from __future__ import annotations

import uuid
from typing import TypeVar

from sqlalchemy.orm import Session

from app.core.keys import KeyInfo
from app.problems import not_found

M = TypeVar("M")


def get_owned(session: Session, model: type[M], ident: uuid.UUID, key: KeyInfo, kind: str) -> M:
    """The object with this id if the caller's owner owns it; otherwise the same 404 as for a missing id."""
    obj = session.get(model, ident)
    if obj is None or obj.owner_id != key.owner_id:  # type: ignore[attr-defined]
        raise not_found(kind, ident)
    return obj
