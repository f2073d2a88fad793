"""run_job(job_id): claim -> train teacher (and CE control) -> audit -> publish; events, cancel, resume.

Published: the teacher's checkpoint, the report, what serving needs (`serving.json`) and, when the
job's audit has a serving policy, that policy fitted to the teacher (the predict endpoints serve the
model through it, as it was audited).

The same function runs under Celery and in the embedded local worker. The audit is a plan of tasks
(`ml.audit`): the embedded worker runs them in process; under Celery `run_job` stores the teacher and
control, measures what the report needs of them once (the plan's summary) and hands the tasks to
`fan_out` (a chord over the workers, `worker/fanout.py`) with a typed hand-off. Either way every task's
result is stored under its key, so a job re-claimed mid-audit redoes only unfinished tasks. Every write
is fenced on the claim (worker id + attempt, `worker/lease.py`), so a worker that lost its lease can
never publish over a newer attempt.

The job's other concepts each have a module: its inputs (`worker/inputs.py`), its models
(`worker/models.py`), the plan cache and evidence secret (`worker/plans.py`), the stored results and
the hand-off (`worker/results.py`), publishing (`worker/publish.py`).
"""

from __future__ import annotations

import logging
import shutil
import uuid
from collections.abc import Callable
from typing import Any

from app.core.config import Settings, get_settings
from app.core.db import session_scope
from app.core.models import JobStatus
from app.core.outage import is_outage, retry_outage
from app.core.queue import Claim, LeaseLost, claim_job, mark_handed_off, release_claim
from app.core.storage import ArtifactStore
from ml.audit import assemble, plan, run_in_process
from ml.policy import KEYED_NOT_SERVED
from ml.train import TrainingCancelled
from worker import models
from worker.inputs import job_inputs
from worker.lease import JobContext, default_worker_id, finish
from worker.plans import evidence_secret, keep_plan, store_challenge
from worker.publish import monitor_file, policy_files, publish_audit, with_job
from worker.results import Handoff, StoreResults

log = logging.getLogger(__name__)

FanOut = Callable[[dict[str, Any]], None]  # sends the hand-off's JSON (`Handoff.to_json`) to the workers
__all__ = ["FanOut", "JobContext", "finish", "run_job"]


def _execute(ctx: JobContext, fan_out: FanOut | None = None) -> bool:
    """Train, audit and publish; False when the audit was handed to `fan_out` (its callback publishes)."""
    store = ArtifactStore.from_settings(ctx.settings)
    ctx.work.mkdir(parents=True, exist_ok=True)
    inputs = job_inputs(ctx, store)
    if inputs.audit.policy.keyed_fraction > 0:
        # the key would have to be served beside the model (policy.safetensors is a downloadable artifact)
        raise ValueError(KEYED_NOT_SERVED)
    teacher = models.teacher(ctx, store, inputs)
    if inputs.audit.control:
        arch = inputs.audit.control_arch or inputs.teacher.arch
        inputs.audit = inputs.audit.model_copy(update={"control_arch": arch})
    control = models.control(ctx, inputs)

    ctx.set_status(JobStatus.auditing)
    monitor, calibration = monitor_file(store, inputs.data, ctx.work, inputs.teacher.seed)
    extra: dict[str, Any] = {
        "teacher": {"meta": teacher.meta.model_dump(mode="json")},
        "monitor": calibration,
    }
    if inputs.model_id is not None:
        extra["teacher"]["uploaded_model_id"] = inputs.model_id
    if "fine_tune" in teacher.meta.metrics:
        extra["fine_tune"] = teacher.meta.metrics["fine_tune"]
    # A job re-claimed in this stage gets its teacher and control back from their finished state
    # files and its finished audit tasks back from the store: only unfinished tasks run again.
    results = StoreResults(store, ctx.claim.job_id)
    p = plan(
        inputs.audit,
        teacher.model,
        inputs.data,
        control=None if control is None else control.model,
        secret=evidence_secret(store, ctx),
        evidence=teacher.deployed is None,  # a deployed model is asked nothing for challenges
        no_unlimited=[] if teacher.deployed is None or teacher.deployed.phases.unlimited else ["teacher"],
    )
    if p.challenges:  # none for a deployed model
        store_challenge(store, ctx, p)
    keep_plan((ctx.claim.job_id, ctx.claim.attempt), p)  # this worker's tasks of the job need not rebuild it
    files = [*teacher.files, monitor, *policy_files(store, p.served_policy, ctx.work / "policy")]
    if fan_out is None or teacher.deployed is not None:  # a deployed model's answers: in this process
        summary = p.summary  # measured first: a deployed model's section counts what it asked
        done = run_in_process(p, on_progress=ctx.on_progress, results=results)
        deployed = None if teacher.deployed is None else teacher.deployed.section(teacher.model)
        report = assemble(summary, done, job=inputs.marks, deployed=deployed)
        publish_audit(ctx, store, with_job(report, str(ctx.claim.job_id), extra), files, inputs.job.spec)
        results.clear()  # the report holds them now
        return True
    if control is not None:
        models.store_control(ctx, store, control)
    handoff = Handoff(
        job_id=str(ctx.claim.job_id),
        worker_id=ctx.claim.worker_id,
        attempt=ctx.claim.attempt,
        audit_config=inputs.audit.model_dump(mode="json"),
        teacher=teacher.keys,
        control=None if control is None else control.keys,
        files=[(name, kind, media, obj.key, obj.sha256, obj.size) for name, kind, media, obj in files],
        extra=extra | {"job": inputs.marks},
        tasks=len(p.tasks),
        data=ctx.retrying(lambda: results.save_data(inputs.data), "store the prepared data"),
        summary=p.summary,
        job_spec=inputs.job.spec,
    )
    _hand_off(ctx, results, handoff, fan_out)
    return False


def _hand_off(ctx: JobContext, results: StoreResults, handoff: Handoff, fan_out: FanOut) -> None:
    """The audit to `fan_out`, kept in the store and marked on the job first: from then on the sweep keeps
    the job's claim while the audit's messages wait in the broker, and sends the audit again from the
    stored hand-off if the broker loses them (`app.core.sweep.settle_audits`)."""
    ctx.retrying(lambda: results.save_handoff(handoff), "store the hand-off")

    def mark() -> None:
        with ctx.session() as s:
            mark_handed_off(s, ctx.claim, ctx.settings.lease_seconds)

    ctx.retrying(mark, "record the hand-off")
    fan_out(handoff.to_json())


def _claim(settings: Settings, job_id: uuid.UUID, worker_id: str) -> Claim | None:
    """The claim, retried through a database outage; the outage is raised if it outlasts the retries."""

    def claim() -> Claim | None:
        with session_scope(settings.database_url) as s:
            return claim_job(s, job_id, worker_id, settings.lease_seconds)

    return retry_outage(claim, settings.infra_retry_seconds, f"job {job_id}: claim")


def run_job(
    job_id: str | uuid.UUID,
    settings: Settings | None = None,
    worker_id: str | None = None,
    fan_out: FanOut | None = None,
) -> str:
    """Claim and run one job to a final status, or to its audit handed to `fan_out`; returns what happened.

    Only failures of the job itself spend an attempt: an outage that outlasts the retries gives the
    job back to the queue with its attempt (and is raised when even that cannot be recorded).
    """
    settings = settings or get_settings()
    job_id = uuid.UUID(str(job_id))
    claim = _claim(settings, job_id, worker_id or default_worker_id())
    if claim is None:
        return "not claimable (taken, finished, cancelled or out of attempts)"
    log.info("job %s: attempt %d on %s", job_id, claim.attempt, claim.worker_id)
    with JobContext(settings, claim) as ctx:
        try:
            if not _execute(ctx, fan_out):
                return "audit handed to the workers"
            outcome = JobStatus.succeeded
        except LeaseLost:
            log.warning("job %s: lease lost; another attempt owns it now", job_id)
            return "lease lost"
        except TrainingCancelled:
            outcome = finish(ctx, JobStatus.cancelled)
        except Exception as e:  # noqa: BLE001 - any failure of the job itself is recorded on the job
            if is_outage(e):
                return _give_back(ctx, e)
            log.exception("job %s failed", job_id)
            outcome = finish(ctx, JobStatus.failed, error=f"{type(e).__name__}: {e}")
    shutil.rmtree(ctx.work, ignore_errors=True)
    return outcome.value


def _give_back(ctx: JobContext, error: Exception) -> str:
    """Re-queue the job without spending its attempt; its resumable state stays in the work dir."""
    reason = f"infrastructure outage ({type(error).__name__}); re-queued without spending an attempt"
    log.warning("job %s: %s", ctx.claim.job_id, reason)

    def release() -> bool:
        with ctx.session() as s:
            return release_claim(s, ctx.claim, reason)

    # Retried past the lease: the database is down for the sweep too, so once it answers again this
    # release (fenced on the claim) normally lands before any sweep could re-queue the job as lost.
    window = ctx.settings.infra_retry_seconds + ctx.settings.lease_seconds
    if retry_outage(release, window, f"job {ctx.claim.job_id}: give the job back"):
        return "re-queued after an outage"
    return "lease lost during an outage"
