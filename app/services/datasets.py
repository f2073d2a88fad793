"""Data sets: an owner's npz uploads (received capped, validated before anything is stored, stored once per
content) and the built-ins."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.core.config import Settings
from app.core.keys import KeyInfo
from app.core.models import Dataset
from app.core.storage import ArtifactStore, StoredObject
from app.problems import Problem
from app.services.pagination import newest_first
from app.services.schemas import DatasetList, DatasetOut
from app.services.uploads import spool
from ml.catalog import DataValidationError, NpzSummary, dataset_infos, validate_npz

ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # an npz is a zip: a local file header or an empty archive


def _zip_head(head: bytes) -> None:
    """A body that does not start as a zip archive is refused as its first bytes arrive."""
    if head not in ZIP_MAGIC:
        raise Problem(
            422, "not an .npz file (not a zip archive); save it with numpy.savez", slug="invalid-dataset"
        )


async def upload_dataset(
    session: Session,
    settings: Settings,
    store: ArtifactStore,
    key: KeyInfo,
    name: str,
    chunks: AsyncIterator[bytes],
) -> tuple[DatasetOut, bool]:
    """Store the owner's npz from a capped stream (`app.services.uploads.capped`) once it is validated;
    returns (data set, created): the same bytes uploaded before give that data set."""
    path, size = await spool(chunks, Path(settings.work_dir) / "uploads", ".npz", _zip_head)
    try:
        if size == 0:
            raise Problem(
                422, "empty upload: send the npz file's bytes as the request body", slug="invalid-dataset"
            )
        try:
            summary = await run_in_threadpool(
                validate_npz, path, max_total_bytes=settings.upload_max_decompressed_bytes
            )
        except DataValidationError as e:
            raise Problem(422, str(e), slug="invalid-dataset", title="Invalid dataset") from None
        stored = await run_in_threadpool(store.put_file, path)
    finally:
        path.unlink(missing_ok=True)
    return await run_in_threadpool(_record, session, key, name, stored, summary)


def _record(
    session: Session, key: KeyInfo, name: str, stored: StoredObject, summary: NpzSummary
) -> tuple[DatasetOut, bool]:
    existing = session.scalar(
        select(Dataset).where(Dataset.owner_id == key.owner_id, Dataset.sha256 == stored.sha256)
    )
    if existing is not None:
        return DatasetOut.model_validate(existing), False
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
    return DatasetOut.model_validate(ds), True


def list_datasets(session: Session, key: KeyInfo, limit: int, cursor: str | None) -> DatasetList:
    """The built-ins and a page of the owner's uploads, newest first."""
    q = select(Dataset).where(Dataset.owner_id == key.owner_id)
    rows, next_cursor = newest_first(session, q, Dataset.created_at, Dataset.id, limit, cursor)
    uploads = [DatasetOut.model_validate(d) for (d,) in rows]
    return DatasetList(builtin=dataset_infos(), uploads=uploads, next_cursor=next_cursor)
