"""One audit across two real Celery workers: the tasks fan out, the report equals the one-worker
report, a worker SIGKILLed mid-task leaves one complete report with only its task redone, a cancel
mid fan-out stops every task, and the tasks' stored results are deleted once the job has ended. And
the sweep's part, on SQLite and PostgreSQL: an audit waiting in the broker keeps its claim, one the
broker lost is sent again on the same attempt, one whose worker died is taken back."""

from __future__ import annotations

import json
import re
import signal
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from service_helpers import job_body, service_settings
from sqlalchemy import update
from test_e2e import Proc, Stack, base_env, follow, make_key, statuses, submit

from app.core.db import session_scope
from app.core.migrate import upgrade
from app.core.models import Job, JobEvent, JobStatus, utcnow
from app.core.queue import BrokerView, Claim, claim_job, mark_handed_off, request_cancel, transition
from app.core.sweep import settle_audits, sweep

# Two seeds, no budget phases: two tasks of several seconds each on one CPU thread.
AUDIT = {"audit.seeds": 2, "audit.epochs": 15, "teacher.dataset_params": {"num_train": 1000, "num_test": 500}}


@pytest.fixture(scope="module")
def stack(pg_databases, redis_url, tmp_path_factory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("fanout")
    url = pg_databases.create()
    upgrade(url)
    env = base_env(
        tmp,
        CMIM_DATABASE_URL=url,
        CMIM_BROKER_URL=redis_url,
        CMIM_QUEUE_NAME=f"gpu-fan-{uuid.uuid4().hex[:8]}",
    )
    stack = Stack(env, tmp)
    stack.key = make_key(env, "fanout")
    api = stack.start("api", "-m", "uvicorn", "app.main:create_app", "--factory", "--port", str(stack.port))
    try:
        start_worker(stack, "worker-1")
        stack.wait_healthy(api)
        yield stack
    finally:
        stack.close()


def task_lines(proc: Proc, job_id: str) -> list[str]:
    return [line for line in proc.output().splitlines() if f"job {job_id}: audit task" in line]


def figures(report: dict[str, Any]) -> dict[str, Any]:
    """Everything the audit measured: the report without the job's id, times (and the time estimates
    made from them), training metadata and the evidence (drawn from each job's own secret)."""
    out = {k: v for k, v in report.items() if k not in {"job_id", "wall_s", "timing", "findings", "evidence"}}
    out["teacher"] = {k: v for k, v in report["teacher"].items() if k != "meta"}
    return out


def start_worker(stack: Stack, name: str) -> Proc:
    """A Celery worker (one job or task at a time), once it takes tasks."""
    proc = stack.start(name, "-m", "worker.cli", "worker", "--pool", "solo")
    deadline = time.monotonic() + 60
    while not re.search(r"celery@\S+ ready\.", proc.output()):
        assert proc.popen.poll() is None and time.monotonic() < deadline, proc.output()
        time.sleep(0.2)
    return proc


def workers(stack: Stack) -> list[Proc]:
    return [p for p in stack.procs if p.name.startswith("worker") and p.popen.poll() is None]


def stored_results(stack: Stack, job_id: str) -> list[str]:
    """What the job left under its audit results in the artifact store: task results and handed data."""
    return sorted(p.name for p in (stack.tmp / "artifacts" / "audit-results" / job_id).glob("*"))


def test_two_workers_share_one_audit_and_a_killed_worker_redoes_only_its_task(stack: Stack) -> None:
    body = job_body(**AUDIT)
    one = submit(
        stack, body
    )  # one worker: the 4 tasks (2 seeds, each with its null's task) run on it in turn
    assert statuses(follow(stack, one))[-1] == "succeeded", stack.logs()
    single = stack.get(f"/api/v1/jobs/{one}/report").json()
    (w1,) = workers(stack)
    assert len([x for x in task_lines(w1, one) if "computed" in x]) == 4
    # Its progress counts the whole audit's units over every task, as an audit in one process does.
    events = stack.get(f"/api/v1/jobs/{one}/events?after=0").json()
    done = [x["data"]["done"] for x in events if x["kind"] == "progress"]
    assert {x["data"]["total"] for x in events if x["kind"] == "progress"} == {60}
    assert done == sorted(done) and done[-1] == 60, done

    start_worker(stack, "worker-2")
    two = submit(stack, body)  # the same audit again: a new job computes it afresh, on both workers
    assert statuses(follow(stack, two))[-1] == "succeeded", stack.logs()
    for w in workers(stack):
        assert [x for x in task_lines(w, two) if "computed" in x], f"{w.name} ran no task:\n{stack.logs()}"
    assert figures(stack.get(f"/api/v1/jobs/{two}/report").json()) == figures(single)
    # the worker that did not run the job planned from the prepared data the job stored, without
    # generating it again (the one that ran it kept its plan)
    handed = f"job {two}: audit plan rebuilt from the data the job handed over"
    assert len([w for w in workers(stack) if handed in w.output()]) == 1, stack.logs()
    assert stored_results(stack, one) == [] and stored_results(stack, two) == []  # the report holds them

    three = submit(stack, body)
    deadline = time.monotonic() + 180
    victim = None
    while victim is None and time.monotonic() < deadline:  # a worker in the middle of a task of this job
        for w in workers(stack):
            lines = task_lines(w, three)
            if any("starts" in x for x in lines) and not any("computed" in x or "found" in x for x in lines):
                progress = [
                    x
                    for x in stack.get(f"/api/v1/jobs/{three}/events?after=0").json()
                    if x["kind"] == "progress"
                ]
                if progress:
                    victim = w
        time.sleep(0.2)
    assert victim is not None, stack.logs()
    started = [
        re.search(r"audit task (\d+)/", x).group(1) for x in task_lines(victim, three) if "starts" in x
    ]
    victim.kill(signal.SIGKILL)
    events = follow(stack, three, timeout=240)
    job = stack.get(f"/api/v1/jobs/{three}").json()
    assert job["status"] == "succeeded" and job["attempts"] == 2, stack.logs()
    assert "queued" in statuses(events)[1:]  # the lease ran out and the sweep re-queued the job
    reports = [a for a in stack.get(f"/api/v1/jobs/{three}/artifacts").json() if a["kind"] == "report"]
    assert len(reports) == 1
    assert figures(stack.get(f"/api/v1/jobs/{three}/report").json()) == figures(single)
    lines = [x for p in stack.procs if p.name.startswith("worker") for x in task_lines(p, three)]
    computed = sorted(re.search(r"audit task (\d+)/", x).group(1) for x in lines if "computed" in x)
    assert computed == ["1", "2", "3", "4"], (
        lines
    )  # each task computed once: the killed one only on attempt 2
    killed = started[-1]
    assert [x for x in lines if "computed" in x and f"task {killed}/" in x and "attempt 2" in x], lines
    assert [x for x in lines if "found stored" in x and f"task {killed}/" not in x], lines
    assert stored_results(stack, three) == []


def test_cancel_mid_fan_out_stops_every_task_and_deletes_their_results(stack: Stack) -> None:
    while len(workers(stack)) < 2:
        start_worker(stack, f"worker-{len(stack.procs)}")
    # 4 seeds, 4 tasks: no null's tasks (they would interleave with the seeds')
    job = submit(stack, job_body(**AUDIT | {"audit.seeds": 4, "audit.epochs": 100, "audit.null_archs": []}))

    def lines() -> list[str]:
        return [x for w in workers(stack) for x in task_lines(w, job)]

    def started(task: int) -> bool:
        return any(f"audit task {task}/4" in x and "starts" in x for x in lines())

    # tasks 1 and 2 done (their results stored), tasks 3 and 4 running on the two workers
    deadline = time.monotonic() + 240
    while not (len([x for x in lines() if "computed" in x]) == 2 and started(3) and started(4)):
        assert time.monotonic() < deadline, stack.logs()
        time.sleep(0.2)
    stored = stored_results(stack, job)
    assert len([name for name in stored if name.endswith(".json") and name != "handoff.json"]) == 2
    assert "data.pt" in stored  # the prepared data the job handed to the workers
    assert "handoff.json" in stored  # what the sweep sends the audit again from if the broker loses it
    r = stack.post(f"/api/v1/jobs/{job}/cancel")
    assert r.status_code == 202 and r.json()["cancel_requested"], r.text
    events = follow(stack, job, timeout=120)
    assert statuses(events)[-1] == "cancelled", stack.logs()

    def settled() -> bool:  # tasks 3 and 4 ended and the chord's callback ran
        ended = [x for x in lines() if "stopped: the job was cancelled" in x or "claim is gone" in x]
        out = "".join(w.output() for w in workers(stack))
        return len(ended) == 2 and f"job {job}: report not published" in out

    deadline = time.monotonic() + 120
    while not settled():
        assert time.monotonic() < deadline, stack.logs()
        time.sleep(0.2)
    done = sorted(re.search(r"audit task (\d+)/", x).group(1) for x in lines() if "computed" in x)
    assert done == ["1", "2"], lines()  # neither running task trained to its end
    # a running task stops at its next progress check: on the cancel, or on the lease its sibling ended
    # by recording the cancel first
    assert [x for x in lines() if "stopped: the job was cancelled" in x], lines()
    assert stack.get(f"/api/v1/jobs/{job}").json()["status"] == "cancelled"
    assert stored_results(stack, job) == []  # the two finished tasks' results went with the job
    assert stack.get(f"/api/v1/jobs/{job}/artifacts").json() == []


def handed_off(database_url: str, max_attempts: int = 1) -> Claim:
    """A job (by default on its last attempt) whose audit went to the broker, its lease since run out."""
    with session_scope(database_url) as s:
        row = Job(
            owner_id=uuid.uuid4(), spec={}, request_hash="x", max_attempts=max_attempts, last_event_seq=0
        )
        s.add(row)
        s.flush()
        claim = claim_job(s, row.id, "w", 60)
        transition(s, claim, JobStatus.auditing)
        mark_handed_off(s, claim, 60)
    expire(database_url, claim)
    return claim


def expire(database_url: str, claim: Claim) -> None:
    with session_scope(database_url) as s:
        s.execute(
            update(Job).where(Job.id == claim.job_id).values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )


def settle(database_url: str, audits: set[Claim], since: datetime) -> list[Claim]:
    """One sweep with the broker holding these audits' messages, and its data since `since`."""
    with session_scope(database_url) as s:
        lost = settle_audits(s, BrokerView(frozenset(), frozenset(audits), since), 60)
        sweep(s, broker=True)
    return lost


def test_the_sweep_keeps_waiting_audits_resends_lost_ones_and_takes_back_dead_ones(settings) -> None:
    url, long_ago = settings.database_url, utcnow() - timedelta(hours=1)

    def row(claim: Claim) -> Job:
        with session_scope(url) as s:
            return s.get(Job, claim.job_id)

    waits = handed_off(url)  # its tasks wait their turn: the claim stays, however often the lease runs out
    for _ in range(2):
        assert settle(url, {waits}, long_ago) == []
        assert (row(waits).status, row(waits).attempts) == ("auditing", 1)
        assert row(waits).lease_expires_at > utcnow()
        expire(url, waits)

    lost = handed_off(url)  # nothing waits, and the broker lost its data after the hand-off
    assert lost in settle(url, set(), utcnow())
    assert (row(lost).status, row(lost).attempts) == ("auditing", 1)
    with session_scope(url) as s:
        (warning,) = s.query(JobEvent).filter(JobEvent.job_id == lost.job_id, JobEvent.kind == "warning")
        assert "broker lost" in warning.data["message"] and warning.data["attempt"] == 1
    # sent again now: lost again without another broker restart, it is a dead worker's (below)
    expire(url, lost)
    assert settle(url, set(), long_ago) == []
    assert row(lost).status == "failed" and "worker was lost" in row(lost).error

    dead = handed_off(url)  # a worker died with its task; what still waits belongs to an older attempt
    assert settle(url, {Claim(dead.job_id, "w", 0)}, long_ago) == []
    assert row(dead).status == "failed" and "worker was lost" in row(dead).error

    cancelled = handed_off(url, max_attempts=2)  # a cancel does not wait for the audit's turn
    with session_scope(url) as s:
        request_cancel(s, cancelled.job_id)
    expire(url, cancelled)
    assert settle(url, {cancelled}, utcnow()) == []
    assert row(cancelled).status == "cancelled"


def test_the_chord_callback_loads_no_model_and_runs_no_forward_pass(sqlite_url, tmp_path) -> None:
    """The callback assembles from the hand-off's plan summary and the stored task results: no model is
    loaded, no module runs forward; and its report is the report of the same job run in one process."""
    from fanout_assembly import callback_cost, hand_off, run_tasks
    from test_seeded_report import SEEDED_JOB, comparable, differences, seeded_report

    from app.core.models import REPORT_NAME, Artifact
    from app.core.storage import ArtifactStore

    settings = service_settings(sqlite_url, tmp_path)
    handoff = hand_off(settings, SEEDED_JOB)
    assert handoff["summary"]["tasks"] and len(handoff["summary"]["tasks"]) == handoff["tasks"]
    outcomes = run_tasks(settings, handoff)
    cost = callback_cost(settings, handoff, outcomes)
    assert cost["outcome"] == "succeeded"
    assert (cost["loads"], cost["forwards"]) == (0, 0)
    with session_scope(sqlite_url) as s:
        job_id = uuid.UUID(handoff["job_id"])
        key = (
            s.query(Artifact)
            .filter(Artifact.job_id == job_id, Artifact.name == REPORT_NAME)
            .one()
            .storage_key
        )
    fanned = json.loads(ArtifactStore.from_settings(settings).read_bytes(key))
    in_process = seeded_report(sqlite_url, tmp_path / "one")
    evidence = ("evidence",)  # drawn from each job's own secret
    a, b = ({k: v for k, v in comparable(r).items() if k not in evidence} for r in (fanned, in_process))
    assert differences(a, b) == []
