"""Jobs API on SQLite and PostgreSQL: validation, idempotency, ownership, pagination, cancel, events."""

from __future__ import annotations

import uuid

import pytest
from service_helpers import assert_problem, job_body
from sqlalchemy import func, select

from app.core.db import session_scope
from app.core.models import Job
from app.services.schemas import DEMO_JOB, JobCreate


def count_jobs(settings, owner_id: uuid.UUID) -> int:
    with session_scope(settings.database_url) as s:
        return s.scalar(select(func.count()).select_from(Job).where(Job.owner_id == owner_id))


def test_demo_example_is_a_valid_job() -> None:
    JobCreate.model_validate(DEMO_JOB)


def test_openapi_has_an_example_for_every_json_body(client) -> None:
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            content = op.get("requestBody", {}).get("content", {})
            if "application/json" in content:
                ref = content["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
                assert schemas[ref].get("examples"), f"{method.upper()} {path}: body {ref} has no example"


def test_submit_returns_202_location_and_queued_job(client, caller, settings) -> None:
    r = client.post("/api/v1/jobs", json=job_body(), headers=caller.headers)
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/api/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["attempts"] == 0
    assert job["spec"]["teacher"]["arch"] == "cnn1d"
    assert client.get(r.headers["location"], headers=caller.headers).json()["id"] == job["id"]
    assert count_jobs(settings, caller.owner_id) == 1


def test_idempotency_key_returns_the_first_job(client, caller, settings) -> None:
    headers = caller.headers | {"Idempotency-Key": "abc-1"}
    first = client.post("/api/v1/jobs", json=job_body(), headers=headers)
    again = client.post("/api/v1/jobs", json=job_body(), headers=headers)
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    assert count_jobs(settings, caller.owner_id) == 1
    other = client.post("/api/v1/jobs", json=job_body(**{"teacher.epochs": 4}), headers=headers)
    assert_problem(other, 422)
    assert count_jobs(settings, caller.owner_id) == 1


@pytest.mark.parametrize(
    ("change", "loc", "choice"),
    [
        ({"teacher.arch": "resnet9000"}, ["body", "teacher", "arch"], "cnn1d"),
        ({"teacher.dataset": "imagenet"}, ["body", "teacher", "dataset"], "mnist1d"),
        ({"teacher.objective": "magic"}, ["body", "teacher"], "cmim"),
        ({"audit.attacks": ["kd", "telepathy"]}, ["body", "audit", "attacks"], "fm"),
        ({"audit.students": ["giant"]}, ["body", "audit", "students"], "mlp"),
    ],
)
def test_unknown_names_are_422_listing_choices(client, caller, settings, change, loc, choice) -> None:
    body = assert_problem(client.post("/api/v1/jobs", json=job_body(**change), headers=caller.headers), 422)
    err = body["errors"][0]
    assert err["loc"] == loc and err["type"] == "unknown_choice"
    assert choice in err["choices"] and choice in err["msg"]
    assert count_jobs(settings, caller.owner_id) == 0


@pytest.mark.parametrize(
    "change",
    [
        {"teacher.dataset_params": {"num_train": -5, "num_test": 500}},
        {"teacher.dataset_params": {"bogus": 1}},
        {"teacher.epochs": 0},
        {"audit.output_mode": {"kind": "telepathic"}},
        {"teacher.objective_params": {"lam": -1}},
        {"surprise": 1},
        {"audit.policy": {"keyed_fraction": 0.005}},  # audited, never served
    ],
)
def test_invalid_job_fields_are_422_and_nothing_is_stored(client, caller, settings, change) -> None:
    body = assert_problem(client.post("/api/v1/jobs", json=job_body(**change), headers=caller.headers), 422)
    assert body["errors"]
    assert count_jobs(settings, caller.owner_id) == 0


def test_unknown_uploaded_dataset_is_422(client, caller, settings) -> None:
    r = client.post("/api/v1/jobs", json=job_body(dataset_id=str(uuid.uuid4())), headers=caller.headers)
    assert assert_problem(r, 422)["errors"][0]["loc"] == ["body", "dataset_id"]
    assert count_jobs(settings, caller.owner_id) == 0


def test_missing_or_wrong_key_is_401(client) -> None:
    for headers in ({}, {"Authorization": "Bearer cmim_wrong"}, {"Authorization": "Basic Zm9vOmJhcg=="}):
        r = client.get("/api/v1/jobs", headers=headers)
        assert_problem(r, 401)
        assert r.headers["www-authenticate"] == "Bearer"
    assert_problem(client.post("/api/v1/jobs", json=job_body()), 401)


def test_scopes_are_enforced(client, new_caller) -> None:
    reader = new_caller(scopes=["jobs:read"])
    assert client.get("/api/v1/jobs", headers=reader.headers).status_code == 200
    assert_problem(client.post("/api/v1/jobs", json=job_body(), headers=reader.headers), 403)


def test_another_owners_job_is_404(client, caller, other_caller) -> None:
    job_id = client.post("/api/v1/jobs", json=job_body(), headers=caller.headers).json()["id"]
    for path in ("", "/events?after=0", "/report", "/report.html", "/artifacts", "/artifacts/model.json"):
        assert_problem(client.get(f"/api/v1/jobs/{job_id}{path}", headers=other_caller.headers), 404)
    assert_problem(client.post(f"/api/v1/jobs/{job_id}/cancel", headers=other_caller.headers), 404)
    assert_problem(client.get(f"/v2/models/{job_id}", headers=other_caller.headers), 404)
    assert client.get("/api/v1/jobs", headers=other_caller.headers).json()["items"] == []
    assert_problem(client.get(f"/api/v1/jobs/{uuid.uuid4()}", headers=caller.headers), 404)


def test_cursor_pagination_and_status_filter(client, caller) -> None:
    ids = [
        client.post("/api/v1/jobs", json=job_body(), headers=caller.headers).json()["id"] for _ in range(5)
    ]
    client.post(f"/api/v1/jobs/{ids[0]}/cancel", headers=caller.headers)
    seen, cursor = [], None
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = client.get("/api/v1/jobs", params=params, headers=caller.headers).json()
        seen += [j["id"] for j in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1]
    queued = client.get("/api/v1/jobs", params={"status": "queued"}, headers=caller.headers).json()["items"]
    assert [j["id"] for j in queued] == ids[:0:-1]
    assert_problem(client.get("/api/v1/jobs", params={"cursor": "!!"}, headers=caller.headers), 422)
    assert_problem(client.get("/api/v1/jobs", params={"status": "sleeping"}, headers=caller.headers), 422)


def test_cancel_a_queued_job_and_its_events(client, caller) -> None:
    job_id = client.post("/api/v1/jobs", json=job_body(), headers=caller.headers).json()["id"]
    r = client.post(f"/api/v1/jobs/{job_id}/cancel", headers=caller.headers)
    assert r.status_code == 202 and r.json()["status"] == "cancelled"
    assert_problem(client.post(f"/api/v1/jobs/{job_id}/cancel", headers=caller.headers), 409)
    events = client.get(f"/api/v1/jobs/{job_id}/events", params={"after": 0}, headers=caller.headers).json()
    assert [(e["id"], e["data"]["status"]) for e in events] == [(1, "queued"), (2, "cancelled")]
    assert client.get(f"/api/v1/jobs/{job_id}/events?after=1", headers=caller.headers).json()[0]["id"] == 2
    # SSE of a finished job: every event, then the stream ends; Last-Event-ID resumes after it.
    sse = client.get(f"/api/v1/jobs/{job_id}/events", headers=caller.headers)
    assert sse.headers["content-type"].startswith("text/event-stream")
    assert "id: 1\nevent: status\n" in sse.text and "id: 2\nevent: status\n" in sse.text
    resumed = client.get(f"/api/v1/jobs/{job_id}/events", headers=caller.headers | {"Last-Event-ID": "1"})
    assert "id: 1\n" not in resumed.text and "id: 2\n" in resumed.text
    report = assert_problem(client.get(f"/api/v1/jobs/{job_id}/report", headers=caller.headers), 409)
    assert "cancelled" in report["detail"]
    assert client.get(f"/api/v1/jobs/{job_id}/artifacts", headers=caller.headers).json() == []


def test_unknown_route_and_method_are_problems(client, caller) -> None:
    assert_problem(client.get("/api/v1/nothing-here", headers=caller.headers), 404)
    assert_problem(client.delete("/api/v1/jobs", headers=caller.headers), 405)


def test_health_and_readiness(client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["database"] == "ok"


def test_catalog_lists_every_registry(client, caller) -> None:
    cat = client.get("/api/v1/catalog", headers=caller.headers).json()
    assert "mnist1d" in [d["name"] for d in cat["datasets"]]
    assert "cnn1d" in [a["name"] for a in cat["architectures"]]
    assert {"ce", "cmim"} <= set(cat["objectives"])
    assert "fm" in [a["key"] for a in cat["attacks"]]


def test_broker_down_means_not_ready_but_jobs_are_kept_for_the_sweep(settings, caller) -> None:
    from fastapi.testclient import TestClient

    from app.main import create_app

    down = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})  # nothing listens on port 1
    with TestClient(create_app(down)) as c:
        body = assert_problem(c.get("/readyz"), 503)
        assert body["checks"] == {"database": "ok", "broker": "unreachable"}
        r = c.post("/api/v1/jobs", json=job_body(), headers=caller.headers)
        assert r.status_code == 202
    with session_scope(settings.database_url) as s:
        job = s.get(Job, uuid.UUID(r.json()["id"]))
        assert job.status == "queued" and job.enqueued_at is None  # the worker's sweep will send it
