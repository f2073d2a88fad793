"""A job's models: its teacher (trained, or an owner's upload audited as it is or fine-tuned) and its CE
control, with the files that publish the teacher; and the models a job stored, loaded back on any worker.

Every model comes out of the store through one loader (`ml.loading.load_model`), the one the service's
other callers use too.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from app.core.models import UploadedModel
from app.core.storage import ArtifactStore, StoredObject
from ml.checkpoint import ModelMeta, save_checkpoint
from ml.data import Dataset as Data
from ml.loading import load_model
from ml.onnx_model import ONNX_ARCH, ONNX_NAME
from ml.teachers import control_recipe
from ml.train import TrainConfig, TrainResult, check_fits, train_model
from worker.inputs import JobInputs
from worker.lease import JobContext

FileRow = tuple[str, str, str, StoredObject]  # (name, kind, media type, stored object) of an artifact


@dataclass
class JobModel:
    """A model of the job, its metadata and the files it is published (or stored) as."""

    model: nn.Module
    meta: ModelMeta
    files: list[FileRow] = field(default_factory=list)

    @property
    def keys(self) -> tuple[str, str]:
        """(weights, config) keys in the store: what any worker loads it back from (`stored_model`)."""
        return self.files[0][3].key, self.files[1][3].key


def train(ctx: JobContext, cfg: TrainConfig, data: Data, stage: str, **init: Any) -> TrainResult:
    # The state file makes training resumable: a re-claimed job continues from its last finished epoch.
    return train_model(
        cfg, data, on_epoch=ctx.on_epoch, state_path=ctx.work / f"{stage}_state.pt", stage=stage, **init
    )


def stored_files(store: ArtifactStore, model: nn.Module, meta: ModelMeta, directory: Any) -> list[FileRow]:
    """A zoo model saved as a checkpoint into the store: its weights and config rows."""
    weights, config = save_checkpoint(model, meta, directory)
    return [
        (weights.name, "weights", "application/octet-stream", store.put_file(weights)),
        (config.name, "config", "application/json", store.put_file(config)),
    ]


def teacher(ctx: JobContext, store: ArtifactStore, inputs: JobInputs) -> JobModel:
    """The job's teacher: trained from its recipe, or the owner's uploaded model."""
    if inputs.model_id is None:
        trained = train(ctx, inputs.teacher, inputs.data, "teacher")
        files = stored_files(store, trained.model, trained.meta, ctx.work / "checkpoint")
        return JobModel(trained.model, trained.meta, files)
    return _uploaded(ctx, store, inputs)


def _uploaded(ctx: JobContext, store: ArtifactStore, inputs: JobInputs) -> JobModel:
    """An owner's uploaded model as the job's teacher.

    ONNX is audited as it is and published as model.onnx + model.json; a zoo checkpoint is audited as it
    is or CMIM fine-tuned first (its accuracy before and after in meta.metrics["fine_tune"])."""
    data = inputs.data
    with ctx.session() as s:
        row = s.get(UploadedModel, uuid.UUID(str(inputs.model_id)))
        assert row is not None, "uploaded models are never deleted while a job uses them"
        s.expunge(row)
    onnx = row.format == "onnx"
    model, meta = load_model(
        store,
        row.storage_key,
        row.config_key,
        onnx_output=row.output if onnx else None,
        input_shape=tuple(data.input_shape),
        num_classes=data.num_classes,
    )
    if onnx:
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
        weights = StoredObject(row.storage_key, row.sha256, row.size_bytes)
        files = [
            (ONNX_NAME, "weights", "application/onnx", weights),
            (config.name, "config", "application/json", store.put_file(config)),
        ]
        return JobModel(model, meta, files)
    assert meta is not None, "a zoo checkpoint has its config"
    check_fits(meta, data)
    if inputs.fine_tune:
        init = store.local_path(row.storage_key)
        result = train(ctx, inputs.teacher, data, "teacher", init_weights=init, init_meta=meta)
        model, meta = result.model, result.meta
        warning = meta.metrics["fine_tune"]["warning"]
        if warning:
            ctx.warn("teacher", warning)
    return JobModel(model, meta, stored_files(store, model, meta, ctx.work / "checkpoint"))


def control(ctx: JobContext, inputs: JobInputs) -> JobModel | None:
    """The job's CE control (`ml.teachers.control_recipe`) on `audit.control_arch`, trained; None when the
    audit runs none. Not stored: `store_control` keeps it for other workers when the audit fans out."""
    if not inputs.audit.control:
        return None
    from_upload = inputs.model_id is not None
    recipe = control_recipe(inputs.teacher, inputs.audit.control_arch, from_scratch=from_upload)
    trained = train(ctx, recipe, inputs.data, "control")
    return JobModel(trained.model, trained.meta)


def store_control(ctx: JobContext, store: ArtifactStore, control: JobModel) -> None:
    control.files = stored_files(store, control.model, control.meta, ctx.work / "control_checkpoint")


def stored_model(store: ArtifactStore, weights: str, config: str, data: Data) -> nn.Module:
    """A teacher or control the job stored: a zoo checkpoint, or an ONNX black box."""
    shape, classes = tuple(data.input_shape), data.num_classes
    return load_model(store, weights, config, input_shape=shape, num_classes=classes)[0]
