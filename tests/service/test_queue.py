"""The jobs table as a queue, on SQLite and PostgreSQL: atomic claim, fenced lease, cancel, sweep."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from app.core.db import session_scope
from app.core.models import Job, JobEvent, JobStatus, utcnow
from app.core.queue import (
    LeaseLost,
    claim_job,
    next_claimable_job,
    release_claim,
    renew_lease,
    request_cancel,
    status_event,
    transition,
)
from app.core.sweep import sweep


@pytest.fixture
def job_id(settings) -> uuid.UUID:
    with session_scope(settings.database_url) as s:
        job = Job(
            owner_id=uuid.uuid4(), spec={}, request_hash="x", max_attempts=2, last_event_seq=0, attempts=0
        )
        s.add(job)
        s.flush()
        status_event(s, job.id, JobStatus.queued)
        return job.id


def job(settings, job_id: uuid.UUID) -> Job:
    with session_scope(settings.database_url) as s:
        return s.get(Job, job_id)


def expire_lease(settings, job_id: uuid.UUID) -> None:
    with session_scope(settings.database_url) as s:
        s.execute(
            update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )


def test_only_one_of_many_concurrent_claims_wins(settings, job_id) -> None:
    results: list[object] = []

    def claim(i: int) -> None:
        with session_scope(settings.database_url) as s:
            results.append(claim_job(s, job_id, f"w{i}", 60))

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wins = [r for r in results if r is not None]
    assert len(wins) == 1 and wins[0].attempt == 1
    j = job(settings, job_id)
    assert j.status == "training" and j.attempts == 1 and j.worker_id == wins[0].worker_id
    assert j.lease_expires_at > utcnow() and j.started_at.tzinfo is not None


def test_lease_renewal_is_fenced_and_an_expired_job_is_reclaimed(settings, job_id) -> None:
    with session_scope(settings.database_url) as s:
        first = claim_job(s, job_id, "a", 60)
    with session_scope(settings.database_url) as s:
        assert claim_job(s, job_id, "b", 60) is None  # lease still held
        assert renew_lease(s, first, 60) is False
    expire_lease(settings, job_id)
    with session_scope(settings.database_url) as s:
        second = claim_job(s, job_id, "b", 60)
    assert second is not None and second.attempt == 2
    with session_scope(settings.database_url) as s, pytest.raises(LeaseLost):
        renew_lease(s, first, 60)
    with session_scope(settings.database_url) as s, pytest.raises(LeaseLost):
        transition(s, first, JobStatus.succeeded)
    with session_scope(settings.database_url) as s:
        transition(s, second, JobStatus.succeeded)
    assert job(settings, job_id).status == "succeeded"


def test_cancel_queued_at_once_running_by_flag(settings, job_id) -> None:
    with session_scope(settings.database_url) as s:
        claim = claim_job(s, job_id, "a", 60)
        assert request_cancel(s, job_id) == JobStatus.training
    with session_scope(settings.database_url) as s:
        assert renew_lease(s, claim, 60) is True  # the worker learns about it at its next epoch
        transition(s, claim, JobStatus.cancelled)
    with session_scope(settings.database_url) as s:
        other = Job(
            owner_id=uuid.uuid4(), spec={}, request_hash="x", max_attempts=2, last_event_seq=0, attempts=0
        )
        s.add(other)
        s.flush()
        assert request_cancel(s, other.id) == JobStatus.cancelled
        assert claim_job(s, other.id, "a", 60) is None


def test_sweep_requeues_then_fails_after_max_attempts(settings, job_id) -> None:
    for attempt in (1, 2):
        with session_scope(settings.database_url) as s:
            assert claim_job(s, job_id, f"w{attempt}", 60).attempt == attempt
        expire_lease(settings, job_id)
        with session_scope(settings.database_url) as s:
            sent = sweep(s, broker=True)
        if attempt == 1:
            assert job_id in sent  # (the database is shared: other tests' queued jobs may be sent too)
            assert job(settings, job_id).status == "queued" and job(settings, job_id).enqueued_at is not None
            with session_scope(settings.database_url) as s:
                assert job_id not in sweep(s, broker=True)  # a message is in flight already
    j = job(settings, job_id)
    assert j.status == "failed" and "max_attempts" in j.error and j.finished_at is not None
    with session_scope(settings.database_url) as s:
        events = list(s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.seq)))
        kinds = [e.data.get("status") for e in events]
        assert kinds == ["queued", "training", "queued", "training", "failed"]
        assert [e.seq for e in events] == [1, 2, 3, 4, 5]


def test_sweep_finishes_a_lost_job_whose_cancel_was_requested(settings, job_id) -> None:
    with session_scope(settings.database_url) as s:
        claim_job(s, job_id, "a", 60)
        request_cancel(s, job_id)
    expire_lease(settings, job_id)
    with session_scope(settings.database_url) as s:
        sweep(s, broker=False)
        assert next_claimable_job(s) != job_id
    assert job(settings, job_id).status == "cancelled"


def test_sweep_resends_a_queued_job_whose_message_may_be_gone(settings, job_id) -> None:
    with session_scope(settings.database_url) as s:
        assert job_id in sweep(s, broker=True, resend_seconds=60)  # never sent: sent now
    with session_scope(settings.database_url) as s:
        assert job_id not in sweep(s, broker=True, resend_seconds=60)  # just sent: not again yet
    with session_scope(settings.database_url) as s:
        s.execute(update(Job).where(Job.id == job_id).values(enqueued_at=utcnow() - timedelta(seconds=61)))
    with session_scope(settings.database_url) as s:
        assert job_id in sweep(s, broker=True, resend_seconds=60)  # still unclaimed a bound later: again
    with session_scope(settings.database_url) as s:
        claim_job(s, job_id, "w", 60)
        s.execute(update(Job).where(Job.id == job_id).values(enqueued_at=utcnow() - timedelta(seconds=61)))
    with session_scope(settings.database_url) as s:
        assert job_id not in sweep(s, broker=True, resend_seconds=60)  # claimed: nothing to re-send


def test_broker_view_reads_the_waiting_messages(redis_url, tmp_path) -> None:
    import redis

    from app.core.config import Settings
    from app.core.queue import broker_view, enqueue

    queue = f"gpu-pending-{uuid.uuid4().hex[:8]}"
    cfg = Settings(
        environment="test",
        database_url=f"sqlite:///{tmp_path / 'q.db'}",
        broker_url=redis_url,
        queue_name=queue,
    )
    from app.core.migrate import upgrade

    upgrade(cfg.database_url)
    ids = [uuid.uuid4(), uuid.uuid4()]
    try:
        for i in ids:
            assert enqueue(cfg, i)
        assert broker_view(cfg).jobs == set(ids)
    finally:
        redis.Redis.from_url(redis_url).delete(queue)  # only this test's own queue
    assert broker_view(cfg).jobs == set()


def test_release_gives_the_attempt_back(settings, job_id) -> None:
    with session_scope(settings.database_url) as s:
        claim = claim_job(s, job_id, "w", 60)
    with session_scope(settings.database_url) as s:
        assert release_claim(s, claim, "outage")
        assert not release_claim(s, claim, "outage")  # fenced: only the holder releases, once
    j = job(settings, job_id)
    assert (j.status, j.attempts, j.worker_id, j.enqueued_at) == ("queued", 0, None, None)
    with session_scope(settings.database_url) as s:
        assert claim_job(s, job_id, "w2", 60).attempt == 1


def test_heartbeat_keeps_a_slow_job_and_its_end_lets_the_lease_run_out(settings, job_id) -> None:
    from worker.pipeline import JobContext

    # A lease of 3 s renewed every 0.2 s: the heartbeat thread would have to stall for 3 s to lose it.
    beat = settings.model_copy(update={"lease_seconds": 3, "heartbeat_seconds": 0.2})
    with session_scope(settings.database_url) as s:
        claim = claim_job(s, job_id, "slow", beat.lease_seconds)
    first = job(settings, job_id).lease_expires_at
    deadline = time.monotonic() + 60
    with JobContext(beat, claim):
        # Renewed after its first lease ran out, without a single epoch: the heartbeat alone keeps the job.
        while job(settings, job_id).lease_expires_at <= first + timedelta(seconds=beat.lease_seconds):
            assert time.monotonic() < deadline, "the heartbeat never renewed the lease past the first one"
            time.sleep(0.05)
        with session_scope(settings.database_url) as s:
            sweep(s, broker=False)
            assert claim_job(s, job_id, "thief", 60) is None
        assert job(settings, job_id).status == "training"
    while True:  # the worker is gone: its lease runs out, and the next claim takes the job
        with session_scope(settings.database_url) as s:
            sweep(s, broker=False)
            taken = claim_job(s, job_id, "next", 60)
        if taken is not None:
            break
        assert time.monotonic() < deadline, "the lease never ran out once the heartbeat stopped"
        time.sleep(0.1)
    assert taken.attempt == 2


def test_a_sweep_right_after_an_outage_leaves_expired_leases_to_their_heartbeats(settings, job_id) -> None:
    with session_scope(settings.database_url) as s:
        claim_job(s, job_id, "live", 60)
    expire_lease(settings, job_id)  # as if the database had been away longer than the lease
    with session_scope(settings.database_url) as s:
        sweep(s, broker=True, settle_expired=False)
    assert job(settings, job_id).status == "training"  # its worker may still be alive
    with session_scope(settings.database_url) as s:
        sweep(s, broker=True)
    assert job(settings, job_id).status == "queued"
