"""Owners' own models: multipart uploads (streamed under the upload byte cap, validated before anything is
stored) of an ONNX file or a zoo checkpoint, and their listing."""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path

from fastapi import Request, Response
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from app.api.deps import DatasetsRead, DatasetsWrite, upload_slot
from app.api.model_router import router
from app.api.params import Cursor, Limit
from app.core.config import Settings
from app.core.keys import KeyInfo
from app.core.models import UploadedModel
from app.core.storage import ArtifactStore
from app.problems import Problem
from app.services import uploaded_models
from app.services.access import SessionDep, SettingsDep, StoreDep
from app.services.schemas import UploadedModelList, UploadedModelOut, text_field
from app.services.tenancy import get_owned
from app.services.uploaded_models import declared, invalid, register_model
from app.services.uploads import capped

TAGS = ["models (yours)"]

FIELDS = {
    "file": "the model: an .onnx file, or a checkpoint's model.safetensors",
    "config": "a checkpoint's model.json (the config `ml/checkpoint.py` writes); absent for ONNX",
    "name": "a label for the model",
    "dataset_id": "an uploaded data set the model answers for: its input shape, classes and class names "
    "are checked against the model's",
    "output": "what an ONNX model outputs: logits (default) or probabilities",
    "input_shape": "JSON list, one example's shape without the batch axis (fills an ONNX model's "
    "symbolic dims when no dataset_id is given)",
    "class_names": "JSON list of the class names (default: the data set's, else 0..C-1)",
}
UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "description": "multipart/form-data. ONNX: `curl -F file=@model.onnx -F dataset_id=$DS ...`; "
        "checkpoint: `curl -F file=@model.safetensors -F config=@model.json -F dataset_id=$DS ...`",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        k: {"type": "string", "description": d}
                        | ({"format": "binary"} if k in ("file", "config") else {})
                        for k, d in FIELDS.items()
                    },
                }
            }
        },
    }
}


def _spill(upload: UploadFile, directory: Path) -> Path:
    """The uploaded part as a file of its own (the validators and the store read files)."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=directory, suffix=".model")
    upload.file.seek(0)
    with os.fdopen(fd, "wb") as out:
        while chunk := upload.file.read(1 << 20):
            out.write(chunk)
    return Path(name)


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _name(given: str | None, filename: str | None) -> str:
    """The model's label: the `name` field, else the file's name, each checked as text; cut to the
    column's 200 characters."""
    if given:
        return text_field(given, ["body", "name"])[:200]
    if filename:
        return text_field(filename, ["body", "file", "filename"])[:200]
    return "model"


@router.post(
    "",
    tags=TAGS,
    status_code=201,
    response_model=UploadedModelOut,
    openapi_extra=UPLOAD_BODY,
    summary="Upload your own model (ONNX or zoo checkpoint, multipart)",
)
async def upload_model(
    request: Request,
    response: Response,
    key: DatasetsWrite,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
) -> UploadedModelOut:
    with upload_slot(request):  # the same slots as data sets: a model is held in memory while checked
        return await _upload_model(request, response, key, session, settings, store)


async def _upload_model(
    request: Request,
    response: Response,
    key: KeyInfo,
    session: Session,
    settings: Settings,
    store: ArtifactStore,
) -> UploadedModelOut:
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise Problem(
            415,
            "send the model as multipart/form-data (fields: " + ", ".join(FIELDS) + ")",
            slug="unsupported",
        )
    body = capped(request.stream(), settings.upload_max_bytes, request.headers.get("content-length"))
    parser = MultiPartParser(request.headers, body, max_files=2, max_fields=10)
    try:
        form = await parser.parse()
    except MultiPartException as e:
        raise invalid(f"malformed multipart body: {e.message}") from None
    unknown = sorted(set(form.keys()) - set(FIELDS))
    if unknown:
        raise invalid(f"unknown field(s) {', '.join(unknown)}; valid fields: {', '.join(FIELDS)}")
    upload, config = form.get("file"), form.get("config")
    if not isinstance(upload, UploadFile):
        raise invalid("missing the model file: send it as the form field `file`")
    if config is not None and not isinstance(config, UploadFile):
        raise invalid("`config` must be the model.json file (curl -F config=@model.json)")
    path = await run_in_threadpool(_spill, upload, Path(settings.work_dir) / "uploads")
    try:
        if path.stat().st_size == 0:
            raise invalid("empty model file")
        config_bytes = await config.read() if config is not None else None
        decl = await run_in_threadpool(
            declared,
            session,
            store,
            key,
            _text(form.get("dataset_id")),
            _text(form.get("input_shape")),
            _text(form.get("class_names")),
        )
        row = await run_in_threadpool(
            register_model,
            session,
            store,
            key,
            name=_name(_text(form.get("name")), upload.filename),
            model_file=path,
            config=config_bytes,
            output=_text(form.get("output")) or "logits",
            decl=decl,
        )
    finally:
        path.unlink(missing_ok=True)
        await form.close()
    response.headers["Location"] = f"/api/v1/models/{row.id}"
    return UploadedModelOut.model_validate(row)


@router.get("", tags=TAGS, response_model=UploadedModelList, summary="Your uploaded models, newest first")
def list_models(
    key: DatasetsRead, session: SessionDep, limit: Limit = 50, cursor: Cursor = None
) -> UploadedModelList:
    return uploaded_models.list_models(session, key, limit, cursor)


@router.get("/{model_id}", tags=TAGS, response_model=UploadedModelOut, summary="One uploaded model")
def get_model(model_id: uuid.UUID, key: DatasetsRead, session: SessionDep) -> UploadedModelOut:
    return UploadedModelOut.model_validate(get_owned(session, UploadedModel, model_id, key, "model"))
