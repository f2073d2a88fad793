"""The jobs table is the queue: atomic claim and lease, events, cancel; plus the broker hand-off (the sweep
that settles lost workers' jobs is `app.core.sweep`).

With a broker (Celery on Redis) the API sends only the job id, by task name, so `app` never imports
`worker`. In embedded mode nothing is sent: the local worker polls the table for claimable jobs.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from celery import Celery
from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.db import session_scope
from app.core.models import RUNNING, Job, JobEvent, JobStatus, utcnow

log = logging.getLogger(__name__)

RUN_JOB_TASK = "cmim.run_job"
AUDIT_TASK = "cmim.audit_task"  # one seed and phase of a job's audit (the chord's header)
ASSEMBLE_TASK = "cmim.assemble_audit"  # the chord callback: assemble, store and publish the report
RUNNING_STATUSES = [s.value for s in RUNNING]  # the statuses of a job a worker holds


class LeaseLost(Exception):
    """This worker no longer holds the job (its lease ran out and another worker claimed it)."""


@dataclass(frozen=True)
class Claim:
    """Proof of holding a job: every write by the worker is fenced on (worker_id, attempt)."""

    job_id: uuid.UUID
    worker_id: str
    attempt: int


# ---------------------------------------------------------------- broker hand-off

_clients: dict[str, Celery] = {}
_clients_lock = threading.Lock()


def broker_client(broker_url: str) -> Celery:
    """A Celery app used only to send tasks by name (one per broker URL and process)."""
    with _clients_lock:
        if broker_url not in _clients:
            client = Celery("cmim-client", broker=broker_url, set_as_current=False)
            # Fail fast when the broker is down: the job stays queued and the worker's sweep sends it later.
            client.conf.update(
                broker_connection_timeout=3,
                broker_connection_retry_on_startup=False,
                broker_transport_options={"max_retries": 0},
            )
            _clients[broker_url] = client
        return _clients[broker_url]


def enqueue(settings: Settings, job_id: uuid.UUID) -> bool:
    """Send the job id to the workers (no-op in embedded mode); False if the broker did not take it.

    A job whose message could not be sent stays `queued` with enqueued_at NULL: the worker's sweep
    sends it later, so the database row stays the truth.
    """
    if settings.embedded:
        return True
    try:
        broker_client(settings.broker_url).send_task(
            RUN_JOB_TASK, args=[str(job_id)], queue=settings.queue_name, retry=False
        )
        sent = True
    except Exception:  # noqa: BLE001 - any broker failure leaves the job for the sweep
        log.warning("could not enqueue job %s; the sweep will retry", job_id, exc_info=True)
        sent = False
    with session_scope(settings.database_url) as s:
        s.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.queued.value)
            .values(enqueued_at=utcnow() if sent else None)
        )
    return sent


def handoff_claim(handoff: dict[str, Any]) -> Claim:
    """The claim an audit's hand-off carries (every one of its tasks and its chord callback carry it)."""
    return Claim(uuid.UUID(handoff["job_id"]), handoff["worker_id"], int(handoff["attempt"]))


@dataclass(frozen=True)
class BrokerView:
    """The broker's queue as a sweep reads it: whose messages wait there, and since when it holds them."""

    jobs: frozenset[uuid.UUID]  # jobs whose run_job message waits
    audits: frozenset[Claim]  # claims whose audit task or chord callback waits
    since: datetime  # when a sweep found the broker without its marker: it lost its data then


def broker_view(settings: Settings) -> BrokerView | None:
    """What waits in the broker's queue now; None when that cannot be read.

    Only the waiting list counts: a message a worker has taken but not acked may belong to a dead
    worker (re-sending such a job is harmless: the duplicate finds nothing to claim; a live worker's
    audit task renews its job's lease itself). `since` is kept in a marker key that the first sweep
    after the broker lost its data writes again: a message sent before it may be gone.
    """
    if settings.embedded or not settings.broker_url.startswith(("redis://", "rediss://")):
        return None
    import redis

    marker = f"{settings.redis_prefix}:broker-since"
    try:
        client = redis.Redis.from_url(settings.broker_url, socket_timeout=3, socket_connect_timeout=3)
        with client:
            pipe = client.pipeline(transaction=False)
            pipe.set(marker, utcnow().timestamp(), nx=True).get(marker).lrange(settings.queue_name, 0, -1)
            _, since, raw = pipe.execute()
    except redis.RedisError:
        return None
    jobs: set[uuid.UUID] = set()
    audits: set[Claim] = set()
    for item in raw:
        try:
            message = json.loads(item)
            task = message["headers"].get("task")
            args = json.loads(base64.b64decode(message["body"]))[0]
            if task == RUN_JOB_TASK:
                jobs.add(uuid.UUID(args[0]))
            elif task in (AUDIT_TASK, ASSEMBLE_TASK):  # args: [handoff, index] or [outcomes, handoff]
                audits.add(handoff_claim(args[0] if task == AUDIT_TASK else args[1]))
        except (ValueError, KeyError, IndexError, TypeError):
            continue  # not one of ours
    return BrokerView(frozenset(jobs), frozenset(audits), datetime.fromtimestamp(float(since), UTC))


def broker_reachable(settings: Settings) -> bool:
    """True when the broker answers (always True in embedded mode)."""
    if settings.embedded:
        return True
    try:
        with broker_client(settings.broker_url).connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0.2, timeout=2)
        return True
    except Exception:  # noqa: BLE001 - readiness reports any failure as "not ready"
        return False


# ---------------------------------------------------------------- events


def append_event(session: Session, job_id: uuid.UUID, kind: str, data: dict[str, Any]) -> int:
    """Add the job's next event (seq = 1, 2, ... per job, allocated atomically); returns its seq."""
    seq = session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(last_event_seq=Job.last_event_seq + 1)
        .returning(Job.last_event_seq)
        .execution_options(synchronize_session=False)
    ).scalar_one()
    session.add(JobEvent(job_id=job_id, seq=seq, kind=kind, data=data))
    session.flush()
    return seq


def status_event(session: Session, job_id: uuid.UUID, status: JobStatus, **extra: Any) -> int:
    return append_event(session, job_id, "status", {"status": status.value, **extra})


# ---------------------------------------------------------------- claim and lease


def _claimable(now: datetime) -> Any:
    return and_(
        Job.cancel_requested_at.is_(None),
        Job.attempts < Job.max_attempts,
        or_(
            Job.status == JobStatus.queued.value,
            and_(Job.status.in_(RUNNING_STATUSES), Job.lease_expires_at < now),
        ),
    )


def claim_job(session: Session, job_id: uuid.UUID, worker_id: str, lease_seconds: int) -> Claim | None:
    """Atomically take a queued job (or one whose lease ran out): attempts += 1. None if not claimable."""
    now = utcnow()
    attempt = session.execute(
        update(Job)
        .where(Job.id == job_id, _claimable(now))
        .values(
            status=JobStatus.training.value,
            attempts=Job.attempts + 1,
            worker_id=worker_id,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            enqueued_at=None,
            started_at=now,
        )
        .returning(Job.attempts)
        .execution_options(synchronize_session=False)
    ).scalar_one_or_none()
    if attempt is None:
        return None
    status_event(session, job_id, JobStatus.training, attempt=attempt, worker=worker_id)
    return Claim(job_id, worker_id, attempt)


def release_claim(session: Session, claim: Claim, reason: str) -> bool:
    """Give a held job back to the queue and its attempt back to the job (the job itself did not fail)."""
    result = session.execute(
        update(Job)
        .where(fenced(claim))
        .values(
            status=JobStatus.queued.value,
            attempts=Job.attempts - 1,
            worker_id=None,
            lease_expires_at=None,
            enqueued_at=None,
        )
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        return False
    status_event(session, claim.job_id, JobStatus.queued, reason=reason)
    return True


def fenced(claim: Claim) -> Any:
    return and_(
        Job.id == claim.job_id,
        Job.worker_id == claim.worker_id,
        Job.attempts == claim.attempt,
        Job.status.in_(RUNNING_STATUSES),
    )


def renew_lease(session: Session, claim: Claim, lease_seconds: int) -> bool:
    """Extend the lease; returns True when cancellation was requested. Raises LeaseLost."""
    cancel_requested_at = session.execute(
        update(Job)
        .where(fenced(claim))
        .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds))
        .returning(Job.cancel_requested_at)
        .execution_options(synchronize_session=False)
    ).one_or_none()
    if cancel_requested_at is None:
        raise LeaseLost(f"job {claim.job_id}: lease of attempt {claim.attempt} is gone")
    return cancel_requested_at[0] is not None


def transition(
    session: Session, claim: Claim, status: JobStatus, *, error: str | None = None, **extra: Any
) -> None:
    """Move a held job to status (and record the event); raises LeaseLost if no longer held."""
    values: dict[str, Any] = {"status": status.value}
    if status.terminal:
        values.update(finished_at=utcnow(), lease_expires_at=None, error=error)
    result = session.execute(
        update(Job).where(fenced(claim)).values(**values).execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        raise LeaseLost(f"job {claim.job_id}: lease of attempt {claim.attempt} is gone")
    status_event(session, claim.job_id, status, **({"error": error} if error else {}), **extra)


def mark_handed_off(session: Session, claim: Claim, lease_seconds: int) -> None:
    """Record that the job's audit goes to the broker now, under this claim (`enqueued_at` of a running
    job): while its messages wait there, or once the broker lost them, the sweep keeps the claim
    (`settle_audits`). Renews the lease; raises LeaseLost."""
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(fenced(claim))
        .values(enqueued_at=now, lease_expires_at=now + timedelta(seconds=lease_seconds))
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        raise LeaseLost(f"job {claim.job_id}: lease of attempt {claim.attempt} is gone")


def next_claimable_job(session: Session) -> uuid.UUID | None:
    """The oldest job a worker could claim now (embedded mode polls this)."""
    return session.scalar(select(Job.id).where(_claimable(utcnow())).order_by(Job.created_at).limit(1))


# ---------------------------------------------------------------- cancel


def request_cancel(session: Session, job_id: uuid.UUID) -> JobStatus:
    """Cancel a queued job at once, or flag a running one for its worker; returns the resulting status."""
    now = utcnow()
    done = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.queued.value)
        .values(status=JobStatus.cancelled.value, cancel_requested_at=now, finished_at=now)
        .execution_options(synchronize_session=False)
    )
    if done.rowcount == 1:
        status_event(session, job_id, JobStatus.cancelled, reason="cancelled before it started")
        return JobStatus.cancelled
    flagged = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(RUNNING_STATUSES), Job.cancel_requested_at.is_(None))
        .values(cancel_requested_at=now)
        .execution_options(synchronize_session=False)
    )
    if flagged.rowcount == 1:
        append_event(session, job_id, "cancel_requested", {})
    return JobStatus(session.scalar(select(Job.status).where(Job.id == job_id)))
