"""Celery for long jobs: late acks, one job per worker process, redelivery on loss, JSON only.

Start with `cmim worker` (one process per GPU: `-c 1`, pin it with CUDA_VISIBLE_DEVICES). The task
body is `worker.pipeline.run_job`; a thread in the worker's main process sweeps for jobs whose
lease expired (Redis only redelivers an unacked message after the visibility timeout, which is
longer than any job) and for queued jobs whose message may be lost (a broker restarted without
persistence), and sends them again: the database row, not the message, is the truth.

A job's audit fans out: `run_job` hands its tasks to `dispatch_audit`, a chord of one task per seed
and budget phase on the same queue (`worker/fanout.py`), whose callback publishes the report. The
chord's bookkeeping lives in the result backend (the broker's Redis); the job row stays the truth.
The sweep renews the lease of a job whose audit messages wait in the queue, and sends an audit the
broker lost again from the hand-off its job stored (`app.core.sweep.settle_audits`).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from celery import Celery, chord, group, signals
from celery.exceptions import Reject

from app.core.config import get_settings
from app.core.db import dispose_engines, session_scope
from app.core.outage import is_outage
from app.core.queue import ASSEMBLE_TASK, AUDIT_TASK, RUN_JOB_TASK, Claim, broker_view, enqueue, handoff_claim
from app.core.sweep import settle_audits, sweep

log = logging.getLogger(__name__)
T = TypeVar("T")
settings = get_settings()

broker_url = settings.broker_url or "redis://127.0.0.1:6379/0"
celery_app = Celery("cmim", broker=broker_url, backend=broker_url)
celery_app.conf.update(
    task_acks_late=True,  # a job's message is acked only when run_job returns
    task_reject_on_worker_lost=True,  # ... and requeued if the process dies (the attempts cap stops loops)
    worker_prefetch_multiplier=1,  # never hold a second long job behind the running one
    broker_transport_options={"visibility_timeout": settings.visibility_timeout},
    # A broker blip must not kill a running job: its lease and fenced writes already make a duplicate
    # delivery harmless, and cancelling would spend one of the job's attempts on someone else's outage.
    worker_cancel_long_running_tasks_on_connection_loss=False,
    broker_connection_retry_on_startup=True,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,  # the job row is the result (audit tasks keep theirs for their chord)
    result_expires=settings.visibility_timeout,  # a chord waits for its slowest task
    task_routes={name: {"queue": settings.queue_name} for name in (RUN_JOB_TASK, AUDIT_TASK, ASSEMBLE_TASK)},
    task_default_queue=settings.queue_name,
    worker_hijack_root_logger=False,
)


def _redelivered_on_outage(what: str, body: Callable[[], T]) -> T:
    """body(); a database outage that outlasted its retries rejects the message for redelivery."""
    try:
        return body()
    except Exception as e:
        if is_outage(e):
            # The database did not answer for a whole retry window: never ack a message whose work was
            # not recorded; the broker delivers it again (and the sweep re-sends a lost job).
            log.warning("%s: %s; message rejected for redelivery", what, e)
            raise Reject(str(e), requeue=True) from e
        raise


@celery_app.task(name=RUN_JOB_TASK)
def run_job_task(job_id: str) -> str:
    from worker.pipeline import run_job  # imports torch in the worker process only (after any fork)

    return _redelivered_on_outage(f"job {job_id}", lambda: run_job(job_id, settings, fan_out=dispatch_audit))


def dispatch_audit(handoff: dict[str, Any]) -> None:
    """A job's audit as a chord: its tasks on the job's queue, then the callback that publishes."""
    header = group(
        celery_app.signature(AUDIT_TASK, args=[handoff, i], queue=settings.queue_name)
        for i in range(handoff["tasks"])
    )
    chord(header)(celery_app.signature(ASSEMBLE_TASK, args=[handoff], queue=settings.queue_name))


@celery_app.task(name=AUDIT_TASK, ignore_result=False)
def audit_task(handoff: dict[str, Any], index: int) -> dict[str, Any]:
    from worker.fanout import run_audit_task

    what = f"job {handoff['job_id']}: audit task {index + 1}"
    return _redelivered_on_outage(what, lambda: run_audit_task(handoff, index, settings))


@celery_app.task(name=ASSEMBLE_TASK)
def assemble_task(outcomes: list[dict[str, Any]], handoff: dict[str, Any]) -> str:
    from worker.fanout import assemble_and_publish

    what = f"job {handoff['job_id']}: assembling the report"
    return _redelivered_on_outage(what, lambda: assemble_and_publish(outcomes, handoff, settings))


def sweep_once(settle_expired: bool = True) -> int:
    """Keep the claims of audits waiting in the broker, settle lost jobs, and send again every queued job
    and handed-off audit whose messages may be gone; returns how many were sent."""
    view = broker_view(settings)
    # Unread, the broker may hold any job's audit tasks: no lease is taken back until it answers (nothing
    # could be sent to it meanwhile anyway).
    settle = settle_expired and view is not None
    with session_scope(settings.database_url) as s:
        audits = [] if view is None else settle_audits(s, view, settings.lease_seconds, resend=settle)
        # Sent before the transaction commits: if sending fails, the audits stay as they were, for the
        # next sweep (a commit that fails after sending leaves a duplicate chord: harmless, fenced).
        for claim in audits:
            _resend_audit(claim)
        ids = sweep(s, broker=True, resend_seconds=settings.resend_seconds, settle_expired=settle)
    lost = [job_id for job_id in ids if view is None or job_id not in view.jobs]
    for job_id in lost:
        enqueue(settings, job_id)
    return len(lost) + len(audits)


def _resend_audit(claim: Claim) -> None:
    """The audit's chord sent again from the hand-off its job stored when it sent it first."""
    from app.core.storage import ArtifactStore
    from worker.results import StoreResults

    handoff = StoreResults(ArtifactStore.from_settings(settings), claim.job_id).load_handoff()
    what = f"job {claim.job_id} (attempt {claim.attempt})"
    if handoff is None or handoff_claim(handoff) != claim:  # its lease runs out again and the sweep decides
        log.warning("%s: no hand-off stored; its audit is not sent again", what)
        return
    log.info("%s: the broker lost its audit's messages; the audit is sent again", what)
    dispatch_audit(handoff)


def _sweep_forever(stop: threading.Event) -> None:
    # After a database outage every lease may have run out while its live worker could not renew it:
    # give the heartbeats two beats to come back before taking any job over as lost.
    grace = 2 * settings.heartbeat_seconds
    back_at: float | None = -math.inf  # when the database last came back; None while it is away
    while not stop.wait(settings.sweep_seconds):
        try:
            settle = back_at is not None and time.monotonic() - back_at >= grace
            sent = sweep_once(settle_expired=settle)
            if back_at is None:
                back_at = time.monotonic()
            if sent:
                log.info("sweep: re-enqueued %d job(s)", sent)
        except Exception as e:  # noqa: BLE001 - a failed sweep is retried at the next tick
            back_at = None
            log.warning("sweep failed: %s: %s", type(e).__name__, e, exc_info=not is_outage(e))


_stop_sweep = threading.Event()


@signals.worker_ready.connect
def _start_sweep(**_: object) -> None:
    threading.Thread(target=_sweep_forever, args=(_stop_sweep,), name="cmim-sweep", daemon=True).start()


@signals.worker_shutdown.connect
def _stop_sweeping(**_: object) -> None:
    _stop_sweep.set()


@signals.worker_init.connect
def _import_the_pipeline(**_: object) -> None:
    # torch, the model zoo and the audit (seconds of imports) load before the worker takes a task, not
    # inside the first task a worker runs: a fanned-out audit's second worker starts at full speed.
    import worker.fanout  # noqa: F401


@signals.worker_process_init.connect
def _fresh_connections(**_: object) -> None:
    # A forked child must not share the parent's pooled database connections.
    dispose_engines()
