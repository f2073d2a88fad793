"""Publishing a job: the report, the teacher's files, the fitted serving policy, the extraction monitor and
what serving needs (`serving.json`, `ml.served.ServedSpec`), as artifact rows written with `succeeded` in
one transaction fenced on the claim: exactly one report per job.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from app.core.models import (
    MONITOR_NAME,
    POLICY_CONFIG_NAME,
    POLICY_NAME,
    REPORT_NAME,
    SERVING_NAME,
    Artifact,
    Job,
    JobStatus,
)
from app.core.queue import transition
from app.core.storage import ArtifactStore
from ml.audit import AuditReport
from ml.data import Dataset as Data
from ml.evidence.verify import pack_challenge, selected_challenge, selected_names, unpack_challenge
from ml.monitor import MonitorConfig, calibrate
from ml.policy import FittedPolicy
from ml.served import served_spec
from worker.lease import JobContext
from worker.models import FileRow


def policy_files(store: ArtifactStore, fitted: FittedPolicy | None, directory: Path) -> list[FileRow]:
    """The serving policy the audit fitted to the published teacher and served it through (none: no files).

    Centroids on the train split, a per-query detector's threshold on the first half of the test
    split (`ml.audit.serve_box`); stored as safetensors (`FittedPolicy.to_tensors`) plus its config.
    """
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


def monitor_file(
    store: ArtifactStore, data: Data, directory: Path, seed: int
) -> tuple[FileRow, dict[str, Any]]:
    """The extraction monitor calibrated on the test split (`ml.monitor.calibrate`), and its report entry."""
    ref = calibrate(data.x_test, MonitorConfig(), seed)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / MONITOR_NAME
    path.write_text(json.dumps(ref.to_json(), indent=1))
    return (MONITOR_NAME, "monitor", "application/json", store.put_file(path)), ref.to_json()


def with_job(report: AuditReport, job_id: str, extra: dict[str, Any]) -> AuditReport:
    """The report with what the job adds: its id, the teacher's metadata, the monitor and the fine-tuning."""
    report.job_id = job_id
    for k, v in extra.get("teacher", {}).items():
        setattr(report.teacher, k, v)
    for k, v in extra.items():
        if k != "teacher":
            setattr(report, k, v)
    return report


def publish_audit(
    ctx: JobContext,
    store: ArtifactStore,
    report: AuditReport,
    files: list[FileRow],
    job_spec: dict[str, Any],
) -> None:
    """Store the report and what serving needs; publish them with `files` and mark the job succeeded."""
    store_selected(ctx, store, report.to_json())
    serving = served_spec(job_spec, report).model_dump_json(indent=1)
    files = [
        *files,
        (
            REPORT_NAME,
            "report",
            "application/json",
            store.put_bytes(json.dumps(report.to_json(), indent=1).encode()),
        ),
        (SERVING_NAME, "serving", "application/json", store.put_bytes(serving.encode())),
    ]
    headline = report.job_headline().model_dump()
    ctx.retrying(lambda: _publish_once(ctx, files, headline), "publish")


def store_selected(ctx: JobContext, store: ArtifactStore, report: dict[str, Any]) -> None:
    """The selected challenge verify uses (the pool's points the audit kept, with the teacher's labels),
    written before the job is published, hence before any suspect exists; nothing when the report says
    the fingerprint is used (`ml.evidence.verify.chosen_section`)."""
    pool_name, name = selected_names(str(ctx.claim.job_id))
    raw = ctx.retrying(lambda: store.read_named(pool_name), "read the selected challenge's pool")
    chosen = None if raw is None else selected_challenge(report, unpack_challenge(raw))
    if chosen is not None:
        data = pack_challenge(chosen)
        ctx.retrying(lambda: store.write_named(name, data), "store the selected challenge")


def _publish_once(ctx: JobContext, files: list[FileRow], summary: dict[str, Any]) -> None:
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
