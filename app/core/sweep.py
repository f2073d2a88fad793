"""The sweep: jobs whose worker vanished are settled (failed on their last attempt, cancelled, or queued
again), audits waiting their turn in the broker keep their claim, and queued jobs whose message may be
gone are stamped for sending again."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, update
from sqlalchemy.orm import Session

from app.core.models import Job, JobStatus, utcnow
from app.core.queue import RUNNING_STATUSES, BrokerView, Claim, append_event, fenced, status_event


def _finish_expired(session: Session, now: datetime, condition: Any, status: JobStatus, reason: str) -> None:
    ids = (
        session.execute(
            update(Job)
            .where(Job.status.in_(RUNNING_STATUSES), Job.lease_expires_at < now, condition)
            .values(status=status.value, finished_at=now, lease_expires_at=None, error=reason)
            .returning(Job.id)
            .execution_options(synchronize_session=False)
        )
        .scalars()
        .all()
    )
    for job_id in ids:
        status_event(session, job_id, status, error=reason)


def _settle_expired(session: Session, now: datetime) -> None:
    lost = "the worker was lost (its lease expired) on the last allowed attempt: max_attempts reached"
    _finish_expired(session, now, Job.attempts >= Job.max_attempts, JobStatus.failed, lost)
    cancelled = "cancelled; the worker was lost before it stopped"
    _finish_expired(session, now, Job.cancel_requested_at.is_not(None), JobStatus.cancelled, cancelled)
    requeued = (
        session.execute(
            update(Job)
            .where(Job.status.in_(RUNNING_STATUSES), Job.lease_expires_at < now)
            .values(status=JobStatus.queued.value, lease_expires_at=None, worker_id=None, enqueued_at=None)
            .returning(Job.id)
            .execution_options(synchronize_session=False)
        )
        .scalars()
        .all()
    )
    for job_id in requeued:
        status_event(session, job_id, JobStatus.queued, reason="the worker's lease expired; re-queued")


def settle_audits(
    session: Session, view: BrokerView, lease_seconds: int, *, resend: bool = True
) -> list[Claim]:
    """Keep the claim of every job whose audit waits its turn in the broker; returns those it lost.

    A handed-off audit runs on no worker while its tasks wait behind other jobs' work: waiting for its
    own tasks is not being lost, so its lease is renewed while one of its tasks or its chord callback
    waits in the queue (a task a worker runs renews it itself). Not for a job whose cancel was
    requested: its lease runs out and the sweep cancels it without waiting for its turn. A lease that
    ran out with nothing of the audit waiting was lost with a dead worker (`sweep` takes the job back,
    spending the attempt) unless the audit went to the broker before the broker last lost its data:
    then the job keeps its claim and attempt, is stamped as handed off now (a second loss without
    another broker restart is a dead worker's again) and is returned for the caller to send again
    (`resend=False`: none is, right after a database outage, as `sweep`'s settle_expired).
    """
    now = utcnow()
    lease = now + timedelta(seconds=lease_seconds)
    for claim in view.audits:
        session.execute(
            update(Job)
            .where(fenced(claim), Job.cancel_requested_at.is_(None))
            .values(lease_expires_at=lease)
            .execution_options(synchronize_session=False)
        )
    if not resend:
        return []
    lost = session.execute(
        update(Job)
        .where(
            Job.status == JobStatus.auditing.value,
            Job.lease_expires_at < now,
            Job.enqueued_at < view.since,
            Job.cancel_requested_at.is_(None),
        )
        .values(lease_expires_at=lease, enqueued_at=now)
        .returning(Job.id, Job.worker_id, Job.attempts)
        .execution_options(synchronize_session=False)
    ).all()
    message = "the broker lost the audit's queued tasks; they are sent again, on the same attempt"
    for job_id, _, attempt in lost:
        append_event(session, job_id, "warning", {"stage": "audit", "message": message, "attempt": attempt})
    return [Claim(job_id, worker_id, attempt) for job_id, worker_id, attempt in lost]


def sweep(
    session: Session, *, broker: bool, resend_seconds: float = 30.0, settle_expired: bool = True
) -> list[uuid.UUID]:
    """Settle jobs whose worker vanished; returns ids that may need a (new) broker message.

    Lease expired and attempts exhausted -> failed; lease expired with cancel requested -> cancelled;
    otherwise the job goes back to `queued` (with a broker, `settle_audits` runs first: an audit
    waiting in the broker, or lost by it, has its lease renewed). With a broker, every queued job
    whose message may be gone (none sent, or the last one sent over resend_seconds ago and still
    unclaimed: a broker that restarted without persistence, or a worker that dropped it) is stamped
    as sent now and returned; the caller sends it with `enqueue`, which clears the stamp again if
    the broker refuses.
    A duplicate message is harmless: it finds nothing to claim. `settle_expired=False` leaves expired
    leases alone (right after a database outage, when live workers could not renew theirs either).
    """
    now = utcnow()
    if settle_expired:
        _settle_expired(session, now)
    if not broker:
        return []
    return list(
        session.execute(
            update(Job)
            .where(
                Job.status == JobStatus.queued.value,
                Job.cancel_requested_at.is_(None),
                or_(Job.enqueued_at.is_(None), Job.enqueued_at < now - timedelta(seconds=resend_seconds)),
            )
            .values(enqueued_at=now)
            .returning(Job.id)
            .execution_options(synchronize_session=False)
        ).scalars()
    )
