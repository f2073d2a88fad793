"""Serving a job's teacher: KServe Open Inference Protocol v2, and a simple JSON predict route.

The model id is the job id. Answers follow the output mode and the serving policy the job was audited
with (`ml.policy.serve`: a policy can refuse a query, alter its answer, or snap it to its class
centroid); every input row counts against the query budget that applies (the key's own, or the
model's per-key budget when smaller); requests count against the key's rate limit.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request, Response
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.api.deps import Predict, SessionDep, SettingsDep, StoreDep
from app.api.inference import ServedModel, as_batch, budget_for, charge
from app.api.job_service import owned_job
from app.api.schemas import (
    InferOutput,
    InferRequest,
    InferResponse,
    ModelMetadata,
    ModelReady,
    Prediction,
    PredictRequest,
    PredictResponse,
    TensorMeta,
)
from app.core.models import ApiKey
from app.core.storage import ArtifactStore
from ml.policy import Served

v2 = APIRouter(prefix="/v2/models", tags=["inference (KServe v2)"])
simple = APIRouter(prefix="/models", tags=["inference"])
ModelId = Annotated[uuid.UUID, Path(description="the model's id: the id of the job that trained it")]


def _served(
    request: Request, session: Session, store: ArtifactStore, model_id: uuid.UUID, key: ApiKey
) -> ServedModel:
    job = owned_job(session, model_id, key)
    return request.app.state.models.get(session, store, job)


@v2.get("/{model_id}", response_model=ModelMetadata, summary="Model metadata")
def metadata(
    model_id: ModelId, request: Request, key: Predict, session: SessionDep, store: StoreDep
) -> ModelMetadata:
    served = _served(request, session, store, model_id, key)
    meta = served.meta
    budget = budget_for(key, served, request.app.state.settings.model_query_budget)
    outputs = [
        TensorMeta(name="probabilities", datatype="FP32", shape=[-1, meta.num_classes]),
        TensorMeta(name="label", datatype="INT64", shape=[-1]),
    ]
    if served.policy is not None:
        outputs.append(TensorMeta(name="refused", datatype="BOOL", shape=[-1]))
    return ModelMetadata(
        name=str(model_id),
        versions=["1"],
        platform="pytorch_safetensors",
        inputs=[TensorMeta(name="input", datatype="FP32", shape=[-1, *meta.input_shape])],
        outputs=outputs,
        parameters={
            "output_mode": served.mode.model_dump(),
            "policy": _policy(served),
            "query_budget": budget.describe(key.queries_used),
            "class_names": meta.class_names,
            "arch": meta.arch,
        },
    )


@v2.get("/{model_id}/ready", response_model=ModelReady, summary="200 when the model can answer")
def ready(
    model_id: ModelId, request: Request, key: Predict, session: SessionDep, store: StoreDep
) -> ModelReady:
    _served(request, session, store, model_id, key)
    return ModelReady(name=str(model_id), ready=True)


async def _answer(
    request: Request,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    key: ApiKey,
    model_id: uuid.UUID,
    values: object,
    shape: list[int] | None,
    loc: list,
) -> tuple[ServedModel, Served]:
    served = await run_in_threadpool(_served, request, session, store, model_id, key)
    x = as_batch(values, shape, served.meta, settings.predict_max_batch, loc)
    budget = budget_for(key, served, settings.model_query_budget)
    headers = await run_in_threadpool(
        charge,
        session,
        request.app.state.rate_limiter,
        key,
        int(x.shape[0]),
        settings.rate_limit_per_minute,
        budget,
    )
    response.headers.update(headers)
    history = request.app.state.histories.get(key.id, served)
    return served, await run_in_threadpool(served.serve, x, history)


def _policy(served: ServedModel) -> dict[str, Any] | None:
    """The serving policy's config as reported to clients (its fitted threshold stays private)."""
    return None if served.policy is None else served.policy.config.model_dump()


@v2.post("/{model_id}/infer", response_model=InferResponse, summary="Inference (Open Inference Protocol v2)")
async def infer(
    model_id: ModelId,
    body: InferRequest,
    request: Request,
    response: Response,
    key: Predict,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
) -> InferResponse:
    tensor = body.inputs[0]
    served, out = await _answer(
        request,
        response,
        session,
        settings,
        store,
        key,
        model_id,
        tensor.data,
        tensor.shape,
        ["body", "inputs", 0, "data"],
    )
    n, c = out.answer.shape
    labels = out.answer.argmax(-1).masked_fill(out.refused, -1)
    outputs = [
        InferOutput(name="probabilities", shape=[n, c], datatype="FP32", data=out.answer.flatten().tolist()),
        InferOutput(name="label", shape=[n], datatype="INT64", data=labels.tolist()),
    ]
    if served.policy is not None:
        outputs.append(InferOutput(name="refused", shape=[n], datatype="BOOL", data=out.refused.tolist()))
    return InferResponse(model_name=str(model_id), model_version="1", id=body.id, outputs=outputs)


@simple.post("/{model_id}/predict", response_model=PredictResponse, summary="Predict (simple JSON)")
async def predict(
    model_id: ModelId,
    body: PredictRequest,
    request: Request,
    response: Response,
    key: Predict,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
) -> PredictResponse:
    served, out = await _answer(
        request, response, session, settings, store, key, model_id, body.inputs, None, ["body", "inputs"]
    )
    names = served.meta.class_names
    rows = zip(out.answer.argmax(-1).tolist(), out.answer.tolist(), out.refused.tolist(), strict=True)
    return PredictResponse(
        model=model_id,
        output_mode=served.mode.model_dump(),
        policy=_policy(served),
        predictions=[
            Prediction(label=None, class_name=None, scores=None, refused=True)
            if refused
            else Prediction(label=y, class_name=names[y], scores=s)
            for y, s, refused in rows
        ],
    )
