"""Outages: the errors that mean a database or broker did not answer, and retrying through them."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from kombu.exceptions import OperationalError as BrokerOperationalError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

log = logging.getLogger(__name__)
T = TypeVar("T")

# Not the request's nor the job's fault: answered with 503, retried by workers without spending an attempt.
OUTAGE_ERRORS: tuple[type[BaseException], ...] = (
    OperationalError,
    InterfaceError,
    DisconnectionError,
    PoolTimeoutError,
    RedisConnectionError,
    RedisTimeoutError,
    BrokerOperationalError,
)


def is_outage(exc: BaseException) -> bool:
    """True when exc (or what caused it) is a database or broker that did not answer."""
    seen = 0
    cur: BaseException | None = exc
    while cur is not None and seen < 8:
        if isinstance(cur, OUTAGE_ERRORS):
            return True
        cur, seen = cur.__cause__ or cur.__context__, seen + 1
    return False


def retry_outage(fn: Callable[[], T], within_seconds: float, what: str, first_wait: float = 0.2) -> T:
    """fn(), retried with backoff (at most 5 s apart) through outages, for up to within_seconds."""
    deadline = time.monotonic() + within_seconds
    wait = first_wait
    while True:
        try:
            return fn()
        except Exception as e:
            if not is_outage(e) or time.monotonic() + wait > deadline:
                raise
            log.warning("%s: %s: %s; retrying in %.1f s", what, type(e).__name__, e, wait)
            time.sleep(wait)
            wait = min(wait * 2, 5.0)
