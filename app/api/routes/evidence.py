"""Evidence of theft: the challenge a suspect is asked, and the verdict on its answers (or on an uploaded
model). The secret, and the teacher's labels on the challenge, stay server-side (`ml.evidence`)."""

from __future__ import annotations

import json
import uuid
from typing import Any

from fastapi import APIRouter
from sqlalchemy.orm import Session
from torch import Tensor, nn, tensor

from app.api.deps import JobsRead, SessionDep, StoreDep, get_owned
from app.api.job_service import job_artifact, owned_job, report_artifact
from app.api.model_registry import invalid
from app.api.routes.models import ModelId
from app.api.schemas import ChallengeOut, Commitment, VerifyOut, VerifyRequest
from app.core.keys import KeyInfo
from app.core.models import UploadedModel
from app.core.storage import ArtifactStore
from app.problems import Problem
from ml.checkpoint import CONFIG_NAME, ModelMeta, load_checkpoint, load_meta
from ml.evidence import DEFAULT_MECHANISM, Challenge
from ml.evidence.verify import null_from_report, predicted_labels, store_names, unpack_challenge, verdict
from ml.onnx_model import load_onnx

router = APIRouter(prefix="/models", tags=["evidence of theft"])


def _material(session: Session, store: ArtifactStore, model_id: uuid.UUID, key: KeyInfo) -> tuple[
    Challenge, dict[str, Any], ModelMeta
]:  # fmt: skip
    """The job's stored challenge, its report and the teacher's meta; 409 when the job has no evidence."""
    job = owned_job(session, model_id, key)
    report = json.loads(store.read_bytes(report_artifact(session, job).storage_key))
    raw = store.read_named(store_names(str(job.id))[1])
    if raw is None or DEFAULT_MECHANISM not in report.get("evidence", {}).get("mechanisms", {}):
        raise Problem(
            409, f"model {job.id} has no evidence material (its job predates it)", slug="no-evidence"
        )
    meta = load_meta(store.local_path(job_artifact(session, job.id, CONFIG_NAME).storage_key))
    return unpack_challenge(raw), report, meta


@router.get(
    "/{model_id}/challenge",
    response_model=ChallengeOut,
    summary="The challenge inputs to ask a black-box suspect (without the teacher's labels)",
)
def get_challenge(model_id: ModelId, key: JobsRead, session: SessionDep, store: StoreDep) -> ChallengeOut:
    ch, report, meta = _material(session, store, model_id, key)
    return ChallengeOut(
        model=model_id,
        mechanism=DEFAULT_MECHANISM,
        points=len(ch.labels),
        input_shape=list(meta.input_shape),
        inputs=ch.x.tolist(),
        commitment=Commitment(**report["evidence"]["commitment"]),
    )


def _suspect(
    session: Session, store: ArtifactStore, ident: uuid.UUID, key: KeyInfo, meta: ModelMeta
) -> nn.Module:
    """An uploaded model of the caller's, checked to take the teacher's inputs and classes."""
    row = get_owned(session, UploadedModel, ident, key, "model")
    if tuple(row.input_shape) != tuple(meta.input_shape) or row.num_classes != meta.num_classes:
        raise invalid(
            f"the suspect takes {tuple(row.input_shape)} with {row.num_classes} classes; the model answers "
            f"{tuple(meta.input_shape)} with {meta.num_classes}"
        )
    if row.format == "onnx":
        return load_onnx(
            store.read_bytes(row.storage_key), row.output, tuple(meta.input_shape), meta.num_classes
        )[0]
    assert row.config_key is not None, "a stored checkpoint always has its config"
    return load_checkpoint(store.local_path(row.storage_key), store.local_path(row.config_key))[0]


def _answers(answers: list[int], ch: Challenge, classes: int) -> Tensor:
    if len(answers) != len(ch.labels):
        raise invalid(
            f"answers must hold one label per challenge input: {len(ch.labels)}, got {len(answers)}"
        )
    bad = [a for a in answers if not 0 <= a < classes]
    if bad:
        raise invalid(f"answers must be class indices in 0..{classes - 1}; got {bad[0]}")
    return tensor(answers)


@router.post(
    "/{model_id}/verify",
    response_model=VerifyOut,
    summary="Was a suspect distilled from this model? Test an uploaded model or a black box's answers",
)
def verify(
    model_id: ModelId, body: VerifyRequest, key: JobsRead, session: SessionDep, store: StoreDep
) -> VerifyOut:
    if (body.suspect_model_id is None) == (body.answers is None):
        raise invalid("give exactly one of suspect_model_id (an uploaded model) and answers (a black box's)")
    ch, report, meta = _material(session, store, model_id, key)
    if body.answers is not None:
        predicted, suspect = _answers(body.answers, ch, meta.num_classes), "answers"
    else:
        assert body.suspect_model_id is not None
        model = _suspect(session, store, body.suspect_model_id, key, meta)
        predicted, suspect = predicted_labels(model, ch), f"uploaded model {body.suspect_model_id}"
    try:
        null, fpr = null_from_report(report, DEFAULT_MECHANISM)
    except ValueError as e:
        raise Problem(409, f"model {model_id}: {e} (more seeds or LS rows)", slug="no-evidence") from None
    out = verdict(ch, predicted, null, fpr)
    commitment = Commitment(**report["evidence"]["commitment"])
    return VerifyOut(
        model=model_id,
        suspect=suspect,
        mechanism=DEFAULT_MECHANISM,
        points=len(ch.labels),
        commitment=commitment,
        **out,
    )
