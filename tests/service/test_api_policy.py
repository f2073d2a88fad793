"""Models served as audited: a job's serving policy is fitted, published beside the checkpoint, and the
predict routes answer through it (`ml.policy.serve`), with per-key histories and the audited budget."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file
from service_helpers import (
    Trained,
    assert_problem,
    copy_job,
    job_body,
    publish_serving,
    service_settings,
    unpublish_serving,
)

from app.core.db import session_scope
from app.core.models import Job
from app.main import create_app
from ml.audit import serve_box
from ml.data import Dataset, load_dataset
from ml.oracle import OutputMode
from ml.policy import FittedPolicy, PolicyConfig, QueryHistory, Served, serve
from ml.served import ServedSpec

REFUSE = {"detector": "energy", "fpr": 0.2, "action": "refuse"}
SNAP = {"snap": True}
PRADA = {"detector": "prada", "prada_min_history": 20, "prada_memory": 200}
BATCH = 50


def policy_job(policy: dict[str, Any] | None = None, **changes: Any) -> dict[str, Any]:
    """A tiny job (one attack, no control) served with `policy`."""
    fast = {"teacher.epochs": 2, "audit.attacks": ["hard_label"], "audit.epochs": 1, "audit.control": False}
    if policy is not None:
        fast["audit.policy"] = policy
    return job_body(**(fast | changes))


@pytest.fixture(scope="module")
def data() -> Dataset:
    """The jobs' dataset (TINY_JOB's teacher dataset), loaded here as the pipeline loads it."""
    return load_dataset("mnist1d", num_train=500, num_test=500)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def refusing(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """A job served with an energy detector that refuses 20% of clean queries, on each back end."""
    tmp = tmp_path_factory.mktemp("refusing")
    trained = Trained(service_settings(request.getfixturevalue(f"{request.param}_url"), tmp), tmp)
    trained.job_id = trained.submit(policy_job(REFUSE))
    return trained


@pytest.fixture(scope="module")
def pg(postgresql_url: str, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """An owner on PostgreSQL for the other policies' jobs (each test submits its own)."""
    tmp = tmp_path_factory.mktemp("policies")
    return Trained(service_settings(postgresql_url, tmp), tmp)


def local_policy(trained: Trained, job: str) -> FittedPolicy:
    """The fitted policy as published: policy.json (config) + policy.safetensors (tensors)."""
    config = PolicyConfig.model_validate_json(trained.download(job, "policy.json").read_text())
    return FittedPolicy.from_tensors(config, load_file(trained.download(job, "policy.safetensors")))


def local_serve(
    model: torch.nn.Module, policy: FittedPolicy, x: torch.Tensor, history: QueryHistory | None = None
) -> Served:
    with torch.no_grad():
        logits = model(x).float()
        return serve(torch.softmax(logits, -1), logits, OutputMode(), policy, history, x)


def infer(trained: Trained, job: str, x: torch.Tensor, headers: dict[str, str]) -> dict[str, Any]:
    body = {
        "inputs": [
            {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.flatten().tolist()}
        ]
    }
    r = trained.client.post(f"/v2/models/{job}/infer", json=body, headers=headers)
    assert r.status_code == 200, r.text
    return {o["name"]: o for o in r.json()["outputs"]}


def assert_v2_matches(out: dict[str, Any], expected: Served) -> None:
    """The v2 answer is `expected`: scores (zero rows refused), labels (-1 refused), the refused flags."""
    served = torch.tensor(out["probabilities"]["data"]).reshape(out["probabilities"]["shape"])
    torch.testing.assert_close(served, expected.answer, rtol=1e-5, atol=1e-6)
    assert out["refused"]["datatype"] == "BOOL" and out["refused"]["shape"] == [len(served)]
    assert out["refused"]["data"] == expected.refused.tolist()
    assert out["label"]["data"] == expected.answer.argmax(-1).masked_fill(expected.refused, -1).tolist()


def test_the_policy_is_published_fitted_as_the_audit_fits_it(refusing: Trained, data: Dataset) -> None:
    c, h, job = refusing.client, refusing.headers, refusing.job_id
    arts = {a["name"]: a for a in c.get(f"/api/v1/jobs/{job}/artifacts", headers=h).json()}
    assert set(arts) == {
        "model.safetensors",
        "model.json",
        "report.json",
        "monitor.json",
        "serving.json",
        "policy.safetensors",
        "policy.json",
    }
    assert arts["policy.safetensors"]["kind"] == "policy" and arts["policy.json"]["kind"] == "policy_config"
    policy = local_policy(refusing, job)
    assert policy.config == PolicyConfig.model_validate(REFUSE)
    report = c.get(f"/api/v1/jobs/{job}/report", headers=h).json()
    assert report["teacher"]["serving"]["policy"] == policy.config.model_dump()
    # Refitted here from the published teacher and the same data: the same centroids and threshold
    # (up to the numerics of the worker's device, which may be a GPU).
    refit = serve_box([refusing.local_model(job)], OutputMode(), policy.config, data).policies[0]
    torch.testing.assert_close(policy.centroids, refit.centroids, rtol=1e-3, atol=1e-4)
    assert policy.threshold == pytest.approx(refit.threshold, rel=1e-3)


def test_a_refusing_policy_refuses_its_calibrated_share_and_answers_as_serve_does(
    refusing: Trained, data: Dataset
) -> None:
    c, h, job = refusing.client, refusing.headers, refusing.job_id
    model, policy = refusing.local_model(job), local_policy(refusing, job)
    half = len(data.x_test) // 2
    shares = {}
    for split, x in {"calibration": data.x_test[:half], "held_out": data.x_test[half:]}.items():
        refused = []
        for i in range(0, len(x), BATCH):
            xb = x[i : i + BATCH]
            expected = local_serve(model, policy, xb)
            assert_v2_matches(infer(refusing, job, xb, h), expected)
            simple = c.post(f"/api/v1/models/{job}/predict", json={"inputs": xb.tolist()}, headers=h).json()
            assert simple["policy"] == policy.config.model_dump()
            for p, row, no in zip(simple["predictions"], expected.answer, expected.refused, strict=True):
                if no:
                    assert p == {"label": None, "class_name": None, "scores": None, "refused": True}
                else:
                    assert not p["refused"] and p["label"] == int(row.argmax())
                    torch.testing.assert_close(torch.tensor(p["scores"]), row, rtol=1e-5, atol=1e-6)
            refused += expected.refused.tolist()
        shares[split] = sum(refused) / len(refused)
    # The threshold is the 80% quantile of the calibration half's scores; held-out queries come close.
    assert shares["calibration"] == pytest.approx(0.2, abs=0.01)
    assert shares["held_out"] == pytest.approx(0.2, abs=0.1)

    meta = c.get(f"/v2/models/{job}", headers=h).json()
    assert [o["name"] for o in meta["outputs"]] == ["probabilities", "label", "refused"]
    assert meta["parameters"]["policy"] == policy.config.model_dump()
    assert meta["parameters"]["query_budget"]["applies"] == "none"


def test_a_snapping_policy_serves_class_centroids(pg: Trained, data: Dataset) -> None:
    job = pg.submit(policy_job(SNAP))
    model, policy = pg.local_model(job), local_policy(pg, job)
    x = torch.cat([data.x_test[:20], torch.randn(10, 1, 40, generator=torch.Generator().manual_seed(0))])
    expected = local_serve(model, policy, x)
    out = infer(pg, job, x, pg.headers)
    assert_v2_matches(out, expected)
    assert not any(out["refused"]["data"])
    with torch.no_grad():
        pred = model(x).argmax(-1)
    served = torch.tensor(out["probabilities"]["data"]).reshape(len(x), -1)
    torch.testing.assert_close(served, policy.centroids[pred])
    simple = pg.client.post(f"/api/v1/models/{job}/predict", json={"inputs": x.tolist()}, headers=pg.headers)
    assert [p["label"] for p in simple.json()["predictions"]] == pred.tolist()


def test_prada_keeps_one_history_per_key(pg: Trained, data: Dataset) -> None:
    job = pg.submit(policy_job(PRADA))
    model, policy = pg.local_model(job), local_policy(pg, job)
    thief, honest = pg.key(), pg.key()
    histories = {"thief": policy.new_history(), "honest": policy.new_history()}
    g = torch.Generator().manual_seed(1)

    def synthetic() -> torch.Tensor:  # perturbations of one sample at scales spread over 4 decades
        scale = 10 ** (torch.rand(16, 1, 1, generator=g) * 4 - 3)
        return data.x_test[:1] + scale * torch.randn(16, 1, 40, generator=g)

    refused = {"thief": 0, "honest": 0}
    for i in range(4):  # the two keys' batches interleaved: neither history sees the other's queries
        for who, headers, x in [
            ("thief", thief, synthetic()),
            ("honest", honest, data.x_test[250 + 16 * i : 266 + 16 * i]),
        ]:
            expected = local_serve(model, policy, x, histories[who])
            assert_v2_matches(infer(pg, job, x, headers), expected)
            refused[who] += int(expected.refused.sum())
    assert histories["thief"].flagged and refused["thief"] >= 16
    assert not histories["honest"].flagged and refused["honest"] == 0


@pytest.fixture(scope="module")
def budgeted(pg: Trained) -> str:
    """A job without a policy whose audit ran query budgets."""
    return pg.submit(policy_job(None, **{"audit.query_budgets": [8, 16]}))


def test_the_audited_safe_budget_is_the_default_per_key_budget(pg: Trained, budgeted: str) -> None:
    job = budgeted
    report = pg.client.get(f"/api/v1/jobs/{job}/report", headers=pg.headers).json()
    limit = min(report["safe_budget"]["teacher"].values())
    meta = pg.client.get(f"/v2/models/{job}", headers=pg.headers).json()
    budget = meta["parameters"]["query_budget"]
    assert budget["applies"] == "model" and budget["limit"] == limit == budget["model_budget"]
    assert "safe budget" in budget["reason"] and budget["key_budget"] is None
    assert meta["parameters"]["policy"] is None

    url, key = f"/api/v1/models/{job}/predict", pg.key()
    x = torch.randn(limit + 1, 1, 40, generator=torch.Generator().manual_seed(2))
    if limit:
        ok = pg.client.post(url, json={"inputs": x[:limit].tolist()}, headers=key)
        assert ok.status_code == 200, ok.text
        assert ok.headers["x-query-budget-limit"] == str(limit)
        assert ok.headers["x-query-budget-remaining"] == "0"
        assert ok.headers["x-query-budget-source"] == "model"
    over = assert_problem(pg.client.post(url, json={"inputs": x[-1:].tolist()}, headers=key), 429)
    assert "safe budget" in over["detail"]

    # A key's own smaller budget applies instead; an operator's budget replaces the audited one.
    small = pg.client.get(f"/v2/models/{job}", headers=pg.key(query_budget=0)).json()
    assert (
        small["parameters"]["query_budget"] | {"applies": "key", "limit": 0}
        == small["parameters"]["query_budget"]
    )
    settings = pg.settings.model_copy(update={"model_query_budget": 3})
    with TestClient(create_app(settings)) as operated:
        budget = operated.get(f"/v2/models/{job}", headers=pg.headers).json()["parameters"]["query_budget"]
    assert budget["limit"] == 3 and budget["applies"] == "model" and "operator" in budget["reason"]


def test_a_model_audited_with_a_policy_is_never_served_without_it(pg: Trained, budgeted: str) -> None:
    """A model whose published serving names a policy (or, published before `serving.json`, whose job's spec
    has one) but whose artifacts lack the fitted policy answers 409, not the bare teacher."""
    with session_scope(pg.settings.database_url) as s:
        spec = s.get(Job, uuid.UUID(budgeted)).spec
    spec = spec | {"audit": spec["audit"] | {"policy": REFUSE}}
    legacy = copy_job(pg.settings.database_url, uuid.UUID(budgeted), spec=spec)
    unpublish_serving(pg.settings.database_url, legacy)
    published = copy_job(pg.settings.database_url, uuid.UUID(budgeted))
    refusing = ServedSpec(policy=PolicyConfig.model_validate(REFUSE))
    publish_serving(pg.settings, published, pg.owner_id, refusing)
    for copy_id in (legacy, published):
        for url in (f"/v2/models/{copy_id}", f"/v2/models/{copy_id}/ready"):
            body = assert_problem(pg.client.get(url, headers=pg.headers), 409)
            assert "policy" in body["detail"]


def test_a_zero_safe_budget_says_why_the_model_answers_nothing() -> None:
    from app.services.serving import ServedModel
    from ml.models import build_model
    from ml.oracle import OutputMode

    def served(safe: dict[str, int] | None) -> ServedModel:
        return ServedModel(
            uuid.uuid4(), uuid.uuid4(), build_model("mlp", (1, 40), 10), None, OutputMode(), safe_budget=safe
        )

    limit, why = served({"mlp": 0, "cnn1d_small": 4000}).model_budget(None)
    assert limit == 0 and "mlp: 0" in why and "CMIM_MODEL_QUERY_BUDGET" in why
    limit, why = served({"mlp": 20000}).model_budget(None)
    assert limit == 20000 and "answers no queries" not in why
    assert served({"mlp": 0}).model_budget(500) == (
        500,
        "configured by the operator (CMIM_MODEL_QUERY_BUDGET)",
    )
    assert served(None).model_budget(None)[0] is None
