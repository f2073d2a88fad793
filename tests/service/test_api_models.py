"""A really trained tiny job per back end, then its artifacts, report and inference endpoints."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from service_helpers import Trained, assert_problem, copy_job, job_body, service_settings

from app.main import create_app
from ml.oracle import OutputMode, apply_output_mode


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def trained(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    tmp = tmp_path_factory.mktemp("trained")
    settings = service_settings(request.getfixturevalue(f"{request.param}_url"), tmp, predict_max_batch=8)
    trained = Trained(settings, tmp)
    trained.job_id = trained.submit(job_body())
    return trained


X = torch.randn(3, 1, 40, generator=torch.Generator().manual_seed(1))


def test_report_and_artifacts(trained: Trained) -> None:
    c, h, job = trained.client, trained.headers, trained.job_id
    assert c.get(f"/api/v1/jobs/{job}", headers=h).json()["status"] == "succeeded"
    report = c.get(f"/api/v1/jobs/{job}/report", headers=h).json()
    assert report["verdict"] in {"undistillable", "distillable", "inconclusive"}
    rows = set(report["students"]["mlp"]["attacks"])
    assert "hard_label" in rows and any(r.startswith("kd") for r in rows)
    assert "control" in report
    names = {a["name"]: a for a in c.get(f"/api/v1/jobs/{job}/artifacts", headers=h).json()}
    assert set(names) == {"model.safetensors", "model.json", "report.json", "monitor.json", "serving.json"}
    etag = f'"{names["model.json"]["sha256"]}"'
    r = c.get(f"/api/v1/jobs/{job}/artifacts/model.json", headers=h | {"If-None-Match": etag})
    assert r.status_code == 304
    html = c.get(f"/api/v1/jobs/{job}/report.html", headers=h)
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    assert html.text.count("<svg") >= 4 and report["verdict"] in html.text
    assert "What this protection stops and what it does not" in html.text
    assert report["statement"]["text"].split(".")[0] in html.text  # "Served as full probabilities"
    assert "<script" not in html.text and "src=" not in html.text


def test_v2_metadata_ready_and_infer_match_the_local_model(trained: Trained) -> None:
    c, h, job = trained.client, trained.headers, trained.job_id
    meta = c.get(f"/v2/models/{job}", headers=h).json()
    assert meta["inputs"][0]["shape"] == [-1, 1, 40] and meta["outputs"][0]["shape"] == [-1, 10]
    assert c.get(f"/v2/models/{job}/ready", headers=h).json() == {"name": job, "ready": True}
    body = {
        "id": "q1",
        "inputs": [{"name": "input", "shape": [3, 1, 40], "datatype": "FP32", "data": X.flatten().tolist()}],
    }
    r = c.post(f"/v2/models/{job}/infer", json=body, headers=h)
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    served = torch.tensor(out["probabilities"]["data"]).reshape(out["probabilities"]["shape"])
    with torch.no_grad():
        expected = apply_output_mode(torch.softmax(trained.local_model(job)(X), -1), OutputMode())
    torch.testing.assert_close(served, expected, rtol=1e-5, atol=1e-6)
    assert out["label"]["data"] == expected.argmax(-1).tolist()
    simple = c.post(f"/api/v1/models/{job}/predict", json={"inputs": X.tolist()}, headers=h).json()
    assert [p["label"] for p in simple["predictions"]] == out["label"]["data"]
    # Served without a policy: no refused output, nothing refused, no policy reported.
    assert list(out) == ["probabilities", "label"] and [o["name"] for o in meta["outputs"]] == list(out)
    assert meta["parameters"]["policy"] is None and simple["policy"] is None
    assert not any(p["refused"] for p in simple["predictions"])


@pytest.mark.parametrize(
    "body",
    [
        {"inputs": [{"name": "input", "shape": [1, 40], "datatype": "FP32", "data": [0.0] * 40}]},
        {"inputs": [{"name": "input", "shape": [2, 1, 40], "datatype": "FP32", "data": [0.0] * 40}]},
        {"inputs": [{"name": "input", "shape": [9, 1, 40], "datatype": "FP32", "data": [0.0] * 360}]},
        {"inputs": [{"name": "input", "shape": [1, 1, 40], "datatype": "FP32", "data": ["a"] * 40}]},
        {"inputs": []},
    ],
    ids=["wrong-shape", "wrong-count", "over-batch-cap", "not-numbers", "no-input"],
)
def test_bad_inference_input_is_422(trained: Trained, body: dict[str, Any]) -> None:
    assert_problem(
        trained.client.post(f"/v2/models/{trained.job_id}/infer", json=body, headers=trained.headers), 422
    )


def test_predict_wrong_shape_or_nan_is_422(trained: Trained) -> None:
    url = f"/api/v1/models/{trained.job_id}/predict"
    assert_problem(trained.client.post(url, json={"inputs": [[0.0] * 40]}, headers=trained.headers), 422)
    nan = {"inputs": [[[float("nan")] * 40]]}
    r = trained.client.post(
        url,
        content=str(nan).replace("nan", "NaN").replace("'", '"'),
        headers=trained.headers | {"Content-Type": "application/json"},
    )
    assert_problem(r, 422)


def test_query_budget_is_enforced_and_reported(trained: Trained) -> None:
    h = trained.key(query_budget=5)
    url = f"/api/v1/models/{trained.job_id}/predict"
    ok = trained.client.post(url, json={"inputs": X.tolist()}, headers=h)
    assert ok.status_code == 200
    assert ok.headers["x-query-budget-limit"] == "5" and ok.headers["x-query-budget-remaining"] == "2"
    over = assert_problem(trained.client.post(url, json={"inputs": X.tolist()}, headers=h), 429)
    assert "budget" in over["detail"]
    # The refused rows were not charged.
    still = trained.client.post(url, json={"inputs": X[:2].tolist()}, headers=h)
    assert still.status_code == 200 and still.headers["x-query-budget-remaining"] == "0"


def test_rate_limit_is_enforced_and_reported(trained: Trained) -> None:
    h = trained.key(rate_limit_per_minute=2)
    url = f"/api/v1/models/{trained.job_id}/predict"
    first = trained.client.post(url, json={"inputs": X[:1].tolist()}, headers=h)
    assert first.headers["x-ratelimit-limit"] == "2" and first.headers["x-ratelimit-remaining"] == "1"
    assert trained.client.post(url, json={"inputs": X[:1].tolist()}, headers=h).status_code == 200
    r = trained.client.post(url, json={"inputs": X[:1].tolist()}, headers=h)
    assert_problem(r, 429)
    assert int(r.headers["retry-after"]) >= 1


def test_predict_needs_its_scope_and_a_finished_job(trained: Trained) -> None:
    assert_problem(
        trained.client.get(f"/v2/models/{trained.job_id}", headers=trained.key(scopes=["jobs:read"])), 403
    )
    queued = trained.client.post("/api/v1/jobs", json=job_body(), headers=trained.headers).json()["id"]
    assert_problem(trained.client.get(f"/v2/models/{queued}/ready", headers=trained.headers), 409)
    assert_problem(trained.client.get(f"/api/v1/jobs/{queued}/report", headers=trained.headers), 409)


def test_label_only_serving_answers_one_hot(trained: Trained) -> None:
    job = trained.submit(job_body(**{"audit.output_mode": {"kind": "label"}}))
    r = trained.client.post(
        f"/api/v1/models/{job}/predict", json={"inputs": X.tolist()}, headers=trained.headers
    )
    body = r.json()
    assert body["output_mode"]["kind"] == "label"
    for p in body["predictions"]:
        assert sorted(p["scores"]) == [0.0] * 9 + [1.0] and p["scores"][p["label"]] == 1.0


def test_a_global_budget_caps_the_model_over_every_key(trained: Trained) -> None:
    model = copy_job(trained.settings.database_url, uuid.UUID(trained.job_id))  # a model no test used
    settings = trained.settings.model_copy(update={"global_query_budget": 4})
    url = f"/api/v1/models/{model}/predict"
    with TestClient(create_app(settings)) as c:
        first, second = trained.key(), trained.key()
        assert c.post(url, json={"inputs": X.tolist()}, headers=first).status_code == 200
        over = assert_problem(c.post(url, json={"inputs": X[:2].tolist()}, headers=second), 429)
        assert over["budget"]["scope"] == "global" and over["budget"]["used"] == 3
        assert "CMIM_GLOBAL_QUERY_BUDGET" in over["detail"]
        assert c.post(url, json={"inputs": X[:1].tolist()}, headers=second).status_code == 200
        meta = c.get(f"/v2/models/{model}", headers=second).json()["parameters"]["query_budget"]
        assert (
            meta["global"] | {"used": 4, "remaining": 0, "limit": 4} == meta["global"] and meta["used"] == 1
        )


def test_a_request_refused_before_answering_charges_nothing(trained: Trained) -> None:
    h = trained.key(query_budget=3)
    url = f"/v2/models/{trained.job_id}/infer"
    body = {
        "inputs": [{"name": "input", "shape": [3, 1, 40], "datatype": "FP32", "data": X.flatten().tolist()}]
    }
    bad = assert_problem(
        trained.client.post(url, json=body | {"outputs": [{"name": "logits"}]}, headers=h), 422
    )
    assert "unknown output" in bad["detail"] and bad["error"] == bad["detail"]
    ok = trained.client.post(url, json=body | {"outputs": [{"name": "label"}]}, headers=h)
    assert ok.status_code == 200 and [o["name"] for o in ok.json()["outputs"]] == ["label"]
    assert ok.headers["x-query-budget-remaining"] == "0"
