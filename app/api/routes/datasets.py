"""Datasets: streamed npz uploads (capped, hashed, validated before anything is stored) and the built-ins
(`app.services.datasets`)."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from app.api.deps import DatasetsRead, DatasetsWrite, upload_slot
from app.api.params import Cursor, Limit
from app.core.models import Dataset
from app.services import datasets
from app.services.access import SessionDep, SettingsDep, StoreDep
from app.services.schemas import DatasetList, DatasetOut, PrintableText
from app.services.tenancy import get_owned
from app.services.uploads import capped

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
        chunks = capped(request.stream(), settings.upload_max_bytes, request.headers.get("content-length"))
        ds, created = await datasets.upload_dataset(session, settings, store, key, name, chunks)
    if not created:
        response.status_code = 200
        return ds
    response.headers["Location"] = f"/api/v1/datasets/{ds.id}"
    return ds


@router.get("", response_model=DatasetList, summary="Built-in datasets and your uploads (newest first)")
def list_datasets(
    key: DatasetsRead, session: SessionDep, limit: Limit = 50, cursor: Cursor = None
) -> DatasetList:
    return datasets.list_datasets(session, key, limit, cursor)


@router.get("/{dataset_id}", response_model=DatasetOut, summary="One uploaded dataset")
def get_dataset(dataset_id: uuid.UUID, key: DatasetsRead, session: SessionDep) -> DatasetOut:
    return DatasetOut.model_validate(get_owned(session, Dataset, dataset_id, key, "dataset"))
