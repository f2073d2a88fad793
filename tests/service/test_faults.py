"""Faults injected by the tests into the deployed stack (uvicorn, Celery prefork worker, Redis, PostgreSQL).

Each test restarts or stops only its own private Redis or PostgreSQL (tests/service/private_services.py)
and asserts that nothing is lost or duplicated: every job succeeds once, with one report, and an
outage never spends one of its attempts.
"""

from __future__ import annotations

import itertools
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from private_services import PrivatePostgres, PrivateRedis
from service_helpers import assert_problem, job_body
from sqlalchemy import select
from test_e2e import Proc, Stack, base_env, follow, make_key, statuses, submit

from app.core.config import Settings
from app.core.db import session_scope
from app.core.migrate import upgrade
from app.core.models import Job
from app.core.queue import BrokerView, broker_view

# Long enough to be running while a fault is injected; a few seconds of CPU.
SLOW = {"teacher.dataset_params": {"num_train": 1000, "num_test": 500}, "teacher.epochs": 20}
# Short settings where a test is not about the defaults: a lost message is re-sent within seconds.
FAST_RECOVERY = {"CMIM_RESEND_SECONDS": "2", "CMIM_INFRA_RETRY_SECONDS": "2"}
# The deployed defaults govern the crash test: none of the short lease settings of base_env.
LEASE_SETTINGS = ("CMIM_LEASE_SECONDS", "CMIM_HEARTBEAT_SECONDS", "CMIM_SWEEP_SECONDS", "CMIM_RESEND_SECONDS")


def start_stack(env: dict[str, str], tmp: Path, workers: int = 1) -> Stack:
    """The API and `workers` Celery workers on the deployed pool (prefork, one job at a time)."""
    stack = Stack(env, tmp)
    stack.key = make_key(env, "faults")
    api = stack.start("api", "-m", "uvicorn", "app.main:create_app", "--factory", "--port", str(stack.port))
    for i in range(workers):
        stack.start(f"worker-{i + 1}", "-m", "worker.cli", "worker")
    stack.wait_healthy(api)
    return stack


def job(stack: Stack, job_id: str) -> dict[str, Any]:
    return stack.get(f"/api/v1/jobs/{job_id}").json()


def reports(stack: Stack, job_id: str) -> int:
    return sum(a["kind"] == "report" for a in stack.get(f"/api/v1/jobs/{job_id}/artifacts").json())


def epoch_at_least(n: int) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e["kind"] == "epoch" and e["data"]["epoch"] >= n


def waiting(stack: Stack) -> BrokerView:
    """What waits in the broker's queue: jobs (duplicates of taken jobs may be there too) and audits."""
    env = stack.env
    cfg = Settings(
        database_url=env["CMIM_DATABASE_URL"],
        broker_url=env["CMIM_BROKER_URL"],
        queue_name=env["CMIM_QUEUE_NAME"],
    )
    view = broker_view(cfg)
    assert view is not None
    return view


def wait_for(condition: Callable[[], bool], what: str, stack: Stack, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen in {timeout} s:\n{stack.logs()}")
        time.sleep(0.2)


def assert_succeeded_once(stack: Stack, job_id: str, attempts: int = 1) -> None:
    events = follow(stack, job_id)
    assert statuses(events)[-1] == "succeeded", stack.logs()
    row = job(stack, job_id)
    assert row["status"] == "succeeded" and row["attempts"] == attempts, (row, stack.logs())
    assert reports(stack, job_id) == 1


# ------------------------------------------------------------- broker faults: a private Redis


@pytest.fixture(scope="module")
def broker_stack(pg_databases, tmp_path_factory) -> Iterator[tuple[Stack, PrivateRedis]]:
    tmp = tmp_path_factory.mktemp("broker-faults")
    broker = PrivateRedis(tmp)
    url = pg_databases.create()
    upgrade(url)
    queue = f"gpu-faults-{uuid.uuid4().hex[:8]}"
    env = base_env(
        tmp, CMIM_DATABASE_URL=url, CMIM_BROKER_URL=broker.url, CMIM_QUEUE_NAME=queue, **FAST_RECOVERY
    )
    stack = start_stack(env, tmp)
    try:
        yield stack, broker
    finally:
        stack.close()
        broker.stop()


def test_redis_restarted_without_persistence_loses_neither_queued_nor_running_job(
    broker_stack,
) -> None:
    stack, broker = broker_stack
    running = submit(stack, job_body(**SLOW))
    follow(stack, running, until=epoch_at_least(1))
    queued = submit(stack, job_body())  # waits behind the running job: one worker, one job at a time
    assert job(stack, queued)["status"] == "queued" and uuid.UUID(queued) in waiting(stack).jobs

    broker.restart()
    restarted = time.monotonic()
    assert waiting(stack).jobs == set()  # the queued job's message is gone with the broker

    assert_succeeded_once(stack, running)
    assert_succeeded_once(stack, queued)
    print(f"\nredis restart: queued job re-sent and succeeded {time.monotonic() - restarted:.1f} s later")
    assert "re-enqueued" in stack.logs()  # the sweep, not luck, brought it back


def test_three_broker_blips_cost_the_job_no_attempt(broker_stack) -> None:
    stack, broker = broker_stack
    job_id = submit(stack, job_body(**SLOW))
    broker.restart()  # 1: as the job is queued or just taken
    follow(stack, job_id, until=epoch_at_least(2))
    broker.restart()  # 2: while it trains
    follow(stack, job_id, until=epoch_at_least(6))
    broker.restart()  # 3: while it trains, later
    assert_succeeded_once(stack, job_id, attempts=1)
    print("\nthree broker blips: succeeded, attempts 1, one report")


def test_a_job_submitted_while_the_broker_is_down_runs_once_it_is_back(broker_stack) -> None:
    stack, broker = broker_stack
    broker.stop()
    try:
        r = stack.post("/api/v1/jobs", json=job_body())  # the row is written: the job is accepted
        assert r.status_code == 202, r.text
        ready = stack.get("/readyz")
        assert assert_problem(ready, 503)["checks"]["broker"] == "unreachable"
        assert ready.headers["retry-after"]
    finally:
        broker.start()
    assert_succeeded_once(stack, r.json()["id"])


# Two seeds: each job's audit is two tasks of a few seconds and a chord callback, queued behind whatever
# the one worker runs (longer together than the broker stack's 5 s lease).
FANNED = {
    "teacher.dataset_params": {"num_train": 1000, "num_test": 500},
    "teacher.epochs": 10,
    "audit.seeds": 2,
    "audit.epochs": 25,
}


def longest_silence(events: list[dict[str, Any]]) -> float:
    """The longest the job went without an event once its audit was handed over: nothing of it running."""
    audit = [e for e in events if e["kind"] == "status" and e["data"]["status"] == "auditing"][0]
    times = [datetime.fromisoformat(e["created_at"]) for e in events if e["id"] >= audit["id"]]
    return max((b - a).total_seconds() for a, b in itertools.pairwise(times))


def test_audits_queued_behind_each_other_keep_their_claims_through_a_redis_restart(broker_stack) -> None:
    stack, broker = broker_stack
    first, second = submit(stack, job_body(**FANNED)), submit(stack, job_body(**FANNED))

    def first_waits() -> bool:  # the one worker trains the second job: the first's audit waits in the queue
        return job(stack, second)["status"] == "training" and job(stack, first)["status"] == "auditing"

    wait_for(first_waits, "the first job's audit waiting behind the second job", stack)
    assert uuid.UUID(first) in {claim.job_id for claim in waiting(stack).audits}
    broker.restart()
    restarted = time.monotonic()
    # the first job's audit tasks are gone with the broker
    assert uuid.UUID(first) not in {claim.job_id for claim in waiting(stack).audits}

    events = {}
    for job_id in (first, second):  # nobody died: neither job is taken back, run again or failed
        assert_succeeded_once(stack, job_id, attempts=1)
        events[job_id] = follow(stack, job_id)
        assert statuses(events[job_id]) == ["queued", "training", "auditing", "succeeded"]
    took = time.monotonic() - restarted
    warnings = [e["data"]["message"] for e in events[first] if e["kind"] == "warning"]
    assert any("broker lost" in w for w in warnings), stack.logs()  # the sweep sent it again, same attempt
    # nothing of the second job's audit was lost: only its waiting, behind the first's, outlasted a lease
    lease = float(stack.env["CMIM_LEASE_SECONDS"])
    silence = longest_silence(events[second])
    assert silence > lease, (silence, stack.logs())
    print(
        f"\nredis restart with two audits queued: both succeeded at attempt 1, {took:.1f} s later; "
        f"the second audit waited {silence:.1f} s with a {lease:.0f} s lease"
    )


# ------------------------------------------------------------- database fault: a private PostgreSQL


@pytest.fixture(scope="module")
def database_stack(tmp_path_factory) -> Iterator[tuple[Stack, PrivatePostgres]]:
    tmp = tmp_path_factory.mktemp("database-faults")
    broker, database = PrivateRedis(tmp), PrivatePostgres()
    try:
        url = database.create_database()
        upgrade(url)
        env = base_env(tmp, CMIM_DATABASE_URL=url, CMIM_BROKER_URL=broker.url, **FAST_RECOVERY)
        stack = start_stack(env, tmp, workers=0)
        try:
            yield stack, database
        finally:
            stack.close()
    finally:
        broker.stop()
        database.remove()


def test_postgresql_restarted_as_a_worker_receives_the_job(database_stack) -> None:
    stack, database = database_stack
    job_id = submit(stack, job_body())  # no worker yet: its message waits in the broker
    database.stop()
    try:
        r = stack.post("/api/v1/jobs", json=job_body())
        body = assert_problem(r, 503)
        assert int(r.headers["retry-after"]) > 0 and "retry" in body["detail"]
        ready = stack.get("/readyz")
        assert assert_problem(ready, 503)["checks"]["database"].startswith("unreachable")
        assert ready.headers["retry-after"]
        assert httpx.get(f"{stack.base}/healthz", timeout=5).status_code == 200
        worker = stack.start("worker-1", "-m", "worker.cli", "worker")
        # The worker takes the message, cannot claim the job, retries and rejects it for redelivery.
        wait_for(lambda: "rejected for redelivery" in worker.output(), "a rejected delivery", stack)
    finally:
        database.start()
        back = time.monotonic()
    assert_succeeded_once(stack, job_id, attempts=1)
    rejected = worker.output().count("rejected for redelivery")
    took = time.monotonic() - back
    print(
        f"\nPostgreSQL down at delivery: {rejected} rejected deliveries; succeeded {took:.1f} s after restart"
    )


def test_postgresql_down_mid_training_requeues_the_job_without_spending_an_attempt(database_stack) -> None:
    stack, database = database_stack
    job_id = submit(stack, job_body(**SLOW))
    follow(stack, job_id, until=epoch_at_least(2))
    database.stop()
    try:  # past its retry window (2 s) the worker gives the job back, and logs it
        gave_back = f"job {job_id}: infrastructure outage"
        wait_for(lambda: any(gave_back in p.output() for p in stack.procs), "giving the job back", stack)
    finally:
        database.start()
    events = follow(stack, job_id)
    assert_succeeded_once(stack, job_id, attempts=1)
    print("\nPostgreSQL down mid-training: job given back, resumed, succeeded with attempts 1")
    requeued = [e for e in events if e["kind"] == "status" and e["data"]["status"] == "queued"]
    assert any("without spending an attempt" in e["data"].get("reason", "") for e in requeued), stack.logs()


# ------------------------------------------------------------- a crashed worker, on the deployed defaults


@pytest.fixture(scope="module")
def default_stack(pg_databases, tmp_path_factory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("crash")
    broker = PrivateRedis(tmp)
    url = pg_databases.create()
    upgrade(url)
    env = base_env(tmp, CMIM_DATABASE_URL=url, CMIM_BROKER_URL=broker.url)
    env = {k: v for k, v in env.items() if k not in LEASE_SETTINGS}
    stack = start_stack(env, tmp, workers=2)
    try:
        yield stack
    finally:
        stack.close()
        broker.stop()


def holder(stack: Stack, job_id: str) -> Proc:
    """The worker (process group) whose child process holds the job's lease."""
    with session_scope(stack.env["CMIM_DATABASE_URL"]) as s:
        worker_id = s.scalar(select(Job.worker_id).where(Job.id == uuid.UUID(job_id)))
    group = os.getpgid(int(worker_id.rsplit(":", 1)[1]))
    return next(p for p in stack.procs if p.name.startswith("worker") and p.popen.pid == group)


def test_sigkilled_worker_resumes_within_90_s_on_the_default_lease(default_stack) -> None:
    stack = default_stack
    job_id = submit(stack, job_body(**SLOW))
    follow(stack, job_id, until=epoch_at_least(3))
    holder(stack, job_id).kill(signal.SIGKILL)
    killed = time.monotonic()

    follow(stack, job_id, until=lambda e: e["kind"] == "status" and e["data"].get("attempt") == 2)
    resumed = time.monotonic() - killed
    print(f"\nSIGKILL on the default lease settings: claimed again {resumed:.1f} s after the kill")
    assert resumed < 90, stack.logs()
    events = follow(stack, job_id)
    assert_succeeded_once(stack, job_id, attempts=2)
    again = [
        e["data"]["epoch"]
        for e in events
        if e["kind"] == "epoch" and e["data"].get("attempt") == 2 and e["data"]["stage"] == "teacher"
    ]
    assert again and again[0] > 1  # resumed from its checkpoint, not from epoch 1
