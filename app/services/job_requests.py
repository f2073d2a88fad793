"""What a job asks for, checked before it is queued: its data set (an owned upload, or a built-in with
valid parameters), its uploaded teacher, its augmentation and its estimated cost; and the spec it is stored
with."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.models import (
    ApiKey,
    Dataset,
    UploadedModel,
)
from app.core.remote import Limits, RemoteModel
from app.core.secrets import SecretBox
from app.core.storage import ArtifactStore
from app.problems import Problem, validation_problem
from app.services.schemas import (
    JobCreate,
)
from ml.audit import AuditConfig, deployed_phases
from ml.catalog import DATASETS, PRESETS, check_augmentation, default_augmentation, fine_tune_defaults
from ml.served import PolicyConfig

UPLOADED_DATASET = "npz"  # the ML library's loader for a user's npz file


# Training-set size assumed for a built-in dataset whose parameters do not say (the largest, CIFAR).
DEFAULT_TRAIN_SIZE = 50_000


def _dataset_spec(session: Session, key: ApiKey, body: JobCreate) -> dict[str, Any]:
    """The teacher's dataset fields after checking them: an owned upload, or a built-in with valid params."""
    if body.dataset_id is not None:
        ds = session.get(Dataset, body.dataset_id)
        if ds is None or ds.owner_id != key.owner_id:
            uploads = session.scalars(select(Dataset.id).where(Dataset.owner_id == key.owner_id)).all()
            raise validation_problem(
                [
                    {
                        "loc": ["body", "dataset_id"],
                        "type": "unknown_choice",
                        "msg": f"no uploaded dataset {body.dataset_id}",
                        "choices": [str(u) for u in uploads],
                    }
                ]
            )
        return {"dataset": UPLOADED_DATASET, "dataset_params": {}}
    loader = DATASETS.get(body.teacher.dataset)
    if body.teacher.dataset == UPLOADED_DATASET:
        raise validation_problem(
            [
                {
                    "loc": ["body", "teacher", "dataset"],
                    "type": "value_error",
                    "msg": "to train on your own npz, upload it (POST /api/v1/datasets) "
                    "and pass its id as dataset_id",
                }
            ]
        )
    try:
        params = loader.params_model.model_validate(body.teacher.dataset_params)
    except ValueError as e:
        raise validation_problem(
            [
                {
                    "loc": ["body", "teacher", "dataset_params", *err["loc"]],
                    "msg": err["msg"],
                    "type": err["type"],
                }
                for err in e.errors()  # type: ignore[attr-defined]
            ]
        ) from None
    return {"dataset": body.teacher.dataset, "dataset_params": params.model_dump(mode="json")}


def _train_size(session: Session, body: JobCreate, teacher: dict[str, Any]) -> int:
    """How many training samples the teacher sees: the upload's, else the built-in's parameters say."""
    if body.dataset_id is not None:
        ds = session.get(Dataset, body.dataset_id)
        return ds.n_train if ds is not None else DEFAULT_TRAIN_SIZE
    return int(teacher["dataset_params"].get("num_train", DEFAULT_TRAIN_SIZE))


def stage_costs(body: JobCreate, n_train: int) -> dict[str, float]:
    """A job's estimated cost in sample-passes per stage: training samples x epochs of every model trained.

    The teacher, its CE control, then the audit: per seed and student, each LS row on the attacker's
    labelled data, and each attack row against each attacked black box, once plus once per query budget.
    """
    t, a = body.teacher, body.audit
    teachers = 2 if a.control else 1
    attacked = teachers + (1 if a.compare_raw else 0)
    labelled = max(1, int(n_train * a.labelled_fraction))
    queried = labelled + (a.transfer_size or 0)
    ls_rows = len(a.ls_eps) * (2 if a.ls_mixup else 1)
    try:
        attack_rows = len(a.attack_rows())
    except ValueError as e:
        raise validation_problem(
            [{"loc": ["body", "audit", "attack_params"], "msg": str(e), "type": "value_error"}]
        ) from None
    phases = 1 + len(a.budgets(labelled))
    per_student = ls_rows * labelled + attack_rows * attacked * phases * queried
    return {
        "teacher": float(n_train * t.epochs),
        "control": float(n_train * t.epochs * (teachers - 1)),
        "audit": float(a.epochs * a.seeds * len(a.students) * per_student),
    }


def _check_cost(
    session: Session, settings: Settings, body: JobCreate, teacher: dict[str, Any]
) -> dict[str, float]:
    """The job's cost per stage; 422 when their sum is over the server's ceiling."""
    costs = stage_costs(body, _train_size(session, body, teacher))
    cost = sum(costs.values())
    if cost > settings.max_job_cost:
        raise validation_problem(
            [
                {
                    "loc": ["body"],
                    "type": "too_costly",
                    "msg": f"the job's estimated cost is {cost:.3g} sample-passes (training samples x "
                    f"epochs over every model it trains), over this server's ceiling of "
                    f"{settings.max_job_cost:.3g}: fewer epochs, seeds, students, attacks, LS rows, "
                    "query budgets or samples",
                    "ctx": {"estimated_cost": cost, "max_job_cost": settings.max_job_cost},
                }
            ]
        )
    return costs


def _field_error(loc: list[str], msg: str, kind: str = "value_error", **extra: Any) -> Problem:
    return validation_problem([{"loc": ["body", *loc], "type": kind, "msg": msg, **extra}])


def _uploaded_teacher(
    session: Session, key: ApiKey, body: JobCreate, teacher: dict[str, Any], audit: dict[str, Any]
) -> None:
    """Check a job's uploaded teacher against its data and fill in what follows from it (in place): the
    architecture, the fine-tuning recipe, and no control for an ONNX model without a named one."""
    spec = body.teacher
    row = session.get(UploadedModel, spec.model_id)
    if row is None or row.owner_id != key.owner_id:
        owned = session.scalars(select(UploadedModel.id).where(UploadedModel.owner_id == key.owner_id)).all()
        raise _field_error(
            ["teacher", "model_id"],
            f"no uploaded model {spec.model_id}",
            "unknown_choice",
            choices=[str(m) for m in owned],
        )
    if body.dataset_id is not None:
        ds = session.get(Dataset, body.dataset_id)
        shape, classes = tuple(ds.input_shape), ds.num_classes
    else:
        info = DATASETS.get(teacher["dataset"]).info
        shape, classes = info.input_shape, info.num_classes
    if (shape is not None and tuple(row.input_shape) != tuple(shape)) or (
        classes is not None and row.num_classes != classes
    ):
        raise _field_error(
            ["teacher", "model_id"],
            f"model {row.id} takes {tuple(row.input_shape)} with {row.num_classes} classes; "
            f"the job's data has {shape} with {classes} classes",
        )
    if row.format == "onnx":
        if spec.fine_tune:
            raise _field_error(
                ["teacher", "fine_tune"],
                "an ONNX model is audited as a black box; fine-tuning needs a zoo checkpoint",
            )
        if body.audit.control_arch is None:
            audit["control"] = False  # no zoo architecture to train a CE control with
        else:
            teacher["arch"] = body.audit.control_arch
        return
    teacher["arch"] = row.arch
    if spec.fine_tune:
        tuned = fine_tune_defaults(spec)
        teacher |= {"lr": tuned.lr, "warmup_epochs": tuned.warmup_epochs}


def _endpoint_teacher(
    session: Session, settings: Settings, body: JobCreate, teacher: dict[str, Any], audit: dict[str, Any]
) -> None:
    """Check a job whose teacher is deployed elsewhere and fill in what the worker needs (in place): served
    as deployed (its answers as they come, no policy), a query cap that pays for one phase at least, the
    headers sealed in the store and only their names in the spec (it is shown again)."""
    endpoint = body.teacher.endpoint
    assert endpoint is not None
    loc = ["teacher", "endpoint"]
    if body.dataset_id is None:
        raise _field_error(
            ["dataset_id"],
            "a deployed model is audited on the data it was trained on: upload it (POST /api/v1/datasets) "
            "and pass its id as dataset_id",
        )
    if body.teacher.model_id is not None or body.teacher.fine_tune:
        raise _field_error(
            loc, "a teacher is an endpoint or an uploaded model (model_id, fine_tune), not both"
        )
    if (why := endpoint.refused(settings)) is not None:
        raise _field_error([*loc, "url"], why)
    if endpoint.protocol == "v2" and not endpoint.model:
        raise _field_error([*loc, "model"], "a v2 endpoint needs the model's name")
    if body.audit.policy != PolicyConfig():
        raise _field_error(
            ["audit", "policy"], "a deployed model is audited as it answers: cmim serves it no policy"
        )
    audit |= {"output_mode": {"kind": "probs"}, "compare_raw": False}  # its answers as they come
    ds = session.get(Dataset, body.dataset_id)
    cap = RemoteModel(endpoint, Limits.from_settings(settings)).cap
    labelled = max(1, int(ds.n_train * body.audit.labelled_fraction))
    augmentation = body.teacher.augmentation or default_augmentation(tuple(ds.input_shape))
    fixed = not body.audit.augment or augmentation == "none"
    cfg = AuditConfig.model_validate(audit)
    phases = deployed_phases(cfg, ds.n_train, ds.n_test, labelled, cap, fixed_plain=fixed)
    if not phases.runs_any:
        raise _field_error(
            [*loc, "max_queries"],
            f"the query cap is {cap:,}: it pays for no phase of the audit; the smallest cap that pays for "
            f"one (the model's answers on the data, then the cheapest query budget or the unlimited phase) "
            f"is {phases.least:,}: a higher cap, or fewer seeds, epochs or attacks, or a smaller budget",
            "too_costly",
        )
    public = endpoint.public()
    if endpoint.headers:
        sealed = SecretBox.from_settings(settings).seal(endpoint.headers)
        public["headers_key"] = ArtifactStore.from_settings(settings).put_bytes(sealed).key
    teacher["endpoint"] = public


def _check_augmentation(session: Session, body: JobCreate, teacher: dict[str, Any]) -> None:
    """422 when the requested augmentation does not fit the data's inputs (e.g. shifts on tabular data)."""
    if body.teacher.augmentation is None:
        return
    if body.dataset_id is not None:
        shape = tuple(session.get(Dataset, body.dataset_id).input_shape)
    else:
        shape = DATASETS.get(teacher["dataset"]).info.input_shape
    if shape is None:
        return
    try:
        check_augmentation(body.teacher.augmentation, shape)
    except ValueError as e:
        raise _field_error(["teacher", "augmentation"], str(e)) from None


def request_hash(body: JobCreate) -> str:
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def job_spec(session: Session, settings: Settings, key: ApiKey, body: JobCreate) -> dict[str, Any]:
    """The spec a job is stored and run with, after every check (422 naming the field otherwise)."""
    teacher = body.teacher.model_dump(mode="json") | _dataset_spec(session, key, body)
    teacher["device"] = "auto"  # the worker decides where to run
    costs = _check_cost(session, settings, body, teacher)
    audit = body.audit.model_dump(mode="json")
    _check_augmentation(session, body, teacher)
    if body.teacher.endpoint is not None:
        _endpoint_teacher(session, settings, body, teacher, audit)
    elif body.teacher.model_id is not None:
        _uploaded_teacher(session, key, body, teacher, audit)
    elif body.teacher.fine_tune:
        raise _field_error(
            ["teacher", "fine_tune"], "fine_tune needs teacher.model_id: the model to start from"
        )
    serving = body.serving.model_dump(mode="json")
    spec: dict[str, Any] = {"teacher": teacher, "audit": audit, "serving": serving}
    if body.preset is not None:
        spec |= {"preset": body.preset, "indicative": PRESETS.get(body.preset).indicative}
    # What each stage weighs in the job's progress: a stage that trains nothing weighs nothing.
    trained = (body.teacher.model_id is None and body.teacher.endpoint is None) or body.teacher.fine_tune
    spec["cost"] = costs | {"teacher": costs["teacher"] if trained else 0.0}
    spec["cost"]["control"] = costs["control"] if audit["control"] else 0.0
    return spec
