"""Datasets: streamed npz uploads (capped, hashed, validated before anything is stored) and the built-ins."""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from app.api.deps import (
    DatasetsRead,
    DatasetsWrite,
    SessionDep,
    SettingsDep,
    StoreDep,
    get_owned,
    upload_slot,
)
from app.core.models import Dataset
from app.problems import Problem
from app.services.schemas import DatasetList, DatasetOut, PrintableText
from ml.data import DataValidationError, dataset_infos, validate_npz

router = APIRouter(prefix="/datasets", tags=["datasets"])

UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "description": "the raw bytes of an .npz holding exactly x_train, y_train, x_test, y_test "
        "(numeric arrays, integer labels 0..C-1). Example: "
        "`curl -X POST --data-binary @data.npz -H 'Content-Type: application/octet-stream' "
        "-H 'Authorization: Bearer $KEY' '.../api/v1/datasets?name=mine'`",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # an npz is a zip: a local file header or an empty archive


def _not_npz() -> Problem:
    return Problem(
        422, "not an .npz file (not a zip archive); save it with numpy.savez", slug="invalid-dataset"
    )


async def _receive_capped(request: Request, max_bytes: int, directory: Path) -> Path:
    """Stream the body into a temporary file, refusing with 413 the moment it passes max_bytes.

    The first bytes are checked as they arrive: a body that is not a zip archive is refused at once.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise Problem(413, f"upload of {declared} bytes is over the {max_bytes}-byte limit", slug="too-large")
    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=directory, suffix=".npz")
    path, size = Path(name), 0
    try:
        with os.fdopen(fd, "wb") as out:
            head = b""
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    raise Problem(413, f"upload is over the {max_bytes}-byte limit", slug="too-large")
                if len(head) < 4:
                    head += chunk[: 4 - len(head)]
                    if len(head) == 4 and head not in ZIP_MAGIC:
                        raise _not_npz()
                out.write(chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    if size == 0:
        path.unlink(missing_ok=True)
        raise Problem(
            422, "empty upload: send the npz file's bytes as the request body", slug="invalid-dataset"
        )
    return path


@router.post(
    "",
    status_code=201,
    response_model=DatasetOut,
    openapi_extra=UPLOAD_BODY,
    summary="Upload an npz dataset (raw body)",
    responses={200: {"description": "the same bytes were uploaded before; that dataset is returned"}},
)
async def upload_dataset(
    request: Request,
    response: Response,
    key: DatasetsWrite,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    name: Annotated[
        PrintableText, Query(min_length=1, max_length=200, description="a label for the dataset")
    ] = "upload",
) -> DatasetOut:
    with upload_slot(request):
        path = await _receive_capped(request, settings.upload_max_bytes, Path(settings.work_dir) / "uploads")
        try:
            try:
                summary = await run_in_threadpool(
                    validate_npz, path, max_total_bytes=settings.upload_max_decompressed_bytes
                )
            except DataValidationError as e:
                raise Problem(422, str(e), slug="invalid-dataset", title="Invalid dataset") from None
            stored = await run_in_threadpool(store.put_file, path)
        finally:
            path.unlink(missing_ok=True)
    existing = session.scalar(
        select(Dataset).where(Dataset.owner_id == key.owner_id, Dataset.sha256 == stored.sha256)
    )
    if existing is not None:
        response.status_code = 200
        return DatasetOut.model_validate(existing)
    ds = Dataset(
        owner_id=key.owner_id,
        name=name,
        sha256=stored.sha256,
        size_bytes=stored.size,
        storage_key=stored.key,
        input_shape=list(summary.input_shape),
        num_classes=summary.num_classes,
        n_train=summary.n_train,
        n_test=summary.n_test,
    )
    session.add(ds)
    session.commit()
    response.headers["Location"] = f"/api/v1/datasets/{ds.id}"
    return DatasetOut.model_validate(ds)


@router.get("", response_model=DatasetList, summary="Built-in datasets and your uploads")
def list_datasets(key: DatasetsRead, session: SessionDep) -> DatasetList:
    uploads = session.scalars(
        select(Dataset).where(Dataset.owner_id == key.owner_id).order_by(Dataset.created_at.desc())
    ).all()
    return DatasetList(builtin=dataset_infos(), uploads=[DatasetOut.model_validate(d) for d in uploads])


@router.get("/{dataset_id}", response_model=DatasetOut, summary="One uploaded dataset")
def get_dataset(dataset_id: uuid.UUID, key: DatasetsRead, session: SessionDep) -> DatasetOut:
    return DatasetOut.model_validate(get_owned(session, Dataset, dataset_id, key, "dataset"))
