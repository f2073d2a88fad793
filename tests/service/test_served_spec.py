"""Serving reads what a job published (`serving.json`, `ml.served.ServedSpec`), never the job's request spec;
a job published before that artifact existed is served from a spec built once from its spec and report."""

from __future__ import annotations

import json
import uuid

import pytest
import torch
from service_helpers import Trained, copy_job, job_body, publish_serving, service_settings, unpublish_serving

from app.core.db import session_scope
from app.core.models import REPORT_NAME, SERVING_NAME, Artifact, Job
from app.core.storage import ArtifactStore
from ml.served import OutputMode, ServedSpec, served_spec

X = torch.randn(2, 1, 40, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def trained(sqlite_url: str, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    tmp = tmp_path_factory.mktemp("served")
    trained = Trained(service_settings(sqlite_url, tmp), tmp)
    trained.job_id = trained.submit(job_body())
    return trained


def _predict(trained: Trained, model: uuid.UUID) -> dict:
    r = trained.client.post(
        f"/api/v1/models/{model}/predict", json={"inputs": X.tolist()}, headers=trained.headers
    )
    assert r.status_code == 200, r.text
    return r.json()


def test_the_published_spec_is_served_not_the_jobs_request(trained: Trained) -> None:
    model = copy_job(trained.settings.database_url, uuid.UUID(trained.job_id))
    # The job asked for full probabilities (TINY_JOB); what it published says labels only.
    spec = ServedSpec(output_mode=OutputMode(kind="label"), safe_budget={"mlp": 7})
    publish_serving(trained.settings, model, trained.owner_id, spec)
    body = _predict(trained, model)
    assert body["output_mode"]["kind"] == "label"
    for p in body["predictions"]:
        assert sorted(p["scores"]) == [0.0] * 9 + [1.0]
    meta = trained.client.get(f"/v2/models/{model}", headers=trained.headers).json()
    assert meta["parameters"]["query_budget"]["model_budget"] == 7


def test_a_job_without_the_artifact_is_served_from_its_spec_and_report(trained: Trained) -> None:
    model = copy_job(
        trained.settings.database_url,
        uuid.UUID(trained.job_id),
        spec=job_body(**{"audit.output_mode": {"kind": "topk", "k": 2}}),
    )
    unpublish_serving(trained.settings.database_url, model)
    body = _predict(trained, model)
    assert body["output_mode"] == {"kind": "topk", "k": 2, "decimals": 2}
    for p in body["predictions"]:
        assert sum(1 for s in p["scores"] if s > 0) <= 2


def test_served_spec_reads_the_spec_and_the_report(trained: Trained) -> None:
    store = ArtifactStore.from_settings(trained.settings)
    with session_scope(trained.settings.database_url) as s:
        job = s.get(Job, uuid.UUID(trained.job_id))
        a = s.query(Artifact).filter_by(job_id=job.id, name=REPORT_NAME).one()
        report = json.loads(store.read_bytes(a.storage_key))
        published = s.query(Artifact).filter_by(job_id=job.id, name=SERVING_NAME).one()
        assert published.kind == "serving"
        # What the job published is what its spec and report say.
        assert ServedSpec.model_validate_json(store.read_bytes(published.storage_key)) == served_spec(
            job.spec, report
        )
    report["safe_budget"] = {"teacher": {"mlp": 12}}
    report["threat_model"] = report.get("threat_model", {}) | {
        "query_budgets": [10, 50],
        "labelled_samples": 9,
    }
    spec = served_spec(job_body(**{"serving": {"enforcement": {"on_key_alert": "throttle"}}}), report)
    assert spec.output_mode == OutputMode(kind="probs") and spec.safe_budget == {"mlp": 12}
    assert spec.enforcement.on_key_alert == "throttle"
    assert spec.budget_curve == "tested budgets 10, 50, the job's audit.query_budgets"
    assert ServedSpec.model_validate_json(spec.model_dump_json()) == spec
    assert served_spec(job_body(**{"audit.query_budgets": None}), report).budget_curve.startswith(
        "tested budgets 10, 50: the job's audit.query_budgets was null"
    )
