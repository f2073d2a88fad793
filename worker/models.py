"""A job's models: its teacher (trained, an owner's upload audited as it is or fine-tuned, or an owner's
model deployed elsewhere and asked through its endpoint) and its CE control, with the files that publish
the teacher; and the models a job stored, loaded back on any worker.

Every model comes out of the store through one loader (`ml.loading.load_model`), the one the service's
other callers use too.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from app.core.models import UploadedModel
from app.core.remote import EndpointSpec, Limits, RemoteModel, StoreCache
from app.core.secrets import SecretBox
from app.core.storage import ArtifactStore, StoredObject
from ml.audit import AnsweringModel, DeployedPhases, deployed_phases
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
    deployed: Deployed | None = None  # a model deployed elsewhere: no files, its endpoint's client

    @property
    def keys(self) -> tuple[str, str]:
        """(weights, config) keys in the store: what any worker loads it back from (`stored_model`)."""
        return self.files[0][3].key, self.files[1][3].key


# What the report says of evidence for a model deployed elsewhere (docs/models.md, "Audit a deployed model").
NO_EVIDENCE = (
    "Evidence of theft was not prepared for this model: its challenge is chosen among many candidate inputs "
    "where the teacher's answers differ from independent students', and cmim did not spend the query cap "
    "asking the deployed model for them. Verifying a suspect against this model is therefore not available; "
    "an audit of the model uploaded as ONNX prepares it."
)


@dataclass
class Deployed:
    """A teacher deployed elsewhere: the client that asks it (answers cached in the store) and the phases
    the owner's query cap allows."""

    remote: RemoteModel
    phases: DeployedPhases

    def section(self, model: AnsweringModel) -> dict[str, Any]:
        """The report's `deployed` section: the endpoint (no header values), what was asked, what the cap
        allowed and what that means for the verdict."""
        log, cap, p = self.remote.log, self.remote.cap, self.phases
        cached = sum(e["rows"] for e in log if e["cached"])
        tested = ", ".join(f"{b:,}" for b in p.budgets) or "none"
        text = (
            f"The model was audited as deployed, through its endpoint, within a query cap of {cap:,} "
            f"inputs: {model.asked:,} distinct inputs asked ({cached:,} answered from earlier answers "
            f"kept by cmim, {self.remote.sent:,} rows sent). "
        )
        if p.unlimited:
            text += (
                "The cap allowed the unlimited phase (attackers querying throughout training) and the query "
                f"budgets {tested}."
            )
        else:
            largest = max(p.budgets)
            text += (
                f"The cap allowed the query budgets {tested}, not the unlimited phase (attackers querying "
                f"throughout training, {p.needed:,} inputs with the data): the unlimited attacker was not "
                f"measured, so the verdict rests on the largest budget run and holds only for attackers "
                f"holding at most {largest:,} answers; the safe budget is at most {largest:,}."
            )
        if p.skipped:
            text += (
                f" It did not allow the budgets {', '.join(f'{b:,}' for b in p.skipped)}: the budget curve "
                "stops at the largest tested, so no safe budget above it is claimed."
            )
        text += (
            " The verdict is about the endpoint's answers as it gave them; what the deployment does beyond "
            "them (its own keys, limits or monitoring) was not audited, and cmim does not serve this model."
        )
        return {
            "endpoint": self.remote.spec.public(),
            "query_cap": cap,
            "asked": model.asked,
            "sent": self.remote.sent,
            "from_cache": cached,
            "requests": sum(1 for e in log if not e["cached"]),
            "budgets_run": p.budgets,
            "budgets_skipped": p.skipped,
            "unlimited_phase": p.unlimited,
            "text": text,
            "evidence": NO_EVIDENCE,
        }


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
    if inputs.endpoint is not None:
        return _deployed(ctx, store, inputs)
    if inputs.model_id is None:
        trained = train(ctx, inputs.teacher, inputs.data, "teacher")
        files = stored_files(store, trained.model, trained.meta, ctx.work / "checkpoint")
        return JobModel(trained.model, trained.meta, files)
    return _uploaded(ctx, store, inputs)


def _deployed(ctx: JobContext, store: ArtifactStore, inputs: JobInputs) -> JobModel:
    """An owner's model deployed elsewhere as the job's teacher: asked through the remote client (answers
    kept in the store, so a re-audit asks nothing twice), each distinct input once. The audit's budgets
    become those the query cap allows (`ml.audit.blackbox.deployed_phases`)."""
    spec = dict(inputs.endpoint or {})
    spec.pop("header_names", None)
    if (key := spec.pop("headers_key", None)) is not None:
        spec["headers"] = SecretBox.from_settings(ctx.settings).open(store.read_bytes(key))
    remote = RemoteModel(
        EndpointSpec.model_validate(spec), Limits.from_settings(ctx.settings), StoreCache(store)
    )
    data, cfg = inputs.data, inputs.audit
    labelled = max(1, int(len(data.x_train) * cfg.labelled_fraction))
    fixed = not cfg.augment or data.augmentation == "none"
    phases = deployed_phases(
        cfg, len(data.x_train), len(data.x_test), labelled, remote.cap, fixed_plain=fixed
    )
    if not phases.runs_any:
        raise ValueError(
            f"the audit would ask the deployed model at least {phases.least:,} inputs for any phase; its "
            f"query cap is {remote.cap:,}"
        )
    inputs.audit = cfg.model_copy(update={"query_budgets": phases.budgets})
    model = AnsweringModel(lambda x: remote.scores(x, data.num_classes), data.num_classes)
    meta = ModelMeta(
        arch="endpoint",
        input_shape=tuple(data.input_shape),
        num_classes=data.num_classes,
        class_names=list(data.class_names),
        dataset=data.name,
        dataset_fingerprint=data.fingerprint,
    )
    return JobModel(model, meta, deployed=Deployed(remote, phases))


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
    from_upload = inputs.model_id is not None or inputs.endpoint is not None
    recipe = control_recipe(inputs.teacher, inputs.audit.control_arch, from_scratch=from_upload)
    trained = train(ctx, recipe, inputs.data, "control")
    return JobModel(trained.model, trained.meta)


def store_control(ctx: JobContext, store: ArtifactStore, control: JobModel) -> None:
    control.files = stored_files(store, control.model, control.meta, ctx.work / "control_checkpoint")


def stored_model(store: ArtifactStore, weights: str, config: str, data: Data) -> nn.Module:
    """A teacher or control the job stored: a zoo checkpoint, or an ONNX black box."""
    shape, classes = tuple(data.input_shape), data.num_classes
    return load_model(store, weights, config, input_shape=shape, num_classes=classes)[0]
