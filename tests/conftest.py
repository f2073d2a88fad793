"""Shared fixtures. Service tests use the real PostgreSQL and Redis on 127.0.0.1: if either is
missing they fail (never skip). Each test session gets its own PostgreSQL database, dropped at the end."""

from __future__ import annotations

import os
import secrets
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

PG_ADMIN_URL = os.environ.get("CMIM_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("CMIM_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
BACKENDS = ("sqlite", "postgresql")


@dataclass
class TempDatabases:
    """Creates PostgreSQL databases named cmim_test_<random> and drops them all at the end."""

    admin_url: str
    created: list[str]

    def create(self) -> str:
        name = f"cmim_test_{secrets.token_hex(6)}"
        engine = create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        engine.dispose()
        self.created.append(name)
        return make_url(self.admin_url).set(database=name).render_as_string(hide_password=False)

    def drop_all(self) -> None:
        from app.core.db import dispose_engines

        dispose_engines()
        engine = create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            for name in self.created:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        engine.dispose()


@pytest.fixture(scope="session")
def pg_databases() -> Iterator[TempDatabases]:
    dbs = TempDatabases(PG_ADMIN_URL, [])
    yield dbs
    dbs.drop_all()


@pytest.fixture(scope="session")
def postgresql_url(pg_databases: TempDatabases) -> str:
    """A fresh, migrated PostgreSQL database for this test session."""
    from app.core.migrate import upgrade

    url = pg_databases.create()
    upgrade(url)
    return url


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A fresh, migrated SQLite database file for this test session."""
    from app.core.migrate import upgrade

    url = f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'cmim.db'}"
    upgrade(url)
    return url


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The real Redis: a missing one fails the test."""
    import redis

    redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
    return REDIS_URL


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest) -> str:
    """Each test using this runs once on SQLite and once on PostgreSQL."""
    return request.getfixturevalue(f"{request.param}_url")


@pytest.fixture
def settings(db_url: str, tmp_path: Path):  # noqa: ANN201 - app.core.config.Settings
    from app.core.config import Settings

    return Settings(
        environment="test",
        database_url=db_url,
        broker_url=None,
        artifact_url=f"file://{tmp_path / 'artifacts'}",
        work_dir=str(tmp_path / "work"),
        cache_dir=str(tmp_path / "cache"),
        upload_max_bytes=256 * 1024,
        predict_max_batch=64,
        rate_limit_per_minute=1000,
        default_query_budget=None,
    )


@pytest.fixture
def client(settings):  # noqa: ANN001, ANN201 - Settings -> TestClient
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(settings)) as c:
        yield c


@dataclass
class Caller:
    """An API key of a fresh owner: every test gets its own owner, so tests never see each other's rows."""

    key: str
    owner_id: uuid.UUID
    key_id: uuid.UUID

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def make_caller(database_url: str, **kwargs: object) -> Caller:
    from app.core.db import session_scope
    from app.core.keys import create_api_key

    with session_scope(database_url) as s:
        row, secret = create_api_key(s, **kwargs)  # type: ignore[arg-type]
        return Caller(secret, row.owner_id, row.id)


@pytest.fixture
def new_caller(settings) -> Callable[..., Caller]:  # noqa: ANN001
    """Make another key: new_caller(scopes=[...], query_budget=..., owner_id=...)."""
    return lambda **kwargs: make_caller(settings.database_url, **kwargs)


@pytest.fixture
def caller(new_caller: Callable[..., Caller]) -> Caller:
    return new_caller()


@pytest.fixture
def other_caller(new_caller: Callable[..., Caller]) -> Caller:
    return new_caller()


@pytest.fixture(scope="session")
def owner_example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example of docs/models.md run as written: a folder with tabular.npz, model.onnx and
    checkpoint/ (a plain PyTorch MLP trained outside cmim, exported both ways)."""
    import re
    import subprocess
    import sys

    doc = (Path(__file__).parents[1] / "docs" / "models.md").read_text()
    code = re.search(r"```python\n(.*?)```", doc, re.S)
    assert code, "docs/models.md has no python example"
    folder = tmp_path_factory.mktemp("owner")
    (folder / "example.py").write_text(code.group(1))
    done = subprocess.run(
        [sys.executable, "example.py"], cwd=folder, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return folder
