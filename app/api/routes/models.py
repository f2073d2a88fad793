"""Serving a model: KServe Open Inference Protocol v2 (JSON and binary tensors), and a simple JSON route.

Answers follow the output mode and the serving policy the model was audited with (`ml.policy.serve`: a
policy can refuse a query, alter its answer, or snap it to its class centroid). Every request counts
against its key's rate limit, and its rows against the key's budget on the model, the owner's and the
global one (`app.core.limits`), reserved before the model answers. The hot path reads no database: the
key, the model and the counters are cached or live in Redis.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

import numpy as np
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema

from app.api.deps import BEARER_DOC, PREDICT_SCOPES, Predict, authenticate, bearer_token
from app.api.model_router import router
from app.api.params import ModelId
from app.api.schemas import (
    InferInput,
    InferRequest,
    InferResponse,
    ModelMetadata,
    ModelReady,
    PredictRequest,
    PredictResponse,
)
from app.problems import validation_problem
from app.services.inputs import as_batch, check_datatype
from app.services.predictor import Predictor
from app.services.serving import ServedModel
from app.services.uploads import capped, read_capped
from ml.served import Served

v2 = APIRouter(prefix="/v2/models", tags=["inference (KServe v2)"])
BINARY_HEADER = "inference-header-content-length"
WIRE = {"FP32": "<f4", "INT64": "<i8", "BOOL": "?"}
M = TypeVar("M", bound=BaseModel)


def _body_doc(model: type[BaseModel], binary: bool) -> dict[str, Any]:
    """The OpenAPI request body of a route that parses its body itself (see `document_bodies`)."""
    content: dict[str, Any] = {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}
    }
    if binary:
        content["application/octet-stream"] = {
            "schema": {"type": "string", "format": "binary"},
            "description": f"binary tensor extension: JSON header of `{BINARY_HEADER}` bytes, then the data",
        }
    return {"requestBody": {"required": True, "content": content}} | BEARER_DOC


def document_bodies(spec: dict[str, Any]) -> None:
    """Add the bodies these routes parse themselves to the OpenAPI components (FastAPI sees no parameter)."""
    _, top = models_json_schema(
        [(InferRequest, "validation"), (PredictRequest, "validation")],
        ref_template="#/components/schemas/{model}",
    )
    spec.setdefault("components", {}).setdefault("schemas", {}).update(top["$defs"])


async def _read(request: Request) -> bytes:
    """The request body, refused with 413 as soon as it exceeds CMIM_PREDICT_MAX_BYTES."""
    cap = request.app.state.settings.predict_max_bytes
    return await read_capped(capped(request.stream(), cap, None, "request body", "CMIM_PREDICT_MAX_BYTES"))


def _parse(model: type[M], raw: bytes) -> M:
    """The body parsed as JSON whatever its Content-Type (standard v2 clients send none); 422 otherwise."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        errors = [
            {"loc": ["body", *e_["loc"]], "msg": e_["msg"], "type": e_["type"]}
            for e_ in e.errors(include_url=False, include_input=False)
        ]
        if not raw.strip():
            errors = [{"loc": ["body"], "msg": "the body is empty: send a JSON object", "type": "missing"}]
        # A bad number fails every branch of the nested-list union: name the first cause once.
        raise validation_problem(errors[:1] if len(errors) > 1 else errors) from None


def _json(body: dict[str, Any], headers: dict[str, str]) -> Response:
    return Response(json.dumps(body), media_type="application/json", headers=headers)


@v2.get("/{model_id}", response_model=ModelMetadata, summary="Model metadata")
async def metadata(model_id: ModelId, request: Request, key: Predict) -> ModelMetadata:
    return ModelMetadata.model_validate(await request.app.state.predictor.metadata(key, model_id))


@v2.get("/{model_id}/ready", response_model=ModelReady, summary="200 when the model can answer")
async def ready(model_id: ModelId, request: Request, key: Predict) -> ModelReady:
    await request.app.state.predictor.served(model_id, key)
    return ModelReady(name=str(model_id), ready=True)


def _split_binary(request: Request, raw: bytes) -> tuple[bytes, bytes]:
    """(JSON header, binary tail) of a body; the whole body is JSON without the binary extension header."""
    size = request.headers.get(BINARY_HEADER)
    if size is None:
        return raw, b""
    if not size.isdigit() or int(size) > len(raw):
        error = {"loc": ["header", BINARY_HEADER], "msg": f"not a length within the body: {size!r}"}
        raise validation_problem([error | {"type": "value_error"}])
    return raw[: int(size)], raw[int(size) :]


def _input_values(tensor: InferInput, tail: bytes, loc: list) -> Any:
    """The input's values: its JSON `data`, or the binary tail its `binary_data_size` announces."""
    size = tensor.parameters.get("binary_data_size")
    if size is None:
        if tensor.data is None:
            raise validation_problem(
                [{"loc": loc, "msg": "give data, or binary_data_size", "type": "missing"}]
            )
        return tensor.data
    if not isinstance(size, int) or isinstance(size, bool) or size != len(tail):
        msg = f"binary_data_size {size!r} but {len(tail)} bytes follow"
        raise validation_problem([{"loc": loc, "msg": msg, "type": "value_error"}])
    return tail


def _outputs(
    out: Served, served: ServedModel, wanted: dict[str, bool], all_binary: bool
) -> tuple[list[dict[str, Any]], list[bytes]]:
    """The v2 outputs asked for (all when none is named), each as JSON data or as binary data."""
    n, c = out.answer.shape
    tensors = {
        "probabilities": ("FP32", [n, c], out.answer.numpy()),
        "label": ("INT64", [n], out.answer.argmax(-1).masked_fill(out.refused, -1).numpy()),
    }
    if served.policy is not None:
        tensors["refused"] = ("BOOL", [n], out.refused.numpy())
    outputs, blobs = [], []
    for name, (datatype, shape, arr) in tensors.items():
        if wanted and name not in wanted:
            continue
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
        if wanted.get(name) or all_binary:
            blob = np.ascontiguousarray(arr, dtype=WIRE[datatype]).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = arr.ravel().tolist()
        outputs.append(entry)
    return outputs, blobs


@v2.post(
    "/{model_id}/infer",
    response_model=InferResponse,
    summary="Inference (Open Inference Protocol v2, JSON or binary tensors)",
    openapi_extra=_body_doc(InferRequest, binary=True),
)
async def infer(model_id: ModelId, request: Request) -> Response:
    key = await authenticate(request, bearer_token(request), PREDICT_SCOPES)
    header, tail = _split_binary(request, await _read(request))
    body = _parse(InferRequest, header)
    predictor: Predictor = request.app.state.predictor
    served = await predictor.served(model_id, key)
    tensor, loc = body.inputs[0], ["body", "inputs", 0, "data"]
    dtype = check_datatype(tensor.datatype, ["body", "inputs", 0, "datatype"])
    values = _input_values(tensor, tail, loc)
    x = as_batch(values, tensor.shape, served.meta, request.app.state.settings.predict_max_batch, loc, dtype)
    # Checked before the rows are charged: a request refused for a bad output name costs nothing.
    names = ["probabilities", "label"] + (["refused"] if served.policy is not None else [])
    wanted = {o.name: o.parameters.get("binary_data", False) is True for o in body.outputs or []}
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        msg = f"unknown output(s) {unknown}; this model has {names}"
        raise validation_problem([{"loc": ["body", "outputs"], "msg": msg, "type": "value_error"}])
    out, headers = await predictor.answer(key, served, x)
    outputs, blobs = _outputs(out, served, wanted, body.parameters.get("binary_data_output", False) is True)
    answer = {"model_name": str(model_id), "model_version": "1", "id": body.id, "outputs": outputs}
    if not blobs:
        return _json(answer, headers)
    head = json.dumps(answer).encode()
    headers |= {"Inference-Header-Content-Length": str(len(head))}
    return Response(head + b"".join(blobs), media_type="application/octet-stream", headers=headers)


@router.post(
    "/{model_id}/predict",
    tags=["inference"],
    response_model=PredictResponse,
    summary="Predict (simple JSON)",
    openapi_extra=_body_doc(PredictRequest, binary=False),
)
async def predict(model_id: ModelId, request: Request) -> Response:
    key = await authenticate(request, bearer_token(request), PREDICT_SCOPES)
    body = _parse(PredictRequest, await _read(request))
    return _json(*await request.app.state.predictor.predict_rows(key, model_id, body.inputs))
