"""The API's own wire bodies: inference (KServe v2 and the simple JSON route) and evidence of theft. The
bodies it shares with the dashboard are `app.services.schemas`."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict

from app.core.remote import EndpointSpec

# ---------------------------------------------------------------- inference (KServe v2 + simple JSON)

# Numbers, flat or nested up to 5 levels (a batch of images); booleans and strings are refused here.
Number = Annotated[float, Strict()]
Values = list[
    Number | list[Number] | list[list[Number]] | list[list[list[Number]]] | list[list[list[list[Number]]]]
]


class TensorMeta(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMeta]
    outputs: list[TensorMeta] = Field(
        description="probabilities and label; a model served with a policy also has the BOOL output `refused`"
    )
    parameters: dict[str, Any] = Field(
        default_factory=dict,
        description="output_mode; policy (the serving policy's config, null when served without one); "
        "query_budget: the budgets that apply to the calling key on this model: the key's (`limit`, "
        "`used`, `remaining`, `reason`; `applies`: key, model or none, whose number it is; `key_budget`, "
        "`model_budget` and `model_budget_reason`: the operator's CMIM_MODEL_QUERY_BUDGET, else the "
        "audit's safe budget), the owner's over all its keys (`owner`) and the model's over every key "
        "(`global`); class_names; arch",
    )


class ModelReady(BaseModel):
    name: str
    ready: bool


class InferInput(BaseModel):
    name: str = "input"
    shape: list[int] = Field(max_length=8)
    datatype: str = Field("FP32", description="FP32, or FP64 (cast to FP32); other datatypes are refused")
    data: Values | None = Field(
        None, description="row-major values, flat or nested; absent when sent as binary (binary_data_size)"
    )
    parameters: dict[str, Any] = Field(default_factory=dict)


class InferRequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] = Field(default_factory=dict, description="binary_data: answer in binary")


class InferRequest(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "req-1",
                    "inputs": [
                        {"name": "input", "shape": [1, 1, 40], "datatype": "FP32", "data": [0.0] * 40}
                    ],
                }
            ]
        }
    )

    id: str | None = Field(None, max_length=200)
    inputs: list[InferInput] = Field(min_length=1, max_length=1)
    outputs: list[InferRequestedOutput] | None = Field(None, max_length=8)
    parameters: dict[str, Any] = Field(default_factory=dict)


class InferOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any]


class InferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    outputs: list[InferOutput] = Field(
        description="`probabilities` (FP32, [B, C]: the served scores, as the output mode and policy "
        "allow; all zero for a refused row), `label` (INT64, [B]: the served argmax; -1 for a refused "
        "row) and, for a model served with a policy, `refused` (BOOL, [B]: true where the policy refused "
        "the query)"
    )


class PredictRequest(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"inputs": [[[0.0] * 40]]}]})

    inputs: Values = Field(description="a batch: nested lists of numbers of shape (B, *input_shape)")


class Prediction(BaseModel):
    label: int | None = Field(description="the served argmax; null when the query was refused")
    class_name: str | None = Field(description="the label's class name; null when refused")
    scores: list[float] | None = Field(
        description="the served scores (as the job's output mode and serving policy allow); null when refused"
    )
    refused: bool = Field(
        False, description="true when the serving policy refused this query (its detector flagged it)"
    )


class PredictResponse(BaseModel):
    model: uuid.UUID
    output_mode: dict[str, Any]
    policy: dict[str, Any] | None = Field(
        None, description="the serving policy's config (as audited); null when served without one"
    )
    predictions: list[Prediction]


# --- evidence of theft: challenge and verification (app/api/routes/evidence.py) ---


class Commitment(BaseModel):
    sha256: str = Field(description="sha256 of the job's evidence secret (the secret itself is never served)")
    committed_at: str = Field(description="when the secret was made, before the model was served (UTC)")
    generation: int = Field(
        0,
        description="which challenge: 0 is the audit's; downloading an evidence bundle retires one, and the "
        "next is committed then",
    )


class ChallengeOut(BaseModel):
    model: uuid.UUID
    mechanism: str = Field(description="the evidence mechanism the challenge belongs to")
    points: int
    input_shape: list[int]
    inputs: list[Any] = Field(description="(points, *input_shape) inputs to ask the suspect, in this order")
    commitment: Commitment


class VerifyRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"suspect_endpoint": {"url": "http://127.0.0.1:9/", "protocol": "v2", "model": "suspect"}},
                {"suspect_model_id": "00000000-0000-0000-0000-000000000000"},
            ]
        },
    )

    suspect_model_id: uuid.UUID | None = Field(
        None, description="an uploaded model of yours (POST /api/v1/models) to test; or give `answers`"
    )
    answers: list[int] | None = Field(
        None,
        max_length=4096,
        description="a black-box suspect's labels on the challenge inputs (GET .../challenge), in order",
    )
    suspect_endpoint: EndpointSpec | None = Field(
        None,
        description="a suspect served elsewhere (an Open Inference Protocol v2 server or a JSON route): the "
        "service asks it the challenge in the background and answers 202 with the verification to poll",
    )


class VerifyOut(BaseModel):
    model: uuid.UUID
    suspect: str = Field(description="`uploaded model <id>` or `answers`")
    mechanism: str
    points: int
    agreement: float = Field(description="share of the challenge on which the suspect gives the copy's label")
    p_value: float = Field(description="chance that a model trained independently agrees at least this much")
    alpha: float
    verdict: Literal["copy", "not_shown"] = Field(
        description="copy: p < alpha; not_shown: the test does not show a copy (no proof of innocence)"
    )
    threshold: float = Field(description="the agreement above which a suspect is called a copy")
    false_positive_bound: float = Field(
        description="under the null (suspects like the audit's independent students), P(copy) <= this"
    )
    measured_false_positive_rate: float = Field(
        description="leave-one-out rate of `copy` over the audit's independent students"
    )
    null: dict[str, dict[str, float | int]] = Field(
        description="per family of the audit's independent students (plain, mixup): their agreement's mean, "
        "std, n and the challenge's points"
    )
    null_scope: str | None = Field(None, description="which independent models the null covers, in words")
    evidence: str | None = Field(
        None,
        description="set when the audit found that evidence cannot work for this model, or that its null "
        "does not cover an architecture, and why",
    )
    commitment: Commitment
    verification: uuid.UUID | None = Field(
        None, description="the stored verification (GET .../verifications/{id}, and its evidence bundle)"
    )
