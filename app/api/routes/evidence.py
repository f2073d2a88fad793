"""Evidence of theft: the challenge a suspect is asked, the verdict on its answers (posted, an uploaded
model's, or a remote endpoint's, asked in the background), the stored verifications and their evidence
bundles. The work is `app.services.evidence`; the secret stays server-side until a bundle reveals it."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from app.api.deps import JobsRead
from app.api.evidence_schemas import VerificationOut
from app.api.params import ModelId
from app.api.schemas import ChallengeOut, Commitment, VerifyOut, VerifyRequest
from app.core.models import Verification
from app.services import evidence as ev
from app.services.access import SessionDep, SettingsDep, StoreDep
from app.services.uploaded_models import invalid

router = APIRouter(prefix="/models", tags=["evidence of theft"])


@router.get(
    "/{model_id}/challenge",
    response_model=ChallengeOut,
    summary="The challenge inputs to ask a black-box suspect (without the teacher's labels)",
)
def get_challenge(model_id: ModelId, key: JobsRead, session: SessionDep, store: StoreDep) -> ChallengeOut:
    m = ev.material(session, store, model_id, key)
    return ChallengeOut(
        model=model_id,
        mechanism=m.mechanism,
        points=len(m.challenge.labels),
        input_shape=list(m.meta.input_shape),
        inputs=m.challenge.x.tolist(),
        commitment=Commitment(**m.commitment()),
    )


def _out(row: Verification) -> VerificationOut:
    finished = row.status == "done"
    return VerificationOut(
        id=row.id,
        model=row.model_id,
        kind=row.kind,  # type: ignore[arg-type]
        status=row.status,  # type: ignore[arg-type]
        suspect=row.request,
        result=row.verdict,
        requests=len(row.log or []),
        commitment=Commitment(**row.commitment),
        created_at=row.created_at,
        finished_at=row.finished_at,
        bundle=f"/api/v1/models/{row.model_id}/verifications/{row.id}/bundle" if finished else None,
    )


@router.post(
    "/{model_id}/verify",
    response_model=VerifyOut,
    responses={202: {"model": VerificationOut, "description": "a suspect endpoint is being asked: poll it"}},
    summary="Was a suspect distilled from this model? Test an uploaded model, a black box's answers, or an "
    "endpoint",
)
def verify(
    model_id: ModelId, body: VerifyRequest, key: JobsRead, session: SessionDep, store: StoreDep,
    settings: SettingsDep, request: Request,
) -> VerifyOut | JSONResponse:  # fmt: skip
    given = [x is not None for x in (body.suspect_model_id, body.answers, body.suspect_endpoint)]
    if sum(given) != 1:
        raise invalid(
            "give exactly one of suspect_model_id (an uploaded model), answers (a black box's) and "
            "suspect_endpoint (a model served elsewhere)"
        )
    if body.suspect_endpoint is not None and (why := ev.allowed(settings, body.suspect_endpoint)):
        raise invalid(why)
    m = ev.material(session, store, model_id, key)
    m.null()  # 409 before anything is stored or asked when the audit gives no null
    if body.suspect_endpoint is not None:
        row = request.app.state.verifier.start(session, m, key, body.suspect_endpoint)
        location = f"/api/v1/models/{model_id}/verifications/{row.id}"
        content = _out(row).model_dump(mode="json")
        return JSONResponse(content, status_code=202, headers={"Location": location})
    if body.answers is not None:
        if (why := ev.check_labels(body.answers, m)) is not None:
            raise invalid(why)
        labels, kind, suspect, req = body.answers, "answers", "answers", {"answers": len(body.answers)}
    else:
        assert body.suspect_model_id is not None
        labels = ev.uploaded_suspect_labels(session, store, body.suspect_model_id, key, m)
        kind, suspect = "model", f"uploaded model {body.suspect_model_id}"
        req = {"suspect_model_id": str(body.suspect_model_id)}
    result = ev.decide(m, labels)
    row = ev.record_done(session, m, key, kind, req, labels, result)
    return VerifyOut(
        model=model_id,
        suspect=suspect,
        points=len(m.challenge.labels),
        commitment=Commitment(**m.commitment()),
        verification=row.id,
        **result,
    )


@router.get(
    "/{model_id}/verifications/{verification_id}",
    response_model=VerificationOut,
    summary="A verification: running, done with its verdict, or failed (could not verify) with the reason",
)
def get_verification(
    model_id: ModelId, verification_id: uuid.UUID, key: JobsRead, session: SessionDep, settings: SettingsDep
) -> VerificationOut:
    return _out(ev.verification(session, settings, model_id, verification_id, key))


@router.get(
    "/{model_id}/verifications/{verification_id}/bundle",
    response_class=Response,
    responses={200: {"content": {"application/zip": {}}, "description": "the evidence bundle"}},
    summary="The evidence bundle (zip) with a numpy-only script that re-checks it; retires the challenge",
)
def get_bundle(
    model_id: ModelId, verification_id: uuid.UUID, key: JobsRead, session: SessionDep, store: StoreDep,
    settings: SettingsDep,
) -> Response:  # fmt: skip
    row = ev.verification(session, settings, model_id, verification_id, key)
    data = ev.bundle(session, store, row)
    name = f"cmim-evidence-{model_id}-{verification_id}.zip"
    return Response(
        data, media_type="application/zip", headers={"Content-Disposition": f'attachment; filename="{name}"'}
    )
