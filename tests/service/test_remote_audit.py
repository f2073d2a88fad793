"""Auditing an owner's model deployed elsewhere, without its weights: the owner uploads the data, the model
runs behind KServe's ModelServer (a real v2 server started by the test, serving an ONNX file cmim never
stored); the job's teacher is that endpoint. The audit asks it within the query cap (counted by the
server), runs the budgets the cap allows, says it audited the model as deployed, and publishes nothing to
serve; the same audit again asks the server nothing (the answers are kept in the store). On the embedded
default (in process) and on the deployed stack (uvicorn, a Celery worker, Redis, PostgreSQL)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from owner_models import spiral
from remote_helpers import LIMITS, export_onnx, kserve_rows, kserve_server
from service_helpers import Trained, assert_problem, service_settings
from test_api_datasets import upload
from test_e2e import Stack, deployed, follow, statuses, submit  # noqa: F401 - deployed: a fixture

from app.core.db import session_scope
from app.core.models import Job
from ml.data import load_dataset
from ml.train import TrainConfig, train_model
from worker.pipeline import run_job

SECRET_HEADER = "Bearer deployed-model-token-51c2e8"
CAP = 3000
AUDIT: dict[str, Any] = {
    "students": ["mlp"],
    "attacks": ["kd", "hard_label", "fm"],  # fm asks mixes: new inputs; the others the data itself
    "attack_params": {"kd": {"T": 4.0}, "fm": {}},
    "seeds": 1,
    "epochs": 2,
    "ls_eps": [0.0],
    "ls_mixup": False,
    "null_archs": [],
    "query_budgets": [40, 100, 1_000_000],  # the last is over the cap
}


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The owner's data (an npz to upload) and its model as trained and exported elsewhere (ONNX)."""
    tmp = tmp_path_factory.mktemp("owner_files")
    npz = spiral(tmp / "spiral.npz")
    recipe = TrainConfig(dataset="npz", arch="mlp", objective="ce", epochs=20, seed=0, device="cpu")
    model = train_model(recipe, load_dataset("npz", path=str(npz))).model
    return npz, export_onnx(model, (2,), tmp / "deployed.onnx")


def endpoint(base: str) -> dict[str, Any]:
    return {"url": base, "protocol": "v2", "model": "spiral", "max_queries": CAP,
            "headers": {"Authorization": SECRET_HEADER}}  # fmt: skip


@pytest.fixture(scope="module")
def owner(sqlite_url: str, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    tmp = tmp_path_factory.mktemp("remote_audit")
    return Trained(service_settings(sqlite_url, tmp, **LIMITS), tmp)


def body(dataset_id: str | None, remote: dict[str, Any]) -> dict[str, Any]:
    teacher = {"dataset": "npz", "arch": "mlp", "epochs": 2, "endpoint": remote}
    return {"teacher": teacher, "dataset_id": dataset_id, "audit": AUDIT}


def audited(owner: Trained, job: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Submitted through the API, run by the embedded worker: (job id, report)."""
    r = owner.client.post("/api/v1/jobs", json=job, headers=owner.headers)
    assert r.status_code == 202, r.text
    assert SECRET_HEADER not in r.text and "deployed-model-token" not in r.text
    job_id = r.json()["id"]
    assert run_job(job_id, owner.settings) == "succeeded"
    report = owner.client.get(f"/api/v1/jobs/{job_id}/report", headers=owner.headers)
    assert report.status_code == 200, report.text
    return job_id, report.json()


def test_a_deployed_model_is_audited_through_its_endpoint(owner: Trained, made: tuple[Path, Path]) -> None:
    npz, onnx = made
    r = upload(owner.client, owner, npz.read_bytes(), name="spiral")
    assert r.status_code == 201, r.text
    dataset_id = r.json()["id"]
    with kserve_server({"spiral": onnx, "capped": onnx}, owner.tmp) as (base, count):
        remote = endpoint(base)
        # refused before anything is asked: no data set, a cap that pays for no phase (the data's 240
        # answers, then budget 40's 168 at the least)
        assert_problem(owner.client.post("/api/v1/jobs", json=body(None, remote), headers=owner.headers), 422)
        low = body(dataset_id, remote | {"max_queries": 300})
        problem = assert_problem(owner.client.post("/api/v1/jobs", json=low, headers=owner.headers), 422)
        assert "query cap is 300" in str(problem) and "is 408" in str(problem) and kserve_rows(count) == {}
        policy = body(dataset_id, remote) | {"audit": AUDIT | {"policy": {"detector": "prada"}}}
        both = body(dataset_id, remote)
        both["teacher"]["model_id"] = str(uuid.uuid4())
        for refused in (policy, both):
            assert_problem(owner.client.post("/api/v1/jobs", json=refused, headers=owner.headers), 422)

        job_id, report = audited(owner, body(dataset_id, remote))
        sent = kserve_rows(count)["spiral"]  # the server's own count
        deployed = report["deployed"]
        assert deployed["sent"] == sent == deployed["asked"] <= CAP and deployed["from_cache"] == 0
        assert deployed["budgets_run"] == [40, 100] and deployed["budgets_skipped"] == [1_000_000]
        assert deployed["endpoint"]["header_names"] == ["Authorization"]
        assert sorted(report["budgets"]["teacher"]) == ["100", "40"] and report["students"]["mlp"]["attacks"]
        assert report["teacher"]["serving"]["served_as"].startswith("as deployed at http://127.0.0.1:")
        assert report["findings"]["serving"]["served_as"] == report["teacher"]["serving"]["served_as"]
        assert "cmim does not serve this model" in report["findings"]["next_steps"][0]
        assert "did not allow the budgets 1,000,000" in report["statement"]["text"]
        assert "served model's default per-key budget" not in report["statement"]["text"]  # cmim serves none
        assert "Evidence of theft was not prepared" in report["findings"]["evidence"]
        assert report.get("evidence") is None and report["verdict"] in ("distillable", "undistillable",
                                                                          "inconclusive")  # fmt: skip

        # the same audit again (another job): every answer comes from the store, the server is asked nothing
        again_id, again = audited(owner, body(dataset_id, remote))
        assert kserve_rows(count)["spiral"] == sent
        assert again["deployed"]["sent"] == 0 and again["deployed"]["from_cache"] == sent
        assert again["teacher"]["accuracy"] == report["teacher"]["accuracy"]

        # a cap below the unlimited phase (560): the budgets it pays for, and a verdict at the largest
        _, small = audited(owner, body(dataset_id, remote | {"model": "capped", "max_queries": 500}))
        capped = small["deployed"]
        assert kserve_rows(count)["capped"] == capped["sent"] == capped["asked"] <= 500
        assert capped["budgets_run"] == [40] and capped["budgets_skipped"] == [100, 1_000_000]
        assert capped["unlimited_phase"] is False and small["verdict_budget"] == 40
        assert "the unlimited attacker was not measured" in capped["text"]
        assert "safe budget is at most 40" in small["statement"]["text"]
        assert small["students"]["mlp"]["attacks"]["kd"]["queries"] == 40
        assert any("unlimited attacker" in w for w in small["findings"]["why"])
        assert (small["safe_budget"]["teacher"]["mlp"] or 0) <= 40

    # the headers are stored sealed, shown by name only; cmim serves no model for such a job
    job = owner.client.get(f"/api/v1/jobs/{job_id}", headers=owner.headers)
    assert SECRET_HEADER not in job.text and job.json()["spec"]["teacher"]["endpoint"]["header_names"]
    with session_scope(owner.settings.database_url) as s:
        stored = s.get(Job, uuid.UUID(job_id))
        assert stored is not None and "headers" not in stored.spec["teacher"]["endpoint"]
    names = {
        a["name"] for a in owner.client.get(f"/api/v1/jobs/{job_id}/artifacts", headers=owner.headers).json()
    }
    assert not names & {"model.safetensors", "model.onnx", "model.json"}, names
    r = owner.client.post(
        f"/api/v1/models/{again_id}/predict", json={"inputs": [[0.1, 0.2]]}, headers=owner.headers
    )
    assert "served elsewhere" in assert_problem(r, 409)["detail"]
    r = owner.client.post(f"/api/v1/models/{job_id}/verify", json={"answers": [0] * 8}, headers=owner.headers)
    assert "audited as deployed" in assert_problem(r, 409)["detail"]  # no challenge was prepared for it


def test_the_deployed_stack_audits_it_too(deployed: Stack, made: tuple[Path, Path]) -> None:  # noqa: F811
    npz, onnx = made
    r = httpx.post(
        f"{deployed.base}/api/v1/datasets", params={"name": "spiral"}, content=npz.read_bytes(),
        headers=deployed.headers | {"Content-Type": "application/octet-stream"}, timeout=30,
    )  # fmt: skip
    assert r.status_code == 201, r.text
    with kserve_server({"spiral": onnx}, deployed.tmp) as (base, count):
        reports = []
        for _ in range(2):  # the second audit asks the server nothing
            job_id = submit(deployed, body(r.json()["id"], endpoint(base)))
            assert statuses(follow(deployed, job_id))[-1] == "succeeded", deployed.logs()
            reports.append(deployed.get(f"/api/v1/jobs/{job_id}/report").json())
        sent = kserve_rows(count)["spiral"]
    first, again = (x["deployed"] for x in reports)
    assert (
        first["sent"] == first["asked"] == sent <= CAP and again["sent"] == 0 and again["from_cache"] == sent
    )
    assert first["budgets_run"] == [40, 100] and reports[0]["teacher"]["serving"]["served_as"].startswith(
        "as deployed at "
    )
