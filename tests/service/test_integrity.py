"""Every read of a stored object is checked against its sha256, on a local directory and on S3: one
changed byte in a report, a model's weights or an uploaded data set is refused with a problem of its
own (and an error in the log naming the object), never served or trained on; untouched objects read
as before."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from service_helpers import Trained, assert_problem, job_body, service_settings
from test_api_datasets import good_arrays, npz_bytes
from test_dashboard_session import sign_in
from test_storage import changed, s3_endpoint  # noqa: F401 - s3_endpoint: a fixture

from app.core.storage import ArtifactStore, object_key
from app.main import create_app
from worker.pipeline import run_job

CORRUPT = "urn:cmim:problem:artifact-corrupt"
# Each back end once, each store once: what is checked lies in the store, not in the database.
BACK_ENDS = [("sqlite", "file"), ("postgresql", "s3")]
X = torch.randn(2, 1, 40, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", params=BACK_ENDS, ids=["-".join(b) for b in BACK_ENDS])
def owner(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """An owner with one succeeded job, its artifacts on a local directory or on the S3 server."""
    db, kind = request.param
    tmp = tmp_path_factory.mktemp(kind)
    changes = {}
    if kind == "s3":
        bucket = f"cmim-{uuid.uuid4().hex[:12]}"
        endpoint = request.getfixturevalue("s3_endpoint")
        changes = {"artifact_url": f"s3://{bucket}/artifacts", "s3_endpoint_url": endpoint}
    settings = service_settings(request.getfixturevalue(f"{db}_url"), tmp, **changes)
    if kind == "s3":
        ArtifactStore.from_settings(settings).fs.mkdir(bucket)
    owner = Trained(settings, tmp)
    owner.job_id = owner.submit(job_body(**{"audit.control": False, "audit.attacks": ["hard_label"]}))
    return owner


def store_and_keys(owner: Trained) -> tuple[ArtifactStore, dict[str, str]]:
    """The owner's store and the storage key of each artifact of its job, by name."""
    listed = owner.client.get(f"/api/v1/jobs/{owner.job_id}/artifacts", headers=owner.headers).json()
    return ArtifactStore.from_settings(owner.settings), {a["name"]: object_key(a["sha256"]) for a in listed}


def fresh_client(owner: Trained, tmp_path: Path) -> TestClient:
    """Another API process: no model loaded yet, no cached copies."""
    return TestClient(create_app(owner.settings.model_copy(update={"cache_dir": str(tmp_path / "cache")})))


def assert_refused(response: object, key: str, caplog: pytest.LogCaptureFixture) -> None:
    """A 502 of its own type naming the object's hash, and an error in the log naming the object."""
    body = assert_problem(response, 502)
    expected = key.removeprefix("objects/sha256/").replace("/", "")
    assert body["type"] == CORRUPT and body["sha256"] == expected and expected in body["detail"]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(key in e and expected in e for e in errors), errors
    caplog.clear()


def test_a_changed_report_is_refused_and_logged(
    owner: Trained, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store, keys = store_and_keys(owner)
    c, h, job = owner.client, owner.headers, owner.job_id
    page = fresh_client(owner, tmp_path)
    sign_in(page, owner.secret)
    with changed(store, keys["report.json"]):
        for url in ("artifacts/report.json", "report", "report.html"):
            assert_refused(c.get(f"/api/v1/jobs/{job}/{url}", headers=h), keys["report.json"], caplog)
        compare = page.get(f"/compare?a={job}")  # the dashboard answers with its error page
        assert compare.status_code == 502 and compare.headers["content-type"].startswith("text/html")
        assert "failed its integrity check" in compare.text
        owner.download(job, "model.json")  # an untouched artifact is served as before
    assert c.get(f"/api/v1/jobs/{job}/report", headers=h).json()["job_id"] == job  # put back: served


def test_changed_weights_are_not_served(
    owner: Trained, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store, keys = store_and_keys(owner)
    h, job, weights = owner.headers, owner.job_id, keys["model.safetensors"]
    predict = {"url": f"/api/v1/models/{job}/predict", "json": {"inputs": X.tolist()}, "headers": h}
    with changed(store, weights):
        c = fresh_client(owner, tmp_path)
        assert_refused(c.post(**predict), weights, caplog)
        assert_refused(c.get(f"/api/v1/jobs/{job}/artifacts/model.safetensors", headers=h), weights, caplog)
    r = fresh_client(owner, tmp_path).post(**predict)  # put back: served
    assert r.status_code == 200 and len(r.json()["predictions"]) == 2, r.text


def test_a_job_on_a_changed_data_set_fails_with_the_reason(owner: Trained) -> None:
    c, h = owner.client, owner.headers
    r = c.post(
        "/api/v1/datasets?name=changed",
        content=npz_bytes(**good_arrays()),
        headers=h | {"Content-Type": "application/octet-stream"},
    )
    assert r.status_code == 201, r.text
    ds = r.json()
    store, key = ArtifactStore.from_settings(owner.settings), object_key(ds["sha256"])
    with changed(store, key):
        job = c.post("/api/v1/jobs", json=job_body(dataset_id=ds["id"]), headers=h).json()["id"]
        assert run_job(job, owner.settings) == "failed"
    error = c.get(f"/api/v1/jobs/{job}", headers=h).json()["error"]
    assert "failed its integrity check" in error and ds["sha256"] in error, error
