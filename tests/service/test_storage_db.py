"""Artifact store and database basics: content addressing, migrations up and down, tz-aware times."""

from __future__ import annotations

import hashlib
import uuid

import pytest
import sqlalchemy as sa

from app.core.db import get_engine, session_scope
from app.core.migrate import downgrade, upgrade
from app.core.models import ApiKey
from app.core.storage import ArtifactStore, object_key


@pytest.mark.parametrize("url", ["file://{tmp}/store", "memory://cmim-test-{rand}"])
def test_store_is_content_addressed(tmp_path, url) -> None:
    store = ArtifactStore(url.format(tmp=tmp_path, rand=uuid.uuid4().hex), tmp_path / "cache")
    data = b"hello artifacts" * 1000
    obj = store.put_chunks([data[:7], data[7:]])
    assert obj.sha256 == hashlib.sha256(data).hexdigest() and obj.size == len(data)
    assert obj.key == object_key(obj.sha256) == f"objects/sha256/{obj.sha256[:2]}/{obj.sha256[2:]}"
    assert store.put_bytes(data) == obj  # stored once
    assert store.read_bytes(obj.key) == data and b"".join(store.iter_chunks(obj.key)) == data
    assert store.local_path(obj.key).read_bytes() == data
    assert store.fs.ls(store._path("tmp")) == []  # no temporary left behind


def test_failed_write_leaves_nothing(tmp_path) -> None:
    store = ArtifactStore(f"file://{tmp_path}/store")

    def chunks():
        yield b"partial"
        raise RuntimeError("client went away")

    with pytest.raises(RuntimeError):
        store.put_chunks(chunks())
    assert [p for p in (tmp_path / "store").rglob("*") if p.is_file()] == []


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_migrations_go_down_and_up_again(backend, tmp_path, pg_databases) -> None:
    url = pg_databases.create() if backend == "postgresql" else f"sqlite:///{tmp_path / 'm.db'}"
    upgrade(url)
    tables = set(sa.inspect(get_engine(url)).get_table_names())
    assert {"api_keys", "datasets", "jobs", "job_events", "artifacts"} <= tables
    downgrade(url, "base")
    assert set(sa.inspect(get_engine(url)).get_table_names()) <= {"alembic_version"}
    upgrade(url)
    assert "jobs" in sa.inspect(get_engine(url)).get_table_names()


def test_times_come_back_timezone_aware_and_ids_as_uuids(settings) -> None:
    with session_scope(settings.database_url) as s:
        key = ApiKey(owner_id=uuid.uuid4(), name="t", prefix="p", key_hash=uuid.uuid4().hex, scopes=[])
        s.add(key)
    with session_scope(settings.database_url) as s:
        again = s.get(ApiKey, key.id)
        assert again.created_at.tzinfo is not None and isinstance(again.owner_id, uuid.UUID)


def test_sqlite_runs_in_wal_mode_with_a_busy_timeout(sqlite_url) -> None:
    with get_engine(sqlite_url).connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000
