"""One cursor scheme for every list: newest first by (time, id); `next_cursor` names the last item given, and
the next page starts after it, so rows added meanwhile never shift a page."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import Select, and_, or_
from sqlalchemy.orm import InstrumentedAttribute, Session

from app.problems import validation_problem


def encode_cursor(when: datetime, ident: uuid.UUID) -> str:
    raw = json.dumps([when.isoformat(), str(ident)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    """A cursor's (time, id); a 422 naming the `cursor` parameter when it is not one we gave."""
    try:
        created, ident = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        when, row_id = datetime.fromisoformat(created), uuid.UUID(ident)
        if when.tzinfo is None:
            raise ValueError("its time has no time zone")
        return when, row_id
    except (ValueError, TypeError, AttributeError, OverflowError, RecursionError) as e:
        raise validation_problem(
            [
                {
                    "loc": ["query", "cursor"],
                    "msg": f"invalid cursor ({e}): pass `next_cursor` of the previous page unchanged",
                    "type": "value_error",
                }
            ]
        ) from None


def newest_first(
    session: Session,
    query: Select[Any],
    time: InstrumentedAttribute[datetime],
    ident: InstrumentedAttribute[uuid.UUID],
    limit: int,
    cursor: str | None,
) -> tuple[list[Any], str | None]:
    """One page of `query`'s rows ordered by (`time`, `ident`) descending, and the cursor of the next page
    (None on the last). `time` and `ident` are columns of the first entity the query selects."""
    if cursor:
        when, after = decode_cursor(cursor)
        query = query.where(or_(time < when, and_(time == when, ident < after)))
    rows = list(session.execute(query.order_by(time.desc(), ident.desc()).limit(limit + 1)).all())
    if len(rows) <= limit:
        return rows, None
    last = rows[limit - 1][0]
    return rows[:limit], encode_cursor(getattr(last, time.key), getattr(last, ident.key))
