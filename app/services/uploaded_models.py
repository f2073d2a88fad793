"""Owners' uploaded models: validated before anything is stored (ONNX through `ml.onnx_model`, zoo checkpoints
through `ml.checkpoint`), checked against the data set they answer for, then stored content-addressed."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.keys import KeyInfo
from app.core.models import ApiKey, UploadedModel
from app.core.models import Dataset as DatasetRow
from app.core.storage import ArtifactStore
from app.problems import Problem, not_found
from app.services.pagination import newest_first
from app.services.schemas import UploadedModelList, UploadedModelOut, text_field
from ml.catalog import UnknownNameError, validate_npz
from ml.loading import ModelMeta, build_from_meta, check_state, load_onnx, read_weights

FORMATS = ("onnx", "checkpoint")
OUTPUTS = ("logits", "probabilities")


def invalid(detail: str) -> Problem:
    """422 naming what is wrong with an uploaded model."""
    return Problem(422, detail, slug="invalid-model", title="Invalid model")


@dataclass(frozen=True)
class Declared:
    """What the owner declares about a model, or what its data set says: inputs, classes, names."""

    input_shape: tuple[int, ...] | None
    num_classes: int | None
    class_names: list[str] | None
    dataset_id: uuid.UUID | None


def _json_list(raw: str | None, field: str) -> list[Any] | None:
    if raw is None or raw == "":
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise invalid(f"{field} must be a JSON list: {e}") from None
    if not isinstance(value, list):
        raise invalid(f"{field} must be a JSON list, got {type(value).__name__}")
    return value


def declared(
    session: Session,
    store: ArtifactStore,
    key: ApiKey,
    dataset_id: str | None,
    input_shape: str | None,
    class_names: str | None,
) -> Declared:
    """The owner's declaration, completed (and checked) by the uploaded data set it names."""
    shape = _json_list(input_shape, "input_shape")
    if shape is not None and not all(isinstance(d, int) and d >= 1 for d in shape):
        raise invalid(f"input_shape must list positive integers, got {shape}")
    names = _json_list(class_names, "class_names")
    if names is not None:
        names = [text_field(str(n), ["body", "class_names", i]) for i, n in enumerate(names)]
    if not dataset_id:
        return Declared(tuple(shape) if shape else None, len(names) if names else None, names, None)
    try:
        ident = uuid.UUID(dataset_id)
    except ValueError:
        raise invalid(f"dataset_id {dataset_id!r} is not a UUID") from None
    ds = session.get(DatasetRow, ident)
    if ds is None or ds.owner_id != key.owner_id:
        raise not_found("dataset", ident)
    ds_shape = tuple(ds.input_shape)
    if shape is not None and tuple(shape) != ds_shape:
        raise invalid(f"input_shape {tuple(shape)} is not the data set's {ds_shape}")
    ds_names = validate_npz(store.local_path(ds.storage_key)).class_names
    if names is not None and names != ds_names:
        raise invalid(f"class_names {names} are not the data set's {ds_names}")
    return Declared(ds_shape, ds.num_classes, ds_names, ds.id)


def _check_onnx(path: Path, output: str, decl: Declared) -> dict[str, Any]:
    try:
        _, summary = load_onnx(path.read_bytes(), output, decl.input_shape, decl.num_classes)  # type: ignore[arg-type]
    except ValueError as e:
        raise invalid(f"ONNX model refused: {e}") from None
    names = decl.class_names or [str(i) for i in range(summary.num_classes)]
    if len(names) != summary.num_classes:
        raise invalid(f"{len(names)} class_names for a model with {summary.num_classes} classes")
    return {
        "arch": "onnx",
        "input_shape": list(summary.input_shape),
        "num_classes": summary.num_classes,
        "class_names": names,
    }


def _check_checkpoint(path: Path, config: bytes, decl: Declared) -> dict[str, Any]:
    try:
        meta = ModelMeta.model_validate_json(config)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(map(str, first["loc"]))
        raise invalid(f"model config refused: {where + ': ' if where else ''}{first['msg']}") from None
    try:
        model = build_from_meta(meta)
    except UnknownNameError as e:
        raise invalid(f"checkpoint refused: {e}") from None
    except ValueError as e:
        raise invalid(f"checkpoint refused: {e}") from None
    try:
        check_state(model, read_weights(path))
    except ValueError as e:
        raise invalid(f"checkpoint refused: {e}") from None
    if len(meta.class_names) != meta.num_classes:
        raise invalid(
            f"model config names {len(meta.class_names)} classes but has num_classes {meta.num_classes}"
        )
    shape = tuple(meta.input_shape)
    if decl.input_shape is not None and shape != decl.input_shape:
        raise invalid(f"the checkpoint takes inputs {shape} but the data set's are {decl.input_shape}")
    if decl.num_classes is not None and meta.num_classes != decl.num_classes:
        raise invalid(
            f"the checkpoint has {meta.num_classes} classes but the data set has {decl.num_classes}"
        )
    if decl.class_names is not None and meta.class_names != decl.class_names:
        raise invalid(
            f"the checkpoint's class_names {meta.class_names} are not the data set's {decl.class_names}"
        )
    return {
        "arch": meta.arch,
        "input_shape": list(shape),
        "num_classes": meta.num_classes,
        "class_names": meta.class_names,
    }


def register_model(
    session: Session,
    store: ArtifactStore,
    key: ApiKey,
    *,
    name: str,
    model_file: Path,
    config: bytes | None,
    output: str,
    decl: Declared,
) -> UploadedModel:
    """Validate an uploaded model, then store its files and its row; nothing is stored when it is refused."""
    if output not in OUTPUTS:
        raise invalid(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")
    fmt = "checkpoint" if config is not None else "onnx"
    if fmt == "checkpoint":
        facts = _check_checkpoint(model_file, config, decl)  # type: ignore[arg-type]
    else:
        facts = _check_onnx(model_file, output, decl)
    stored = store.put_file(model_file)
    config_key = store.put_bytes(config).key if config is not None else None
    row = UploadedModel(
        owner_id=key.owner_id,
        name=name,
        format=fmt,
        sha256=stored.sha256,
        size_bytes=stored.size,
        storage_key=stored.key,
        config_key=config_key,
        output=output,
        dataset_id=decl.dataset_id,
        **facts,
    )
    session.add(row)
    session.commit()
    return row


def list_models(session: Session, key: KeyInfo, limit: int, cursor: str | None) -> UploadedModelList:
    """The owner's uploaded models, newest first."""
    q = select(UploadedModel).where(UploadedModel.owner_id == key.owner_id)
    rows, next_cursor = newest_first(session, q, UploadedModel.created_at, UploadedModel.id, limit, cursor)
    return UploadedModelList(
        items=[UploadedModelOut.model_validate(r) for (r,) in rows], next_cursor=next_cursor
    )
