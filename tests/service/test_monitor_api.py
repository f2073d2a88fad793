"""The monitor across keys in the service: a multi-key fm_edge attack raises alerts that the model's
owner reads at GET /api/v1/models/{id}/alerts; honest keys raise none; other owners get a 404."""

from __future__ import annotations

import re
import uuid
from typing import Any

import pytest
import torch
from service_helpers import Trained, assert_problem, copy_job, job_body, service_settings

from app.core.db import session_scope
from app.core.keys import create_api_key, find_api_key
from ml.data import load_dataset
from ml.monitor_sim import fm_edge_stream

FAST = {"teacher.epochs": 2, "audit.attacks": ["hard_label"], "audit.epochs": 1, "audit.control": False}


@pytest.fixture(scope="module", params=["embedded", "deployed"])
def trained(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """A served model: SQLite with the statistics in process, or PostgreSQL with them in Redis."""
    tmp = tmp_path_factory.mktemp(f"monitor-{request.param}")
    if request.param == "embedded":
        settings = service_settings(request.getfixturevalue("sqlite_url"), tmp)
    else:
        settings = service_settings(
            request.getfixturevalue("postgresql_url"),
            tmp,
            broker_url=request.getfixturevalue("redis_url"),
            redis_prefix=f"cmim-test-{uuid.uuid4().hex[:8]}",
        )
    t = Trained(settings, tmp)
    t.job_id = t.submit(job_body(**FAST))
    return t


def infer(t: Trained, model: str, x: torch.Tensor, headers: dict[str, str]) -> None:
    body = {
        "inputs": [
            {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.flatten().tolist()}
        ]
    }
    r = t.client.post(f"/v2/models/{model}/infer", json=body, headers=headers)
    assert r.status_code == 200, r.text


def alerts(t: Trained, model: str, **params: Any) -> dict[str, Any]:
    t.client.app.state.monitor.flush()  # what the background thread does every usage_flush_seconds
    r = t.client.get(f"/api/v1/models/{model}/alerts", headers=t.headers, params=params)
    assert r.status_code == 200, r.text
    return r.json()


def test_a_16_key_attack_raises_alerts_naming_its_keys(trained: Trained) -> None:
    data = load_dataset("mnist1d", num_train=500, num_test=500)
    model = str(copy_job(trained.settings.database_url, uuid.UUID(trained.job_id)))
    keys = [trained.key(scopes=["models:predict"]) for _ in range(16)]
    for i, x in enumerate(fm_edge_stream(data, 2000, seed=0, batch_size=50)):
        infer(trained, model, x, keys[i % 16])
    got = alerts(trained, model, limit=200)["items"]
    assert got, "no alert after 2000 fm_edge queries (4 passes over the training data) from 16 keys"
    with session_scope(trained.settings.database_url) as s:
        ids = {str(find_api_key(s, k["Authorization"].split()[1]).id) for k in keys}
    named = {k["key_id"] for a in got for k in a["keys"]}
    assert named and named <= ids
    first = got[-1]
    assert first["kind"] in ("key", "model") and first["statistic"] >= first["threshold"] > 0
    assert 0 < first["queries"] <= 2000
    # newest first, bounded pages that chain
    if len(got) > 1:
        page = alerts(trained, model, limit=1)
        assert page["items"][0]["id"] == got[0]["id"] and page["next_cursor"]
        nxt = alerts(trained, model, limit=1, cursor=page["next_cursor"])
        assert nxt["items"][0]["id"] == got[1]["id"]
    # the dashboard's models page lists them with the keys involved
    token = re.search(r'name="csrf" value="([^"]+)"', trained.client.get("/login").text).group(1)
    owner_key = trained.headers["Authorization"].split()[1]
    signed_in = trained.client.post(
        "/login", data={"csrf": token, "key": owner_key}, headers={"Origin": "http://testserver"}
    )
    assert signed_in.status_code == 200, signed_in.text
    page = trained.client.get("/models", params={"id": model})
    trained.client.cookies.clear()
    assert page.status_code == 200 and 'id="alerts"' in page.text
    assert got[0]["keys"][0]["key_id"] in page.text
    # the alert is also an event of the model's job
    r = trained.client.get(f"/api/v1/jobs/{model}/events", headers=trained.headers, params={"after": 0})
    assert r.status_code == 200, r.text
    assert any(e["kind"] == "alert" for e in r.json())


def test_honest_traffic_over_50_keys_raises_no_alert(trained: Trained) -> None:
    data = load_dataset("mnist1d", num_train=500, num_test=2500)
    model = str(copy_job(trained.settings.database_url, uuid.UUID(trained.job_id)))
    keys = [trained.key(scopes=["models:predict"]) for _ in range(50)]
    fresh = data.x_test[500:]  # inputs the calibration never saw (the job's test split is 500)
    for i in range(0, len(fresh), 4):
        infer(trained, model, fresh[i : i + 4], keys[(i // 4) % 50])
    assert alerts(trained, model)["items"] == []


def test_only_the_models_owner_sees_its_alerts(trained: Trained) -> None:
    with session_scope(trained.settings.database_url) as s:
        _, other = create_api_key(s)
    r = trained.client.get(
        f"/api/v1/models/{trained.job_id}/alerts", headers={"Authorization": f"Bearer {other}"}
    )
    assert_problem(r, 404)
    r = trained.client.get(f"/api/v1/models/{uuid.uuid4()}/alerts", headers=trained.headers)
    assert_problem(r, 404)
    predict_only = trained.key(scopes=["models:predict"])
    assert_problem(trained.client.get(f"/api/v1/models/{trained.job_id}/alerts", headers=predict_only), 403)
    for params in ({"limit": 0}, {"limit": 201}, {"cursor": "not-a-cursor"}):
        r = trained.client.get(
            f"/api/v1/models/{trained.job_id}/alerts", headers=trained.headers, params=params
        )
        assert_problem(r, 422)
