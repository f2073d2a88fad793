"""The bodies the API and the dashboard share: jobs, data sets, uploaded models, keys, the catalog. Job
configuration reuses the ML library's own typed configs."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from app.core.config import ALL_SCOPES, Scope
from app.core.remote import EndpointSpec
from app.core.text import refused_character
from app.problems import validation_problem
from ml.audit import AuditConfig
from ml.catalog import PRESETS, DatasetInfo, TrainConfig, apply_preset
from ml.served import KEYED_NOT_SERVED, EnforcementPolicy

MAX_INT32 = 2**31 - 1  # the database stores counts and limits as 32-bit integers


def printable_text(value: Any) -> Any:
    """A text input unchanged; a validation error (422 at the API) when it holds a refused character.
    Anything but a string is left to the field's own type."""
    reason = refused_character(value) if isinstance(value, str) else None
    if reason is not None:
        raise PydanticCustomError("text_character", "{reason}", {"reason": reason})
    return value


# Every free-text input (stored or used in a query) is one of these: checked before its length, its type
# and anything else, so each gets the same clear 422 and no database ever sees the character.
PRINTABLE = BeforeValidator(printable_text)
PrintableText = Annotated[str, PRINTABLE]


def text_field(value: str, loc: list[str | int]) -> str:
    """A text input read by hand (a multipart form field) checked as PrintableText is: 422 at `loc`."""
    reason = refused_character(value)
    if reason is not None:
        raise validation_problem([{"loc": loc, "msg": reason, "type": "text_character"}])
    return value


def _refuse_unprintable(value: Any, path: str) -> None:
    """Every key and string in a JSON value is printable text; the error names where the first is not
    (by the keys above it, which are checked first, so the message itself holds only printable text)."""
    if isinstance(value, str):
        reason = refused_character(value)
        if reason is not None:
            raise PydanticCustomError(
                "text_character", "{field}: {reason}", {"field": path, "reason": reason}
            )
    elif isinstance(value, dict):
        for key, item in value.items():
            reason = refused_character(str(key))
            if reason is not None:
                where = f"{path}: " if path else ""
                raise PydanticCustomError(
                    "text_character", "{where}a key {reason}", {"where": where, "reason": reason}
                )
            _refuse_unprintable(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _refuse_unprintable(item, f"{path}[{i}]")


# The example body: the quick preset (a demo that finishes in a few minutes on a 2-core CPU).
DEMO_JOB: dict[str, Any] = {"preset": "quick"}


class TeacherSpec(TrainConfig):
    """The teacher: trained from scratch as configured, or an uploaded model (`model_id`)."""

    model_id: uuid.UUID | None = Field(
        None,
        description="an uploaded model (POST /api/v1/models) to audit instead of training one: audited as it "
        "is, or, for a zoo checkpoint with fine_tune, CMIM fine-tuned first (objective, epochs; by default a "
        "tenth of the learning rate and one warm-up epoch). `epochs` and the optimiser are also the CE "
        "control's recipe",
    )
    fine_tune: bool = Field(False, description="fine-tune the uploaded checkpoint with `objective` first")
    endpoint: EndpointSpec | None = Field(
        None,
        description="a model deployed elsewhere (a v2 inference server or a JSON route) to audit without its "
        "weights, asked through the service's caching client within `max_queries`; needs `dataset_id` (the "
        "data it was trained on). `arch` and the optimiser are the CE control's recipe. Headers are stored "
        "encrypted and never shown again",
    )


def _teacher_optional(schema: dict[str, Any]) -> None:
    """With a preset, `teacher` may be left out: the schema says so."""
    schema["examples"] = [DEMO_JOB]
    schema["required"] = [r for r in schema.get("required", []) if r != "teacher"]
    if not schema["required"]:
        del schema["required"]


class ServingSpec(BaseModel):
    """How a job's model is served beyond its audited output mode and policy."""

    model_config = ConfigDict(extra="forbid")

    enforcement: EnforcementPolicy = Field(
        default_factory=EnforcementPolicy,
        description="what an extraction alert does to the keys it names: notify, throttle, probation or "
        "suspend (by default a key alert and a model alert suspend them), and the owner's optional cap over "
        "all its keys",
    )


class JobCreate(BaseModel):
    """A protection job: train the teacher, audit it against black-box distillation, serve it as audited."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_teacher_optional)

    preset: str | None = Field(
        None,
        max_length=64,
        description="start from a preset (GET /api/v1/presets: quick, standard); the fields given here "
        "override it, nested objects key by key",
    )
    teacher: TeacherSpec = Field(
        description="how the teacher is trained: dataset and its parameters, architecture, objective and "
        "its parameters, budget (epochs, batch size, optimiser), seed. `device` is chosen by the worker."
    )
    dataset_id: uuid.UUID | None = Field(
        None, description="an uploaded dataset (POST /api/v1/datasets) to use instead of teacher.dataset"
    )
    audit: AuditConfig = Field(
        default_factory=AuditConfig,
        description="the audit: students, attacks, seeds, schedule, control. `output_mode` and `policy` are "
        "also how the model is served by the predict endpoints (it is attacked exactly as deployed: the "
        "policy is fitted to the teacher as the audit fits it and published as policy.safetensors + "
        "policy.json). The smallest safe budget over the students (`query_budgets`, by default 1, 5 and "
        "25 passes over the labelled set) becomes the model's default per-key query budget",
    )
    serving: ServingSpec = Field(
        default_factory=ServingSpec,
        description="how the served model acts beyond what the audit attacks: `enforcement`, what the "
        "extraction monitor's alerts do to the keys they name (docs/enforcement.md); its owner can change "
        "it later (PUT /api/v1/models/{id}/enforcement)",
    )

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: Any) -> Any:
        """A preset's teacher and audit under the body's own fields; 422 naming the presets when unknown."""
        if not isinstance(data, dict) or data.get("preset") is None:
            return data
        name = data["preset"]
        if not isinstance(name, str) or name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; valid choices: {', '.join(PRESETS.names())}")
        return apply_preset(name, data)

    # Defined after `_preset` so that it runs first (pydantic runs the last "before" validator first).
    @model_validator(mode="before")
    @classmethod
    def _printable(cls, data: Any) -> Any:
        """The spec is stored and served back as given: no text in it, nested parameters included, may
        hold what PrintableText refuses."""
        _refuse_unprintable(data, "")
        return data

    @model_validator(mode="after")
    def _served_as_audited(self) -> JobCreate:
        """A job's policy is how its model is served: keyed answers are measured by audits, not served."""
        if self.audit.policy.keyed_fraction > 0:
            raise ValueError(KEYED_NOT_SERVED)
        return self


class Links(BaseModel):
    self: str
    events: str
    report: str
    report_html: str
    artifacts: str
    model: str


class Progress(BaseModel):
    """Where a job stands, from its latest progress event."""

    stage: str = Field(
        description="queued, teacher, control (training), audit, or the final status (succeeded, failed, "
        "cancelled)"
    )
    fraction: float | None = Field(
        description="share of the job's estimated work done, 0 to 1 (weighted by each stage's cost in "
        "sample-passes); null for a failed or cancelled job"
    )
    epoch: int | None = Field(None, description="the training stage's last finished epoch")
    epochs: int | None = Field(None, description="the training stage's epochs")
    test_acc: float | None = Field(None, description="the training stage's last test accuracy, percent")
    done: int | None = Field(None, description="audit work units done (student epochs)")
    total: int | None = Field(None, description="audit work units in all")
    message: str | None = Field(None, description="what the audit is doing")
    eta_seconds: float | None = Field(
        None,
        description="estimated seconds left, from the audit's own pace once it has done 5% of its work "
        "units; null before that (training, the audit's first units: no pace measured yet) and once the "
        "job has ended",
    )
    updated_at: datetime | None = Field(None, description="when the event it comes from was written")


class JobResult(BaseModel):
    """A succeeded job's headline: its verdict, the teacher's accuracy and the audit's safe budget."""

    verdict: str | None = None
    teacher_accuracy: float | None = Field(None, description="percent on the test split")
    safe_budget: int | None = Field(
        None, description="the served model's per-key budget from the audit (smallest over its students)"
    )


class JobSummary(BaseModel):
    """A job as listed: everything but its spec (GET /api/v1/jobs/{id} has that)."""

    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    status: Literal["queued", "training", "auditing", "succeeded", "failed", "cancelled"]
    attempts: int
    max_attempts: int
    error: str | None
    cancel_requested: bool
    dataset_id: uuid.UUID | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    preset: str | None = Field(None, description="the preset the job started from, if any")
    indicative: bool = Field(
        False, description="the job is too small for its audit to discriminate (the quick preset)"
    )
    progress: Progress
    result: JobResult | None = Field(None, description="once the job has succeeded")
    links: Links


class JobOut(JobSummary):
    spec: dict[str, Any]


class PresetOut(BaseModel):
    name: str
    description: str
    expected_time: str
    indicative: bool
    job: dict[str, Any] = Field(description="the job body it stands for (teacher and audit)")


class JobList(BaseModel):
    items: list[JobSummary]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null on the last page")


class EventOut(BaseModel):
    id: int = Field(description="the per-job sequence number (the SSE event id)")
    kind: str
    data: dict[str, Any]
    created_at: datetime


class ArtifactOut(BaseModel):
    name: str
    kind: str
    media_type: str
    sha256: str
    size_bytes: int
    created_at: datetime
    url: str


class DatasetOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    name: str
    sha256: str
    size_bytes: int
    input_shape: list[int]
    num_classes: int
    n_train: int
    n_test: int
    created_at: datetime


class UploadedModelOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    name: str
    format: Literal["onnx", "checkpoint"]
    sha256: str
    size_bytes: int
    arch: str = Field(description="the zoo architecture of a checkpoint; `onnx` for an ONNX model")
    output: str
    input_shape: list[int]
    num_classes: int
    class_names: list[str]
    dataset_id: uuid.UUID | None
    created_at: datetime


class UploadedModelList(BaseModel):
    items: list[UploadedModelOut]
    next_cursor: str | None = Field(
        None, description="pass as `cursor` for the next page; null on the last page"
    )


class DatasetList(BaseModel):
    builtin: list[DatasetInfo]
    uploads: list[DatasetOut] = Field(description="your uploads, newest first, one page of them")
    next_cursor: str | None = Field(
        None, description="pass as `cursor` for the next page; null on the last page"
    )


class Catalog(BaseModel):
    datasets: list[DatasetInfo]
    architectures: list[dict[str, Any]]
    objectives: list[str]
    attacks: list[dict[str, Any]]
    scopes: list[str]


class KeyCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"name": "shop frontend", "scopes": ["models:predict"], "query_budget": 10000}]
        },
    )

    name: PrintableText = Field("key", min_length=1, max_length=200)
    scopes: list[Scope] | None = Field(
        None,
        max_length=len(ALL_SCOPES),
        description="a subset of the caller's scopes; default: models:predict only (least privilege)",
    )
    query_budget: int | None = Field(
        None,
        ge=0,
        le=MAX_INT32,
        description="predict rows allowed per model; null: unlimited (the model's own still applies)",
    )
    rate_limit_per_minute: int | None = Field(
        None, ge=1, le=MAX_INT32, description="predict requests per minute"
    )
    expires_at: datetime | None = Field(None, description="when the key stops working (UTC); null: never")


class KeyOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    owner_id: uuid.UUID
    name: str
    prefix: str
    scopes: list[str]
    query_budget: int | None
    rate_limit_per_minute: int | None
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None


class KeyCreated(KeyOut):
    key: str = Field(description="the secret; shown once, stored only as its sha256")


class KeyList(BaseModel):
    items: list[KeyOut]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null on the last page")
