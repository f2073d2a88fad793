"""One audit across many workers: a job's audit tasks as a Celery group whose chord callback publishes.

`run_job` trains the teacher and control, stores both, measures what the report needs of them (the
plan's summary) and hands the audit over (`worker.celery_app.dispatch_audit`, a typed `Handoff` as JSON):
one task per seed and budget phase goes to the job's queue, and a chord callback assembles the report
from the summary and the stored results, stores and publishes it, without loading a model. Every task
carries the job's claim: while it runs it renews the job's lease, sends progress events and stops on
cancel; its result is written to the artifact store under the task's key, so a retried or duplicated
task is never recomputed. While a task or the callback waits its turn in the broker, the sweep renews
the job's lease: waiting is not being lost (`app.core.sweep.settle_audits`; an audit the broker lost is sent
again from the stored hand-off, on the same attempt). A worker killed mid-task leaves its task undone
and, once nothing of the job waits, the lease runs out: the sweep re-queues the job, whose next
attempt plans the same audit, finds every other result stored and redoes only the lost task.
"""

from __future__ import annotations

import logging
import shutil
import time
from typing import Any

from app.core.config import Settings
from app.core.db import session_scope
from app.core.models import Job, JobStatus
from app.core.outage import is_outage
from app.core.queue import LeaseLost, handoff_claim
from app.core.storage import ArtifactStore
from ml.audit import AuditProgress, PlanSummary, assemble, run
from ml.train import TrainingCancelled
from worker.lease import JobContext, finish
from worker.models import FileRow
from worker.plans import audit_plan
from worker.publish import policy_files, publish_audit, with_job
from worker.results import Handoff, StoreResults

log = logging.getLogger(__name__)


def run_audit_task(handoff: dict[str, Any], index: int, settings: Settings) -> dict[str, Any]:
    """Task `index` of the job's audit, or its stored result; returns {"index", "ok"} for the callback."""
    claim = handoff_claim(handoff)
    h = Handoff.model_validate(handoff)
    name = f"job {claim.job_id}: audit task {index + 1}/{h.tasks} (attempt {claim.attempt})"
    log.info("%s starts", name)
    with JobContext(settings, claim) as ctx:
        try:
            ctx.check()  # a stale claim (a later attempt owns the job) or a cancel: no work
            store = ArtifactStore.from_settings(settings)
            p = audit_plan(ctx, store, h)
            task = p.tasks[index]
            results = StoreResults(store, claim.job_id)
            stored, t0 = results.load(task.key) is not None, time.perf_counter()
            # Progress counts the whole audit's units, as an audit in one process does (the job's progress
            # and time left read it so): the tasks before this one in plan order, the order they are queued.
            before = sum(t.epochs for t in p.tasks[:index])

            def tick(done: int, message: str) -> None:
                text = f"task {index + 1}/{len(p.tasks)}: {message}"
                ctx.on_progress(
                    AuditProgress(stage="audit", done=before + done, total=p.total_epochs, message=text)
                )

            run(task, results=results, tick=tick)
            log.info(
                "%s %s", name, "found stored" if stored else f"computed in {time.perf_counter() - t0:.1f} s"
            )
            return {"index": index, "ok": True}
        except LeaseLost:
            log.warning("%s: the claim is gone, a later attempt owns the job", name)
        except TrainingCancelled:
            log.info("%s stopped: the job was cancelled", name)
            finish(ctx, JobStatus.cancelled)
        except Exception as e:
            if is_outage(e):
                raise  # not the job's failure: the message is rejected for redelivery
            log.exception("%s failed", name)
            finish(ctx, JobStatus.failed, error=f"{type(e).__name__}: {e}")
    return {"index": index, "ok": False}


def assemble_and_publish(outcomes: list[dict[str, Any]], handoff: dict[str, Any], settings: Settings) -> str:
    """The chord callback: the report assembled from the hand-off's plan summary and the stored results,
    stored and published. It loads no model and runs no forward pass (the summary holds what the report
    needs of the models); only a hand-off from an earlier version, without a summary, rebuilds the plan."""
    claim = handoff_claim(handoff)
    if not all(o.get("ok") for o in outcomes):
        _clear_if_ended(handoff, settings)
        log.info("job %s: report not published, a task did not finish", claim.job_id)
        return "not published: a task did not finish"
    h = Handoff.model_validate(handoff)
    with JobContext(settings, claim) as ctx:
        try:
            store = ArtifactStore.from_settings(settings)
            summary, files = _summary_and_files(ctx, store, h)
            results = StoreResults(store, claim.job_id)
            found = [r for t in summary.tasks if (r := results.load(t.key)) is not None]
            if len(found) < len(
                summary.tasks
            ):  # a duplicated delivery ended the chord early: the lease decides
                log.warning(
                    "job %s: %d of %d results stored; not published",
                    claim.job_id,
                    len(found),
                    len(summary.tasks),
                )
                return "incomplete"
            report = assemble(summary, found, job=h.extra.get("job"))
            publish_audit(ctx, store, with_job(report, h.job_id, h.extra), files, h.job_spec)
            results.clear()  # the report holds them now
        except LeaseLost:
            # Its worker stalled past the lease: the results stay stored, the attempt holding the job
            # finds them all and only assembles and publishes the report.
            log.warning("job %s: not published, the claim of attempt %d is gone", claim.job_id, claim.attempt)
            return "lease lost"
        except Exception as e:
            if is_outage(e):
                raise
            log.exception("job %s: assembling the report failed", claim.job_id)
            finish(ctx, JobStatus.failed, error=f"{type(e).__name__}: {e}")
            return "failed"
    log.info("job %s: report of %d tasks published", claim.job_id, len(found))
    shutil.rmtree(ctx.work, ignore_errors=True)
    return "succeeded"


def _summary_and_files(
    ctx: JobContext, store: ArtifactStore, h: Handoff
) -> tuple[PlanSummary, list[FileRow]]:
    """The plan summary and the files to publish: from the hand-off; a hand-off without a summary (sent by
    an earlier version) has its plan rebuilt, and its fitted policy published from it."""
    if h.summary is not None:
        return h.summary, h.published_files()
    p = audit_plan(ctx, store, h)
    return p.summary, [*h.published_files(), *policy_files(store, p.served_policy, ctx.work / "policy")]


def _clear_if_ended(handoff: dict[str, Any], settings: Settings) -> None:
    """A cancelled or failed job's stored task results, deleted: no later attempt will read them.

    A job still running (a later attempt took it over) keeps them for that attempt.
    """
    claim = handoff_claim(handoff)
    with session_scope(settings.database_url) as s:
        job = s.get(Job, claim.job_id)
        ended = job is not None and JobStatus(job.status).terminal
    if ended:
        StoreResults(ArtifactStore.from_settings(settings), claim.job_id).clear()
