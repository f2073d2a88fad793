"""Helpers shared by the service tests."""

from __future__ import annotations

import copy
import hashlib
import http.server
import socket
import threading
import uuid
from pathlib import Path
from typing import Any

import torch
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.core.config import Settings
from app.core.db import session_scope
from app.core.keys import create_api_key, find_api_key
from app.core.models import SERVING_NAME, Artifact, Job
from app.core.storage import ArtifactStore
from app.main import create_app
from app.services.jobs import create_job
from app.services.schemas import JobCreate
from ml.checkpoint import load_checkpoint
from ml.served import ServedSpec
from worker.pipeline import run_job

PROBLEM_JSON = "application/problem+json"

# A job small enough to finish in seconds on a CPU.
TINY_JOB: dict[str, Any] = {
    "teacher": {
        "dataset": "mnist1d",
        "dataset_params": {"num_train": 500, "num_test": 500},
        "arch": "cnn1d",
        "objective": "cmim",
        "epochs": 3,
    },
    "audit": {
        "students": ["mlp"],
        "attacks": ["kd", "hard_label"],
        "seeds": 1,
        "epochs": 2,
        "ls_eps": [0.0],
        "ls_mixup": False,
        "control": True,
        "output_mode": {"kind": "probs"},  # served with full probabilities, comparable to the local model
        "query_budgets": [],  # no budget curve: the tests' keys are not capped by a safe budget
    },
}


def job_body(**changes: Any) -> dict[str, Any]:
    """TINY_JOB with dotted-path changes, e.g. job_body(**{"teacher.arch": "nope"})."""
    body = copy.deepcopy(TINY_JOB)
    for path, value in changes.items():
        *parents, last = path.split(".")
        node = body
        for p in parents:
            node = node[p]
        node[last] = value
    return body


def assert_problem(response: Any, status: int) -> dict[str, Any]:
    """The response is an RFC 9457 problem with this status; returns its body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM_JSON), response.headers
    body = response.json()
    assert body["status"] == status
    assert {"type", "title", "detail"} <= body.keys()
    return body


def service_settings(database_url: str, tmp: Path, **changes: Any) -> Settings:
    """Settings for an in-process app over database_url, its files under tmp."""
    values: dict[str, Any] = {
        "environment": "test",
        "database_url": database_url,
        "broker_url": None,
        "artifact_url": f"file://{tmp / 'artifacts'}",
        "work_dir": str(tmp / "work"),
        "cache_dir": str(tmp / "cache"),
        "secret_key_file": str(tmp / "secret.key"),
        "predict_max_batch": 64,
        "rate_limit_per_minute": 1000,
        "default_query_budget": None,
    }
    return Settings(**(values | changes))


class Trained:
    """An owner with succeeded jobs (run in-process by `submit`) and the means to call the API about them."""

    job_id: str  # the first job, when a fixture submits one

    def __init__(self, settings: Settings, tmp: Path) -> None:
        self.settings, self.tmp = settings, tmp
        with session_scope(settings.database_url) as s:
            key, self.secret = create_api_key(s)
            self.owner_id = key.owner_id
        self.client = TestClient(create_app(settings))
        self.headers = {"Authorization": f"Bearer {self.secret}"}

    def submit(self, body: dict[str, Any]) -> str:
        with session_scope(self.settings.database_url) as s:
            job, _ = create_job(
                s, self.settings, find_api_key(s, self.secret), JobCreate.model_validate(body), None
            )
        assert run_job(job.id, self.settings) == "succeeded"
        return str(job.id)

    def key(self, **kwargs: Any) -> dict[str, str]:
        with session_scope(self.settings.database_url) as s:
            _, secret = create_api_key(s, owner_id=self.owner_id, **kwargs)
        return {"Authorization": f"Bearer {secret}"}

    def download(self, job_id: str, name: str) -> Path:
        """An artifact of the job, fetched through the API (its ETag and file name checked) into tmp."""
        r = self.client.get(f"/api/v1/jobs/{job_id}/artifacts/{name}", headers=self.headers)
        assert r.status_code == 200, r.text
        assert r.headers["etag"] == f'"{hashlib.sha256(r.content).hexdigest()}"'
        assert r.headers["content-disposition"] == f'attachment; filename="{name}"'
        (self.tmp / job_id).mkdir(exist_ok=True)
        path = self.tmp / job_id / name
        path.write_bytes(r.content)
        return path

    def local_model(self, job_id: str) -> torch.nn.Module:
        return load_checkpoint(
            self.download(job_id, "model.safetensors"), self.download(job_id, "model.json")
        )[0]


def copy_job(
    database_url: str,
    job_id: uuid.UUID,
    owner_id: uuid.UUID | None = None,
    spec: dict[str, Any] | None = None,
) -> uuid.UUID:
    """Another succeeded job with the same artifacts (another model id for one checkpoint), for owner_id
    (default: the job's owner) and with spec (default: the job's). With another spec the copy publishes no
    `serving.json`: it is served from that spec, as a job published before the artifact existed."""
    with session_scope(database_url) as s:
        job = s.get(Job, job_id)
        owner = owner_id or job.owner_id
        copy = Job(
            owner_id=owner,
            status=job.status,
            spec=spec or job.spec,
            request_hash=job.request_hash,
            max_attempts=job.max_attempts,
        )
        s.add(copy)
        s.flush()
        for a in s.scalars(select(Artifact).where(Artifact.job_id == job.id)):
            if spec is not None and a.name == SERVING_NAME:
                continue
            fields = ("name", "kind", "media_type", "sha256", "size_bytes", "storage_key")
            s.add(Artifact(job_id=copy.id, owner_id=owner, **{f: getattr(a, f) for f in fields}))
        return copy.id


class Receiver:
    """A webhook receiver: a real HTTP server on 127.0.0.1 that records every POST (headers, body) and
    answers 204. `stop` takes it down (connections are refused), `start` brings it back on the same port."""

    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.received: list[tuple[dict[str, str], bytes]] = []
        self._server: http.server.ThreadingHTTPServer | None = None

    def start(self) -> None:
        received = self.received

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def unpublish_serving(database_url: str, job_id: uuid.UUID) -> None:
    """The job as published before `serving.json` existed (its serving is then built from its spec)."""
    with session_scope(database_url) as s:
        s.query(Artifact).filter(Artifact.job_id == job_id, Artifact.name == SERVING_NAME).delete()


def publish_serving(settings: Settings, job_id: uuid.UUID, owner_id: uuid.UUID, spec: ServedSpec) -> None:
    """Replace what the job published to be served through (`serving.json`) with `spec`."""
    stored = ArtifactStore.from_settings(settings).put_bytes(spec.model_dump_json().encode())
    unpublish_serving(settings.database_url, job_id)
    with session_scope(settings.database_url) as s:
        s.add(
            Artifact(
                job_id=job_id,
                owner_id=owner_id,
                name=SERVING_NAME,
                kind="serving",
                media_type="application/json",
                sha256=stored.sha256,
                size_bytes=stored.size,
                storage_key=stored.key,
            )
        )
