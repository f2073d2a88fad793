"""run_job(job_id): claim -> train teacher (and CE control) -> audit -> publish; events, cancel, resume.

Published: the teacher's checkpoint, the report and, when the job's audit has a serving policy, that
policy fitted to the teacher (the predict endpoints serve the model through it, as it was audited).

The same function runs under Celery and in the embedded local worker. The audit is a plan of tasks
(`ml.audit`): the embedded worker runs them in process; under Celery `run_job` stores the teacher and
control and hands the tasks to `fan_out` (a chord over the workers, `worker/fanout.py`). Either way
every task's result is stored under its key, so a job re-claimed mid-audit redoes only unfinished
tasks. Every write is fenced on the claim (worker id + attempt), so a worker that lost its lease can
never publish over a newer attempt.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, TypeVar

from safetensors.torch import save_file
from sqlalchemy.orm import Session

from app.core.config import Settings, get_settings
from app.core.db import session_scope
from app.core.models import (
    MONITOR_NAME,
    POLICY_CONFIG_NAME,
    POLICY_NAME,
    REPORT_NAME,
    Artifact,
    Dataset,
    Job,
    JobStatus,
    UploadedModel,
)
from app.core.outage import is_outage, retry_outage
from app.core.queue import (
    Claim,
    LeaseLost,
    append_event,
    claim_job,
    mark_handed_off,
    release_claim,
    renew_lease,
    transition,
)
from app.core.storage import ArtifactStore, StoredObject
from ml.audit import (
    AuditConfig,
    AuditPlan,
    AuditProgress,
    AuditResult,
    assemble,
    findings,
    plan,
    run_in_process,
)
from ml.checkpoint import ModelMeta, load_checkpoint, save_checkpoint
from ml.data import Dataset as Data
from ml.data import load_dataset
from ml.evidence import DEFAULT_MECHANISM, Secret
from ml.evidence.verify import pack_challenge, store_names
from ml.monitor import MonitorConfig, calibrate
from ml.onnx_model import ONNX_ARCH, ONNX_NAME, load_onnx
from ml.policy import KEYED_NOT_SERVED
from ml.train import EpochReport, TrainConfig, TrainingCancelled, TrainResult, check_fits, train_model
from worker.results import Handoff, StoreResults

log = logging.getLogger(__name__)

FileRow = tuple[str, str, str, StoredObject]  # (name, kind, media type, stored object) of an artifact
FanOut = Callable[[Handoff], None]
PROGRESS_EVERY_S = 2.0  # audit progress: at most one event (and lease renewal) per this many seconds
T = TypeVar("T")


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class JobContext:
    """What the running stages need: settings, the claim, the fenced progress hooks and the heartbeat.

    The heartbeat thread renews the lease every `heartbeat_seconds` whatever an epoch takes, so a slow
    but live job is never taken over, while a dead worker's lease runs out within `lease_seconds`.
    """

    def __init__(self, settings: Settings, claim: Claim) -> None:
        self.settings, self.claim = settings, claim
        self.work = Path(settings.work_dir) / str(claim.job_id)
        self._last_progress = 0.0
        self._stop = threading.Event()
        self._lost = self._cancel = False
        self._beat = threading.Thread(target=self._heartbeat_loop, name="cmim-heartbeat", daemon=True)

    def __enter__(self) -> JobContext:
        self._beat.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._beat.join()

    def session(self) -> AbstractContextManager[Session]:
        return session_scope(self.settings.database_url)

    def retrying(self, fn: Callable[[], T], what: str) -> T:
        """fn() retried through database outages for up to `infra_retry_seconds`."""
        return retry_outage(fn, self.settings.infra_retry_seconds, f"job {self.claim.job_id}: {what}")

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_seconds):
            try:
                with self.session() as s:
                    self._cancel = renew_lease(s, self.claim, self.settings.lease_seconds) or self._cancel
            except LeaseLost:
                self._lost = True
                return
            except Exception as e:  # noqa: BLE001 - an outage is retried at the next beat
                log.warning("job %s: heartbeat failed (%s: %s)", self.claim.job_id, type(e).__name__, e)

    def _checkpoint(self, kind: str, data: dict[str, Any]) -> None:
        """An event and a renewed lease; raises LeaseLost or TrainingCancelled as the job's row says."""
        if self._lost:
            raise LeaseLost(f"job {self.claim.job_id}: lease of attempt {self.claim.attempt} is gone")

        def write() -> bool:
            with self.session() as s:
                append_event(s, self.claim.job_id, kind, data | {"attempt": self.claim.attempt})
                return renew_lease(s, self.claim, self.settings.lease_seconds)

        if self.retrying(write, kind) or self._cancel:
            raise TrainingCancelled(f"job {self.claim.job_id}: cancellation requested")

    def check(self) -> None:
        """Renew the lease now; raises LeaseLost or TrainingCancelled as the job's row says."""

        def write() -> bool:
            with self.session() as s:
                return renew_lease(s, self.claim, self.settings.lease_seconds)

        if self.retrying(write, "renew the lease") or self._cancel:
            raise TrainingCancelled(f"job {self.claim.job_id}: cancellation requested")

    def on_epoch(self, report: EpochReport) -> None:
        """Per epoch: an event, a renewed lease, and the cancel check (TrainingCancelled stops training)."""
        self._checkpoint("epoch", report.model_dump(mode="json"))

    def on_progress(self, p: AuditProgress) -> None:
        now = time.monotonic()
        if now - self._last_progress < PROGRESS_EVERY_S and p.done < p.total:
            return
        self._last_progress = now
        self._checkpoint("progress", p.model_dump(mode="json"))

    def set_status(self, status: JobStatus, **extra: Any) -> None:
        def write() -> None:
            with self.session() as s:
                transition(s, self.claim, status, **extra)

        self.retrying(write, f"set {status.value}")


def _load_data(settings: Settings, store: ArtifactStore, job: Job, teacher: TrainConfig) -> Data:
    if job.dataset_id is None:
        return load_dataset(teacher.dataset, **teacher.dataset_params)
    with session_scope(settings.database_url) as s:
        upload = s.get(Dataset, job.dataset_id)
        assert upload is not None, "uploaded datasets are never deleted while a job uses them"
        key = upload.storage_key
    return load_dataset(teacher.dataset, path=str(store.local_path(key)))


def _train(ctx: JobContext, cfg: TrainConfig, data: Data, stage: str, **init: Any) -> TrainResult:
    # The state file makes training resumable: a re-claimed job continues from its last finished epoch.
    return train_model(
        cfg, data, on_epoch=ctx.on_epoch, state_path=ctx.work / f"{stage}_state.pt", stage=stage, **init
    )


def _uploaded_teacher(
    ctx: JobContext, store: ArtifactStore, model_id: str, fine_tune: bool, cfg: TrainConfig, data: Data
) -> tuple[Any, ModelMeta, list[tuple[str, str, str, StoredObject]]]:
    """An owner's uploaded model as the job's teacher: (model, meta, its published files).

    ONNX is audited as it is and published as model.onnx + model.json; a zoo checkpoint is audited as it
    is or CMIM fine-tuned first (its accuracy before and after in meta.metrics["fine_tune"])."""
    with ctx.session() as s:
        row = s.get(UploadedModel, uuid.UUID(model_id))
        assert row is not None, "uploaded models are never deleted while a job uses them"
        s.expunge(row)
    if row.format == "onnx":
        model, _ = load_onnx(
            store.read_bytes(row.storage_key), row.output, tuple(data.input_shape), data.num_classes
        )
        meta = ModelMeta(
            arch=ONNX_ARCH,
            input_shape=tuple(row.input_shape),
            num_classes=row.num_classes,
            class_names=list(row.class_names),
            output=row.output,
            dataset=data.name,
            dataset_fingerprint=data.fingerprint,
        )
        config = ctx.work / "model.json"
        config.write_text(meta.model_dump_json(indent=2))
        files = [
            (
                ONNX_NAME,
                "weights",
                "application/onnx",
                StoredObject(row.storage_key, row.sha256, row.size_bytes),
            ),
            (config.name, "config", "application/json", store.put_file(config)),
        ]
        return model, meta, files
    weights, config = store.local_path(row.storage_key), store.local_path(row.config_key)
    model, meta = load_checkpoint(weights, config)
    check_fits(meta, data)
    if fine_tune:
        result = _train(ctx, cfg, data, "teacher", init_weights=weights, init_meta=meta)
        model, meta = result.model, result.meta
        warning = meta.metrics["fine_tune"]["warning"]
        if warning:
            with ctx.session() as s:
                append_event(s, ctx.claim.job_id, "warning", {"stage": "teacher", "message": warning})
    saved = save_checkpoint(model, meta, ctx.work / "checkpoint")
    files = [
        (saved[0].name, "weights", "application/octet-stream", store.put_file(saved[0])),
        (saved[1].name, "config", "application/json", store.put_file(saved[1])),
    ]
    return model, meta, files


def _publish(
    ctx: JobContext, files: list[tuple[str, str, str, StoredObject]], summary: dict[str, Any]
) -> None:
    """Artifact rows and `succeeded` in one fenced transaction: exactly one report per job."""
    ctx.retrying(lambda: _publish_once(ctx, files, summary), "publish")


def headline(report: dict[str, Any]) -> dict[str, Any]:
    """What the job list shows of a report, recorded on the `succeeded` event: verdict, teacher accuracy and
    the served model's per-key safe budget (the smallest over the audited students)."""
    safe = (report.get("safe_budget") or {}).get("teacher") or {}
    return {
        "verdict": report.get("verdict"),
        "teacher_accuracy": (report.get("teacher") or {}).get("accuracy"),
        "safe_budget": min(safe.values()) if safe else None,
    }


def _publish_once(
    ctx: JobContext, files: list[tuple[str, str, str, StoredObject]], summary: dict[str, Any]
) -> None:
    with ctx.session() as s:
        owner_id = s.get(Job, ctx.claim.job_id).owner_id
        for name, kind, media_type, obj in files:
            s.add(
                Artifact(
                    owner_id=owner_id,
                    job_id=ctx.claim.job_id,
                    name=name,
                    kind=kind,
                    media_type=media_type,
                    sha256=obj.sha256,
                    size_bytes=obj.size,
                    storage_key=obj.key,
                )
            )
        transition(s, ctx.claim, JobStatus.succeeded, **summary)


def _policy_files(store: ArtifactStore, result: AuditResult, directory: Path) -> list[FileRow]:
    """The serving policy the audit fitted to the published teacher and served it through (none: no files).

    Centroids on the train split, a per-query detector's threshold on the first half of the test
    split (`ml.audit.serve_box`); stored as safetensors (`FittedPolicy.to_tensors`) plus its config.
    """
    fitted = result.policy
    if fitted is None:
        return []
    directory.mkdir(parents=True, exist_ok=True)
    tensors, config = directory / POLICY_NAME, directory / POLICY_CONFIG_NAME
    save_file(
        fitted.to_tensors(), str(tensors), metadata={"format": "pt", "detector": fitted.config.detector}
    )
    config.write_text(fitted.config.model_dump_json(indent=2))
    return [
        (POLICY_NAME, "policy", "application/octet-stream", store.put_file(tensors)),
        (POLICY_CONFIG_NAME, "policy_config", "application/json", store.put_file(config)),
    ]


def _monitor_file(
    store: ArtifactStore, data: Data, directory: Path, seed: int
) -> tuple[FileRow, dict[str, Any]]:
    """The extraction monitor calibrated on the test split (`ml.monitor.calibrate`), and its report entry."""
    ref = calibrate(data.x_test, MonitorConfig(), seed)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / MONITOR_NAME
    path.write_text(json.dumps(ref.to_json(), indent=1))
    return (MONITOR_NAME, "monitor", "application/json", store.put_file(path)), ref.to_json()


def _read_job(ctx: JobContext) -> Job:
    with ctx.session() as s:
        job = s.get(Job, ctx.claim.job_id)
        s.expunge(job)
    return job


def _inputs(ctx: JobContext, store: ArtifactStore) -> tuple[Job, TrainConfig, AuditConfig, Data]:
    """The job's row, its teacher and audit configs, and its prepared data."""
    settings = ctx.settings
    job = ctx.retrying(lambda: _read_job(ctx), "read the job")
    spec = {k: v for k, v in job.spec["teacher"].items() if k not in ("model_id", "fine_tune")}
    teacher_cfg = TrainConfig.model_validate(spec | {"device": settings.device})
    audit_cfg = AuditConfig.model_validate(job.spec["audit"] | {"device": settings.device})
    raw = ctx.retrying(lambda: _load_data(settings, store, job, teacher_cfg), "load the data")
    return job, teacher_cfg, audit_cfg, teacher_cfg.prepare(raw)


def _stored_model(store: ArtifactStore, weights: str, config: str, data: Data) -> Any:
    """A teacher or control the job stored: a zoo checkpoint, or an ONNX black box."""
    meta = ModelMeta.model_validate_json(store.read_bytes(config))
    if meta.arch == ONNX_ARCH:
        return load_onnx(store.read_bytes(weights), meta.output, tuple(data.input_shape), data.num_classes)[0]
    return load_checkpoint(store.local_path(weights), store.local_path(config))[0]


_plans: dict[tuple[uuid.UUID, int], AuditPlan] = {}  # this process's last plan: it runs many tasks of a job


def audit_plan(ctx: JobContext, store: ArtifactStore, handoff: Handoff) -> AuditPlan:
    """The job's audit plan rebuilt from what run_job stored: the same plan on every worker."""
    key = (ctx.claim.job_id, ctx.claim.attempt)
    if key not in _plans:
        handed = StoreResults(store, ctx.claim.job_id).load_data() if handoff.get("data") else None
        data = handed if handed is not None else _inputs(ctx, store)[3]
        source = "the data the job handed over" if handed is not None else "data loaded again"
        log.info("job %s: audit plan rebuilt from %s", ctx.claim.job_id, source)
        teacher = _stored_model(store, *handoff["teacher"], data)
        control = None if handoff["control"] is None else _stored_model(store, *handoff["control"], data)
        cfg, secret = AuditConfig.model_validate(handoff["audit_config"]), evidence_secret(store, ctx)
        _keep_plan(key, plan(cfg, teacher, data, control=control, secret=secret))
    return _plans[key]


def evidence_secret(store: ArtifactStore, ctx: JobContext) -> Secret:
    """The job's evidence secret: made (and committed to) the first time, then read back on every worker
    and attempt. Kept as a named object, never as an artifact: no route serves it."""
    name = store_names(str(ctx.claim.job_id))[0]
    raw = ctx.retrying(lambda: store.read_named(name), "read the evidence secret")
    if raw is not None:
        return Secret.from_json(json.loads(raw))
    secret = Secret.new()
    ctx.retrying(lambda: store.write_named(name, json.dumps(secret.to_json()).encode()), "store the secret")
    return secret


def _store_challenge(store: ArtifactStore, ctx: JobContext, p: AuditPlan) -> None:
    """What verification needs besides the report: the default mechanism's challenge for the teacher."""
    data = pack_challenge(p.challenges[DEFAULT_MECHANISM]["teacher"][0])
    name = store_names(str(ctx.claim.job_id))[1]
    ctx.retrying(lambda: store.write_named(name, data), "store the evidence challenge")


def _keep_plan(key: tuple[uuid.UUID, int], p: AuditPlan) -> None:
    _plans.clear()
    _plans[key] = p


def publish_audit(
    ctx: JobContext, store: ArtifactStore, result: AuditResult, files: list[FileRow], extra: dict[str, Any]
) -> None:
    """Store the report (with the job's additions) and the fitted policy; publish them with `files`."""
    report = result.report
    report["job_id"] = str(ctx.claim.job_id)
    report["teacher"] = report["teacher"] | extra["teacher"]
    report |= {k: v for k, v in extra.items() if k != "teacher"}
    report["findings"] = findings(report, report.get("job"))  # the job's preset marks an audit indicative
    files = [
        *files,
        (REPORT_NAME, "report", "application/json", store.put_bytes(json.dumps(report, indent=1).encode())),
        *_policy_files(store, result, ctx.work / "policy"),
    ]
    _publish(ctx, files, headline(report))


def _execute(ctx: JobContext, fan_out: FanOut | None = None) -> bool:
    """Train, audit and publish; False when the audit was handed to `fan_out` (its callback publishes)."""
    store = ArtifactStore.from_settings(ctx.settings)
    ctx.work.mkdir(parents=True, exist_ok=True)
    job, teacher_cfg, audit_cfg, data = _inputs(ctx, store)
    if audit_cfg.policy.keyed_fraction > 0:
        # the key would have to be served beside the model (policy.safetensors is a downloadable artifact)
        raise ValueError(KEYED_NOT_SERVED)
    model_id, fine_tune = job.spec["teacher"].get("model_id"), job.spec["teacher"].get("fine_tune", False)

    if model_id is None:
        trained = _train(ctx, teacher_cfg, data, "teacher")
        model, meta = trained.model, trained.meta
        weights, config = save_checkpoint(model, meta, ctx.work / "checkpoint")
        files = [
            (weights.name, "weights", "application/octet-stream", store.put_file(weights)),
            (config.name, "config", "application/json", store.put_file(config)),
        ]
    else:
        model, meta, files = _uploaded_teacher(ctx, store, model_id, fine_tune, teacher_cfg, data)
    control = None
    if audit_cfg.control:
        arch = audit_cfg.control_arch or teacher_cfg.arch
        audit_cfg = audit_cfg.model_copy(update={"control_arch": arch})
        update: dict[str, Any] = {"objective": "ce", "objective_params": {}, "arch": arch}
        if model_id is not None:  # the control is trained from scratch: the default rate, no warm-up
            update |= {"lr": TrainConfig().lr, "warmup_epochs": 0.0}
        control = _train(ctx, teacher_cfg.model_copy(update=update), data, "control")

    ctx.set_status(JobStatus.auditing)
    monitor_file, monitor = _monitor_file(store, data, ctx.work, teacher_cfg.seed)
    files.append(monitor_file)
    extra: dict[str, Any] = {"teacher": {"meta": meta.model_dump(mode="json")}, "monitor": monitor}
    extra["job"] = {k: job.spec[k] for k in ("preset", "indicative") if k in job.spec}
    if model_id is not None:
        extra["teacher"]["uploaded_model_id"] = model_id
    if "fine_tune" in meta.metrics:
        extra["fine_tune"] = meta.metrics["fine_tune"]
    # A job re-claimed in this stage gets its teacher and control back from their finished state
    # files and its finished audit tasks back from the store: only unfinished tasks run again.
    results = StoreResults(store, ctx.claim.job_id)
    p = plan(
        audit_cfg,
        model,
        data,
        control=None if control is None else control.model,
        secret=evidence_secret(store, ctx),
    )
    _store_challenge(store, ctx, p)
    _keep_plan((ctx.claim.job_id, ctx.claim.attempt), p)  # this worker's tasks of the job need not rebuild it
    if fan_out is None:
        result = assemble(p, run_in_process(p, on_progress=ctx.on_progress, results=results))
        publish_audit(ctx, store, result, files, extra)
        results.clear()  # the report holds them now
        return True
    stored = None
    if control is not None:
        weights, config = save_checkpoint(control.model, control.meta, ctx.work / "control_checkpoint")
        stored = [store.put_file(weights).key, store.put_file(config).key]
    handoff: Handoff = {
        "job_id": str(ctx.claim.job_id),
        "worker_id": ctx.claim.worker_id,
        "attempt": ctx.claim.attempt,
        "audit_config": audit_cfg.model_dump(mode="json"),
        "teacher": [files[0][3].key, files[1][3].key],
        "control": stored,
        "files": [[name, kind, media, obj.key, obj.sha256, obj.size] for name, kind, media, obj in files],
        "extra": extra,
        "tasks": len(p.tasks),
        "data": ctx.retrying(lambda: results.save_data(data), "store the prepared data"),
    }
    _hand_off(ctx, results, handoff, fan_out)
    return False


def _hand_off(ctx: JobContext, results: StoreResults, handoff: Handoff, fan_out: FanOut) -> None:
    """The audit to `fan_out`, kept in the store and marked on the job first: from then on the sweep keeps
    the job's claim while the audit's messages wait in the broker, and sends the audit again from the
    stored hand-off if the broker loses them (`app.core.queue.settle_audits`)."""
    ctx.retrying(lambda: results.save_handoff(handoff), "store the hand-off")

    def mark() -> None:
        with ctx.session() as s:
            mark_handed_off(s, ctx.claim, ctx.settings.lease_seconds)

    ctx.retrying(mark, "record the hand-off")
    fan_out(handoff)


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


def finish(ctx: JobContext, status: JobStatus, error: str | None = None) -> JobStatus:
    """Record a final status, unless the claim is gone (then a newer attempt owns the job)."""
    try:
        ctx.set_status(status, error=error)
    except LeaseLost:
        log.warning("job %s: lease lost before recording %s", ctx.claim.job_id, status.value)
    return status
