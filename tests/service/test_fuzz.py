"""Schemathesis drives the API from its own OpenAPI: authenticated, every operation, plus stateful sequences
along the schema's links. No input may give a server error, and every response must match the schema.

A succeeded job and an uploaded dataset exist beforehand, so report, artifact, model and predict
operations are reached with real ids (the fuzzer's own ids only reach 404s there)."""

from __future__ import annotations

import io
import uuid
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance
from service_helpers import Trained, job_body, service_settings

from app.core.config import Settings
from app.core.db import session_scope
from app.core.keys import create_api_key
from app.main import create_app

CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance]
# Bounded time in CI: a few dozen cases per operation, short stateful sequences.
FUZZ = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
STATEFUL = settings(FUZZ, max_examples=15, stateful_step_count=6)


# The schema is read when the module is collected, from an app that is never started (no database, no
# background tasks); the cases are sent to an app on PostgreSQL (stricter than SQLite about types and
# ranges) built by the fixture.
schema = schemathesis.openapi.from_dict(create_app(Settings(environment="test")).openapi())


class Fuzzed:
    """The app under test, its caller's headers and the ids of real objects."""

    def __init__(self, trained: Trained, dataset_id: str) -> None:
        self.trained, self.app, self.headers = trained, trained.client.app, trained.headers
        self.own_key = trained.client.get("/api/v1/keys/me", headers=trained.headers).json()["id"]
        self.real = {
            "job_id": trained.job_id,
            "model_id": trained.job_id,
            "dataset_id": dataset_id,
            "key_id": self.spare_key(),
        }

    def spare_key(self) -> str:
        """Another key of the same owner: what a revocation aimed at a real key revokes."""
        with session_scope(self.trained.settings.database_url) as s:
            return str(create_api_key(s, owner_id=self.trained.owner_id)[0].id)

    def aim(self, case: Any) -> None:
        """Point half the cases at real objects (and submit valid jobs); a stream always at a finished job.

        The caller's own key is never revoked (schemathesis links `GET /keys/me` to `DELETE /keys/{id}`):
        a spare key of the same owner takes its place, or every later case would be a 401."""
        path = case.path_parameters or {}
        stream = case.operation.path.endswith("/events") and "after" not in (case.query or {})
        for name, real in self.real.items():
            if name in path and (stream or _coin(path[name])):
                path[name] = real
        if "key_id" in path and _same_uuid(path["key_id"], self.own_key):
            path["key_id"] = self.spare_key()
        if (case.method, case.operation.path) == ("POST", "/api/v1/jobs") and _coin(case.body):
            case.body = job_body(**{"teacher.seed": zlib.crc32(str(case.body).encode()) % 1000})


def _same_uuid(value: object, ident: str) -> bool:
    """Whether the value names this UUID in any spelling the API accepts (case, braces, no hyphens)."""
    try:
        return uuid.UUID(str(value)) == uuid.UUID(ident)
    except ValueError:
        return False


def _coin(value: object) -> bool:
    """A fair coin decided by the value itself, so a derandomized run is reproducible."""
    return zlib.crc32(str(value).encode()) % 2 == 0


@pytest.fixture(scope="module")
def fuzzed(postgresql_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    tmp = tmp_path_factory.mktemp("fuzz")
    trained = Trained(service_settings(postgresql_url, tmp, upload_max_bytes=256 * 1024), tmp)
    trained.job_id = trained.submit(job_body())
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    np.savez(
        buf,
        x_train=rng.normal(size=(40, 1, 8)).astype(np.float32),
        y_train=np.arange(40) % 2,
        x_test=rng.normal(size=(20, 1, 8)).astype(np.float32),
        y_test=np.arange(20) % 2,
    )
    r = trained.client.post(
        "/api/v1/datasets",
        content=buf.getvalue(),
        headers=trained.headers | {"Content-Type": "application/octet-stream"},
    )
    assert r.status_code == 201, r.text
    yield Fuzzed(trained, r.json()["id"])


@schema.parametrize()
@FUZZ
def test_no_input_gives_a_server_error_or_an_off_schema_answer(case: Any, fuzzed: Fuzzed) -> None:
    fuzzed.aim(case)
    case.call_and_validate(headers=fuzzed.headers, checks=CHECKS, app=fuzzed.app)


def test_stateful_sequences_along_the_links(fuzzed: Fuzzed) -> None:
    links = schema.as_state_machine()
    seen: set[tuple[str, int]] = set()

    class Sequences(links):  # type: ignore[misc, valid-type]
        def get_call_kwargs(self, case: Any) -> dict[str, Any]:
            fuzzed.aim(case)
            return {"headers": fuzzed.headers, "app": fuzzed.app}

        def validate_response(self, response: Any, case: Any, **kwargs: Any) -> None:
            seen.add((case.operation.path, response.status_code))
            case.validate_response(response, checks=CHECKS)

    Sequences.run(settings=STATEFUL)
    reached = {path for path, status in seen if status < 300}
    assert "/api/v1/jobs" in reached and any(p.startswith("/api/v1/jobs/{job_id}") for p in reached), seen


def test_the_fuzzer_reached_real_objects(fuzzed: Fuzzed) -> None:
    """The real ids answer, so the aimed cases reach reports, artifacts, the dataset and the model."""
    from fastapi.testclient import TestClient

    client, headers, job = TestClient(fuzzed.app), fuzzed.headers, fuzzed.real["job_id"]
    assert client.get(f"/api/v1/jobs/{job}/report", headers=headers).status_code == 200
    assert client.get(f"/api/v1/jobs/{job}/artifacts", headers=headers).json()
    assert client.get(f"/v2/models/{job}", headers=headers).status_code == 200
    assert client.get(f"/api/v1/datasets/{fuzzed.real['dataset_id']}", headers=headers).status_code == 200
