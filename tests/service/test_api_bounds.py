"""Every request is bounded and every bad input gets a 4xx problem, never a 500, on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from service_helpers import assert_problem, job_body

from app.services.job_events import MAX_EVENT_ID


def submit(client, caller, body, **headers):  # noqa: ANN001, ANN201
    return client.post("/api/v1/jobs", json=body, headers=caller.headers | headers)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"audit.attacks": ["kd"] * 33}, "attacks"),
        ({"audit.students": ["mlp"] * 9}, "students"),
        ({"audit.ls_eps": [0.0] * 17}, "ls_eps"),
        ({"audit.query_budgets": [10**15]}, "query_budgets"),
        ({"audit.seeds": 101}, "seeds"),
        ({"audit.epochs": 10**6}, "epochs"),
        ({"teacher.seed": 2**70}, "seed"),
        ({"teacher.epochs": 10**6}, "epochs"),
        ({"teacher.log_temperatures": [1.0] * 17}, "log_temperatures"),
    ],
)
def test_lists_and_numbers_over_their_bounds_are_refused(client, caller, change, field) -> None:
    body = assert_problem(submit(client, caller, job_body(**change)), 422)
    assert any(field in map(str, e["loc"]) for e in body["errors"]), body


def test_dataset_parameters_are_bounded(client, caller) -> None:
    r = submit(client, caller, job_body(**{"teacher.dataset_params": {"num_train": 10**9, "num_test": 500}}))
    body = assert_problem(r, 422)
    assert body["errors"][0]["loc"][-1] == "num_train"


def test_the_bounds_are_stated_in_the_openapi(client) -> None:
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    audit, teacher = schemas["AuditConfig"]["properties"], schemas["TeacherSpec"]["properties"]
    assert audit["attacks"]["maxItems"] == 32 and audit["students"]["maxItems"] == 8
    assert audit["ls_eps"]["maxItems"] == 16 and audit["seeds"]["maximum"] == 100
    budgets = next(s for s in audit["query_budgets"]["anyOf"] if s.get("type") == "array")
    assert budgets["maxItems"] == 16 and budgets["items"]["maximum"] == 10**9
    assert teacher["seed"]["maximum"] == 2**31 - 1 and teacher["epochs"]["maximum"] == 100_000
    assert teacher["dataset_params"]["maxProperties"] == 32
    assert teacher["warmup_epochs"]["maximum"] == 100_000
    assert teacher["augmentation"]["anyOf"][0]["maxLength"] == 32


def test_a_job_over_the_cost_ceiling_is_refused_with_its_estimate(client, caller, settings) -> None:
    big = job_body(**{"audit.epochs": 100_000, "audit.seeds": 100, "audit.students": ["mlp"] * 8})
    body = assert_problem(submit(client, caller, big), 422)
    err = body["errors"][0]
    assert err["type"] == "too_costly" and err["ctx"]["estimated_cost"] > settings.max_job_cost
    assert "sample-passes" in body["detail"]
    assert submit(client, caller, job_body()).status_code == 202  # the small job fits


def test_a_json_body_over_the_cap_is_refused_before_it_is_parsed(client, caller, settings) -> None:
    huge = json.dumps(job_body(**{"audit.attacks": ["kd"] * 2_000_000}))
    assert len(huge) > settings.max_json_body_bytes
    r = client.post(
        "/api/v1/jobs", content=huge, headers=caller.headers | {"Content-Type": "application/json"}
    )
    assert "limit" in assert_problem(r, 413)["detail"]

    def chunks():  # no Content-Length: counted as it arrives
        for i in range(0, len(huge), 65536):
            yield huge[i : i + 65536].encode()

    r = client.post(
        "/api/v1/jobs", content=chunks(), headers=caller.headers | {"Content-Type": "application/json"}
    )
    assert_problem(r, 413)


def test_list_items_do_not_echo_the_spec(client, caller) -> None:
    job_id = submit(client, caller, job_body()).json()["id"]
    items = client.get("/api/v1/jobs", headers=caller.headers).json()["items"]
    assert items and all("spec" not in item for item in items)
    assert client.get(f"/api/v1/jobs/{job_id}", headers=caller.headers).json()["spec"]["teacher"]


def test_event_ids_out_of_range_are_422_not_500(client, caller) -> None:
    job_id = submit(client, caller, job_body()).json()["id"]
    path = f"/api/v1/jobs/{job_id}/events"
    assert_problem(client.get(path, params={"after": MAX_EVENT_ID + 1}, headers=caller.headers), 422)
    assert client.get(path, params={"after": MAX_EVENT_ID}, headers=caller.headers).json() == []
    r = client.get(path, headers=caller.headers | {"Last-Event-ID": str(MAX_EVENT_ID + 1)})
    assert_problem(r, 422)
    assert_problem(client.get(path, headers=caller.headers | {"Last-Event-ID": "abc"}), 422)


@pytest.mark.parametrize(
    "raw",
    [
        '["2999-01-01T00:00:00","ffffffff-ffff-ffff-ffff-ffffffffffff"]',  # naive time
        '["2999-01-01T00:00:00+00:00"]',
        '{"a": 1}',
        '["x", "y"]',
        "[" * 5000,
    ],
)
def test_bad_cursors_are_422(client, caller, raw) -> None:
    cursor = base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")
    body = assert_problem(client.get("/api/v1/jobs", params={"cursor": cursor}, headers=caller.headers), 422)
    assert "cursor" in body["detail"]


def test_an_empty_idempotency_key_is_422(client, caller) -> None:
    for _ in range(2):
        assert_problem(submit(client, caller, job_body(), **{"Idempotency-Key": ""}), 422)


def test_too_many_concurrent_uploads_get_503_with_retry_after(client, caller) -> None:
    slots = client.app.state.upload_slots
    taken = 0
    while slots.acquire(blocking=False):  # every slot busy, as if that many uploads were under way
        taken += 1
    try:
        r = client.post(
            "/api/v1/datasets",
            content=b"PK\x03\x04",
            headers=caller.headers | {"Content-Type": "application/octet-stream"},
        )
        assert_problem(r, 503)
        assert r.headers["retry-after"]
        model = client.post("/api/v1/models", files={"file": ("m.onnx", b"x")}, headers=caller.headers)
        assert "uploads are being validated" in assert_problem(model, 503)["detail"]
    finally:
        for _ in range(taken):
            slots.release()
    assert taken == client.app.state.settings.max_concurrent_uploads


def test_an_upload_that_would_expand_past_the_cap_is_refused(caller, settings) -> None:
    from fastapi.testclient import TestClient

    from app.main import create_app

    cap = 1_000_000
    client = TestClient(create_app(settings.model_copy(update={"upload_max_decompressed_bytes": cap})))
    x = np.zeros(
        (cap // 160 + 1, 40), dtype=np.float32
    )  # just over the cap, and compresses to almost nothing
    y = np.zeros(len(x), np.int64)
    buf = io.BytesIO()
    np.savez_compressed(buf, x_train=x, y_train=y, x_test=x[:2], y_test=y[:2])
    assert len(buf.getvalue()) < settings.upload_max_bytes
    r = client.post(
        "/api/v1/datasets",
        content=buf.getvalue(),
        headers=caller.headers | {"Content-Type": "application/octet-stream"},
    )
    assert "expands to" in assert_problem(r, 422)["detail"]


def test_a_non_zip_upload_is_refused_at_its_first_bytes(client, caller) -> None:
    r = client.post(
        "/api/v1/datasets",
        content=b"GIF89a" + b"\0" * 100_000,
        headers=caller.headers | {"Content-Type": "application/octet-stream"},
    )
    assert "not an .npz" in assert_problem(r, 422)["detail"]


def test_a_model_upload_gets_the_upload_cap_not_the_json_cap(caller, settings) -> None:
    from fastapi.testclient import TestClient

    from app.main import create_app

    small_json = settings.model_copy(update={"max_json_body_bytes": 4096})
    client = TestClient(create_app(small_json))
    files = {"file": ("m.onnx", b"\x08\xff not an onnx model" * 1000)}  # 24 kB: over the JSON cap only
    r = client.post("/api/v1/models", files=files, headers=caller.headers)
    assert "not an ONNX model" in assert_problem(r, 422)["detail"]
    big = {"file": ("m.onnx", b"\0" * (settings.upload_max_bytes + 1))}
    r = client.post("/api/v1/models", files=big, headers=caller.headers)
    assert "limit" in assert_problem(r, 413)["detail"]
