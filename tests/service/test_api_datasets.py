"""Dataset uploads on SQLite and PostgreSQL: streamed with a cap, validated, stored only when valid."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from service_helpers import assert_problem, job_body
from sqlalchemy import func, select

from app.core.db import session_scope
from app.core.models import Dataset


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def good_arrays(n: int = 40, length: int = 12) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "x_train": rng.normal(size=(n, length)).astype(np.float32),
        "y_train": np.arange(n) % 3,
        "x_test": rng.normal(size=(n // 2, length)).astype(np.float32),
        "y_test": np.arange(n // 2) % 3,
    }


def stored_objects(settings) -> list[Path]:
    root = Path(settings.artifact_url.removeprefix("file://")) / "objects"
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def dataset_rows(settings, owner_id) -> int:
    with session_scope(settings.database_url) as s:
        return s.scalar(select(func.count()).select_from(Dataset).where(Dataset.owner_id == owner_id))


def upload(client, caller, content, name: str = "mine"):
    return client.post(
        "/api/v1/datasets",
        params={"name": name},
        content=content,
        headers=caller.headers | {"Content-Type": "application/octet-stream"},
    )


def test_upload_validate_list_and_train_on_it(client, caller, other_caller, settings) -> None:
    data = npz_bytes(**good_arrays())
    r = upload(client, caller, data)
    assert r.status_code == 201, r.text
    ds = r.json()
    assert ds["input_shape"] == [12] and ds["num_classes"] == 3 and (ds["n_train"], ds["n_test"]) == (40, 20)
    assert ds["size_bytes"] == len(data) and r.headers["location"] == f"/api/v1/datasets/{ds['id']}"
    import hashlib

    assert ds["sha256"] == hashlib.sha256(data).hexdigest()
    assert upload(client, caller, data).json()["id"] == ds["id"]  # the same bytes again: the same dataset
    listing = client.get("/api/v1/datasets", headers=caller.headers).json()
    assert [u["id"] for u in listing["uploads"]] == [ds["id"]]
    assert "mnist1d" in [b["name"] for b in listing["builtin"]]
    assert_problem(client.get(f"/api/v1/datasets/{ds['id']}", headers=other_caller.headers), 404)
    job = client.post("/api/v1/jobs", json=job_body(dataset_id=ds["id"]), headers=caller.headers)
    assert job.status_code == 202 and job.json()["spec"]["teacher"]["dataset"] == "npz"
    # Another owner cannot train on it.
    r = client.post("/api/v1/jobs", json=job_body(dataset_id=ds["id"]), headers=other_caller.headers)
    assert_problem(r, 422)


def _pickled() -> bytes:
    arrays = good_arrays()
    arrays["y_train"] = np.array([{"evil": 1}] * 40, dtype=object)
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # numpy pickles object arrays
    return buf.getvalue()


def _with(**changes: np.ndarray) -> bytes:
    return npz_bytes(**(good_arrays() | changes))


def _traversal() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for k, v in good_arrays().items():
            npy = io.BytesIO()
            np.save(npy, v)
            zf.writestr(f"../{k}.npy" if k == "x_train" else f"{k}.npy", npy.getvalue())
    return buf.getvalue()


BAD = {
    "pickled object": (_pickled, "object"),
    "NaN": (lambda: _with(x_train=np.full((40, 12), np.nan, dtype=np.float32)), "non-finite"),
    "test label unseen in train": (lambda: _with(y_train=np.arange(40) % 3 - 1), "occur in y_test but not"),
    "float labels": (lambda: _with(y_test=np.zeros(20, dtype=np.float32)), "integers"),
    "wrong shapes": (lambda: _with(x_test=np.zeros((20, 7), dtype=np.float32)), "shape"),
    "length mismatch": (lambda: _with(y_train=np.arange(39) % 3), "labels"),
    "missing key": (lambda: npz_bytes(x_train=np.zeros((4, 3)), y_train=np.arange(4)), "missing"),
    "not a zip": (lambda: b"just some text, not an npz", "not an .npz"),
    "path traversal": (_traversal, "unsafe"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_npz_is_422_with_its_reason_and_nothing_is_stored(client, caller, settings, case) -> None:
    make, words = BAD[case]
    body = assert_problem(upload(client, caller, make()), 422)
    assert words in body["detail"], body["detail"]
    assert dataset_rows(settings, caller.owner_id) == 0
    assert stored_objects(settings) == []


def _chunks(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        yield b"\0" * size
        sent += size


def test_oversize_upload_is_413_while_streaming(client, caller, settings) -> None:
    cap = settings.upload_max_bytes
    # Streamed without a Content-Length: the cap is enforced while reading.
    assert_problem(upload(client, caller, _chunks(cap * 4)), 413)
    # Declared too large: refused before reading.
    big = npz_bytes(
        x_train=np.zeros((cap // 4, 2), np.float32),
        y_train=np.zeros(2, int),
        x_test=np.zeros((1, 2), np.float32),
        y_test=np.zeros(1, int),
    )
    assert_problem(upload(client, caller, big), 413)
    assert dataset_rows(settings, caller.owner_id) == 0
    assert stored_objects(settings) == []
    uploads_dir = Path(settings.work_dir) / "uploads"
    assert not uploads_dir.exists() or list(uploads_dir.iterdir()) == []


def test_upload_needs_write_scope(client, new_caller) -> None:
    reader = new_caller(scopes=["datasets:read"])
    assert_problem(upload(client, reader, npz_bytes(**good_arrays())), 403)
