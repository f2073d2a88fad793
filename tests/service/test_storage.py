"""The artifact store on a local directory, in memory, and on a real S3-compatible server (moto in server
mode, a separate process): content addressing, no partial objects, cached local copies, and a job whose
artifacts live on S3 served through the API."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from s3_server import CREDENTIALS, s3_server
from service_helpers import Trained, job_body, service_settings

from app.core.storage import CHUNK, ArtifactStore, CorruptObjectError, object_key


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    with s3_server(tmp_path_factory.mktemp("s3") / "moto.log") as endpoint:
        yield endpoint
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def make_store(kind: str, tmp: Path, s3_endpoint: str) -> ArtifactStore:
    """A store of this kind; an S3 store gets a fresh bucket on the server."""
    if kind == "file":
        return ArtifactStore(f"file://{tmp}/store", tmp / "cache")
    if kind == "memory":
        return ArtifactStore(f"memory://cmim-test-{uuid.uuid4().hex}", tmp / "cache")
    bucket = f"cmim-{uuid.uuid4().hex[:12]}"
    store = ArtifactStore(
        f"s3://{bucket}/artifacts", tmp / "cache", {"client_kwargs": {"endpoint_url": s3_endpoint}}
    )
    store.fs.mkdir(bucket)
    return store


@contextmanager
def changed(store: ArtifactStore, key: str) -> Iterator[None]:
    """One byte of the stored object flipped in place (its size kept), as a bad disk or a tamperer would;
    put back at the end."""
    path = store._path(key)
    original = store.fs.cat_file(path)
    i = len(original) // 2
    store.fs.pipe_file(path, original[:i] + bytes([original[i] ^ 1]) + original[i + 1 :])
    try:
        yield
    finally:
        store.fs.pipe_file(path, original)


@pytest.fixture(params=["file", "memory", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    endpoint = request.getfixturevalue("s3_endpoint") if request.param == "s3" else ""
    return make_store(request.param, tmp_path, endpoint)


def test_store_is_content_addressed(store: ArtifactStore) -> None:
    data = b"hello artifacts" * 1000
    obj = store.put_chunks([data[:7], data[7:]])
    assert obj.sha256 == hashlib.sha256(data).hexdigest() and obj.size == len(data)
    assert obj.key == object_key(obj.sha256) == f"objects/sha256/{obj.sha256[:2]}/{obj.sha256[2:]}"
    assert store.put_bytes(data) == obj  # stored once
    assert store.read_bytes(obj.key) == data and b"".join(store.iter_chunks(obj.key)) == data
    assert store.local_path(obj.key).read_bytes() == data
    assert store.exists(obj.key) and not store.exists(object_key("0" * 64))
    tmp_dir = store._path("tmp")
    assert not store.fs.exists(tmp_dir) or store.fs.ls(tmp_dir) == []  # no temporary left behind


def test_a_changed_object_is_refused_by_every_read(
    store: ArtifactStore, caplog: pytest.LogCaptureFixture
) -> None:
    data = bytes(range(256)) * (CHUNK // 256 * 2 + 7)  # three chunks, the last one short
    obj, other = store.put_bytes(data), store.put_bytes(b"untouched")
    with changed(store, obj.key):
        with pytest.raises(CorruptObjectError) as refused:
            store.read_bytes(obj.key)
        assert (refused.value.key, refused.value.expected) == (obj.key, obj.sha256)
        assert refused.value.actual != obj.sha256
        streamed: list[bytes] = []
        with pytest.raises(CorruptObjectError):
            streamed.extend(store.iter_chunks(obj.key))
        assert len(b"".join(streamed)) < len(data)  # the stream never ends as if whole
        for read in (store.verify, store.local_path):
            with pytest.raises(CorruptObjectError):
                read(obj.key)
        assert not (store.cache_dir / obj.key).exists()  # no cached copy of the changed bytes
        assert store.read_bytes(other.key) == b"untouched"
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 4 and all(obj.key in e and obj.sha256 in e for e in errors), errors
    assert store.read_bytes(obj.key) == data and store.local_path(obj.key).read_bytes() == data


def test_a_changed_cached_copy_is_fetched_again(
    s3_endpoint: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = make_store("s3", tmp_path, s3_endpoint)
    obj = store.put_bytes(b"weights" * 1000)
    cached = store.local_path(obj.key)
    cached.write_bytes(b"Weights" + cached.read_bytes()[7:])
    assert store.local_path(obj.key) == cached and cached.read_bytes() == b"weights" * 1000
    assert any(str(cached) in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)


def test_writing_the_same_bytes_again_repairs_a_changed_object(store: ArtifactStore) -> None:
    obj = store.put_bytes(b"report")
    store.fs.pipe_file(store._path(obj.key), b"rePort")
    assert store.put_bytes(b"report") == obj
    assert store.read_bytes(obj.key) == b"report"


def test_named_objects_are_whole_or_absent(store: ArtifactStore) -> None:
    name = "audit-results/abc-s0-full.json"
    assert store.read_named(name) is None
    store.write_named(name, b'{"records": []}')
    assert store.read_named(name) == b'{"records": []}'
    store.write_named(name, b'{"records": [1]}')  # a duplicated task writes the same name again
    assert store.read_named(name) == b'{"records": [1]}'
    tmp_dir = store._path("tmp")
    assert not store.fs.exists(tmp_dir) or store.fs.ls(tmp_dir) == []


def test_named_objects_are_deleted_by_name_or_prefix(store: ArtifactStore) -> None:
    for job in ("a", "b"):
        for task in ("s0-full", "s1-full"):
            store.write_named(f"audit-results/{job}/{task}.json", b"{}")
    store.delete_named("audit-results/a/s0-full.json")
    assert store.read_named("audit-results/a/s0-full.json") is None
    assert store.read_named("audit-results/a/s1-full.json") == b"{}"
    store.delete_named("audit-results/a")  # a job's whole prefix
    store.delete_named("audit-results/a")  # nothing there: no error
    assert store.read_named("audit-results/a/s1-full.json") is None
    assert [store.read_named(f"audit-results/b/{t}.json") for t in ("s0-full", "s1-full")] == [b"{}", b"{}"]


def test_failed_write_leaves_nothing(store: ArtifactStore) -> None:
    def chunks() -> Iterator[bytes]:
        yield b"partial"
        raise RuntimeError("client went away")

    with pytest.raises(RuntimeError):
        store.put_chunks(chunks())
    store.fs.invalidate_cache()
    root = store.root.rstrip("/")
    left = [p for p in store.fs.find(root)] if store.fs.exists(root) else []
    assert left == []


def test_a_job_publishes_to_s3_and_the_api_serves_from_it(
    s3_endpoint: str, sqlite_url: str, tmp_path: Path
) -> None:
    bucket = f"cmim-{uuid.uuid4().hex[:12]}"
    settings = service_settings(
        sqlite_url, tmp_path, artifact_url=f"s3://{bucket}/artifacts", s3_endpoint_url=s3_endpoint
    )
    store = ArtifactStore.from_settings(settings)
    store.fs.mkdir(bucket)
    owner = Trained(settings, tmp_path)
    job_id = owner.submit(job_body())
    r = owner.client.get(f"/api/v1/jobs/{job_id}/report", headers=owner.headers)
    assert r.status_code == 200 and r.json()["job_id"] == job_id
    listed = owner.client.get(f"/api/v1/jobs/{job_id}/artifacts", headers=owner.headers).json()
    for artifact in listed:  # every published object is on the S3 server, byte for byte
        path = owner.download(job_id, artifact["name"])
        key = object_key(artifact["sha256"])
        assert store.fs.exists(f"{bucket}/artifacts/{key}")
        assert store.read_bytes(key) == path.read_bytes()
    report = json.loads(owner.download(job_id, "report.json").read_text())
    assert report["job_id"] == job_id
    assert not (tmp_path / "artifacts").exists()  # nothing went to a local directory instead
