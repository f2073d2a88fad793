"""Database basics: migrations up and down, tz-aware times, SQLite settings."""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy as sa

from app.core.db import get_engine, session_scope
from app.core.migrate import downgrade, upgrade
from app.core.models import ApiKey


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
