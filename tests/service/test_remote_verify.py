"""Verifying a suspect served elsewhere, against real third-party servers started as processes: KServe's
ModelServer (an ONNX file through a small model class), MLServer (scikit-learn through its own runtime)
and a plain FastAPI JSON route. A knockoff made through the predict route is called a copy wherever it is
served, an independent model is not; a server that answers 500, the wrong shape, stalls or keeps saying
503 past the query cap gives "could not verify" with the reason and no answers stored; the query cap is
never passed (counted by the servers); the endpoint's headers are stored encrypted and never shown."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from cryptography.fernet import Fernet
from fastapi.testclient import TestClient
from pydantic import ValidationError
from remote_helpers import (
    evidence_owner,
    export_onnx,
    finished,
    fit_sklearn,
    json_server,
    kserve_rows,
    kserve_server,
    mlserver_server,
    start,
    thief_models,
    thief_queries,
)
from service_helpers import Trained, assert_problem, service_settings
from test_evidence_api import DATA

from app.core.config import Settings
from app.core.db import session_scope
from app.core.models import Verification
from app.core.remote import EndpointSpec, Limits, RemoteModel, StoreCache
from app.core.secrets import SecretBox
from app.core.storage import ArtifactStore
from app.main import create_app
from ml.data import load_dataset

POINTS = 512
SECRET_HEADER = "Bearer suspect-api-token-7f3a9c"


@pytest.fixture(scope="module")
def owner(sqlite_url: str, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    return evidence_owner(sqlite_url, tmp_path_factory)


@pytest.fixture(scope="module")
def suspects(owner: Trained) -> dict[str, Path]:
    """The knockoff and an independent model, as ONNX files (torch) and joblib files (scikit-learn)."""
    data = load_dataset("mnist1d", **DATA)
    x, labels = thief_queries(owner)
    knockoff, independent = thief_models(owner)
    folder = owner.tmp / "suspects"
    folder.mkdir()
    shape = tuple(data.input_shape)
    return {
        "knockoff.onnx": export_onnx(knockoff, shape, folder / "knockoff.onnx"),
        "independent.onnx": export_onnx(independent, shape, folder / "independent.onnx"),
        "knockoff.joblib": fit_sklearn(x.numpy(), labels.numpy(), folder / "knockoff.joblib", seed=1),
        "independent.joblib": fit_sklearn(
            data.x_train.numpy(), data.y_train.numpy(), folder / "independent.joblib", seed=2
        ),
    }


def test_kserve_and_mlserver_suspects_are_told_apart(owner: Trained, suspects: dict[str, Path]) -> None:
    onnx = {"knockoff": suspects["knockoff.onnx"], "independent": suspects["independent.onnx"]}
    sk = {"knockoff": suspects["knockoff.joblib"], "independent": suspects["independent.joblib"]}
    verdicts: dict[str, dict[str, Any]] = {}
    with kserve_server(onnx, owner.tmp) as (base, count), mlserver_server(sk, owner.tmp) as ml_base:
        runs = {
            f"kserve/{name}": start(owner, {"url": base, "protocol": "v2", "model": name}) for name in onnx
        } | {
            f"mlserver/{name}": start(
                owner, {"url": ml_base, "protocol": "v2", "model": name, "flatten": True}
            )
            for name in sk
        }
        verdicts = {k: finished(owner, vid) for k, vid in runs.items()}
        # the server's own count: each model was asked the challenge once, nothing more
        assert kserve_rows(count) == {"knockoff": POINTS, "independent": POINTS}
    for k, v in verdicts.items():
        assert v["status"] == "done", (k, v)
        assert v["result"]["queries"] == POINTS and v["requests"] == POINTS // 64, (k, v)
    summary = {k: (v["result"]["verdict"], round(v["result"]["agreement"], 3)) for k, v in verdicts.items()}
    assert verdicts["kserve/knockoff"]["result"]["verdict"] == "copy", summary
    assert verdicts["kserve/independent"]["result"]["verdict"] == "not_shown", summary
    assert verdicts["mlserver/independent"]["result"]["verdict"] == "not_shown", summary
    assert verdicts["mlserver/knockoff"]["result"]["verdict"] == "copy", summary
    assert (
        verdicts["kserve/knockoff"]["result"]["p_value"]
        < 0.01
        <= verdicts["kserve/independent"]["result"]["p_value"]
    )


def test_a_json_route_is_verified_and_its_failures_are_could_not_verify(
    owner: Trained, suspects: dict[str, Path]
) -> None:
    with json_server(suspects["knockoff.onnx"], owner.tmp) as base:
        endpoint = {"url": f"{base}/predict", "protocol": "json", "headers": {"Authorization": SECRET_HEADER}}

        def run(mode: str, **changes: Any) -> tuple[dict[str, Any], int]:
            assert httpx.post(f"{base}/mode", json={"mode": mode}).status_code == 200
            before = int(httpx.get(f"{base}/count").json()["rows"])
            v = finished(owner, start(owner, endpoint | changes))
            return v, int(httpx.get(f"{base}/count").json()["rows"]) - before

        ok, sent = run("ok", template={"request": {"instances": "$inputs"}, "response": "predictions"})
        assert ok["status"] == "done" and ok["result"]["verdict"] == "copy", ok["result"]
        assert sent == POINTS and ok["suspect"]["header_names"] == ["Authorization"]

        failures = {
            "error": ("HTTP 500", {}),
            "shape": ("wrong shape", {}),
            "stall": ("did not answer within", {}),
            "busy": ("query cap", {"max_queries": 600}),  # every batch needs a retry: 1,024 rows > 600
            "ok": ("query cap", {"max_queries": 100}),  # refused before anything is sent
        }
        for mode, (reason, changes) in failures.items():
            v, sent = run(mode, **changes)
            assert v["status"] == "failed" and v["result"]["verdict"] == "could_not_verify", (mode, v)
            assert reason in v["result"]["reason"], (mode, v["result"])
            assert v["bundle"] is None and sent <= changes.get("max_queries", POINTS), (mode, sent)
            r = owner.client.get(
                f"/api/v1/models/{owner.job_id}/verifications/{v['id']}/bundle", headers=owner.headers
            )
            assert_problem(r, 409)
            with session_scope(owner.settings.database_url) as s:
                row = s.get(Verification, uuid.UUID(v["id"]))
                assert row is not None and row.answers is None, mode  # nothing half-stored
        # 503 answered with Retry-After: retried with back-off, and then verified
        v, sent = run("busy")
        assert v["status"] == "done" and v["result"]["verdict"] == "copy" and sent == 2 * POINTS, v
        assert v["requests"] == 2 * POINTS // 64  # every request logged, the 503s too

    # the header's value is stored encrypted, and appears in no response
    with session_scope(owner.settings.database_url) as s:
        rows = s.query(Verification).filter(Verification.kind == "endpoint").all()
        sealed = [r.headers_sealed for r in rows if r.headers_sealed is not None]
    assert sealed and all(SECRET_HEADER.encode() not in b for b in sealed)
    listing = owner.client.get(
        f"/api/v1/models/{owner.job_id}/verifications/{ok['id']}", headers=owner.headers
    )
    assert SECRET_HEADER not in listing.text and "suspect-api-token" not in listing.text


def test_endpoints_are_refused_before_anything_is_asked(owner: Trained) -> None:
    base = f"/api/v1/models/{owner.job_id}/verify"
    for url in ("file:///etc/passwd", "ftp://127.0.0.1/x", "http://"):
        r = owner.client.post(
            base, json={"suspect_endpoint": {"url": url, "model": "m"}}, headers=owner.headers
        )
        assert_problem(r, 422)
    both = {"answers": [0] * POINTS, "suspect_endpoint": {"url": "http://127.0.0.1:9/", "model": "m"}}
    assert_problem(owner.client.post(base, json=both, headers=owner.headers), 422)
    template = {"url": "http://127.0.0.1:9/", "protocol": "json", "template": {"request": {"x": 1}}}
    assert_problem(owner.client.post(base, json={"suspect_endpoint": template}, headers=owner.headers), 422)
    # an operator's allow-list of hosts
    settings = owner.settings.model_copy(update={"remote_allowed_hosts": ["models.example.org"]})
    with TestClient(create_app(settings)) as client:
        r = client.post(
            base,
            json={"suspect_endpoint": {"url": "http://127.0.0.1:9/", "model": "m"}},
            headers=owner.headers,
        )
        assert "allowed hosts" in assert_problem(r, 422)["detail"]
    # a port where nothing listens: connection errors are retried, then could not verify
    v = finished(owner, start(owner, {"url": "http://127.0.0.1:9", "model": "m"}))
    assert v["status"] == "failed" and "could not be reached" in v["result"]["reason"], v


def test_stored_secrets_are_sealed_under_a_kept_key(tmp_path: Path) -> None:
    settings = service_settings("sqlite:///unused.db", tmp_path)
    box = SecretBox.from_settings(settings)
    key_file = Path(settings.secret_key_file)
    assert key_file.stat().st_mode & 0o777 == 0o600  # made once, readable by the service's user only
    sealed = box.seal({"Authorization": SECRET_HEADER})
    assert SECRET_HEADER.encode() not in sealed
    assert SecretBox.from_settings(settings).open(sealed) == {"Authorization": SECRET_HEADER}  # the same key
    other = settings.model_copy(update={"secret_key": Fernet.generate_key().decode()})
    with pytest.raises(ValueError, match="another key"):
        SecretBox.from_settings(other).open(sealed)
    with pytest.raises(ValidationError, match="CMIM_SECRET_KEY must be set in production"):
        Settings(
            environment="production", database_url="postgresql+psycopg://u:p@db/cmim", session_secret="s" * 32
        )


def test_answers_cached_in_the_store_are_not_asked_again(tmp_path: Path) -> None:
    sent: list[int] = []

    def server(request: httpx.Request) -> httpx.Response:
        tensor = json.loads(request.content)["inputs"][0]
        sent.append(tensor["shape"][0])
        return httpx.Response(
            200,
            json={
                "outputs": [{"name": "y", "shape": [tensor["shape"][0]], "data": [1] * tensor["shape"][0]}]
            },
        )

    cache = StoreCache(ArtifactStore.from_settings(service_settings("sqlite:///unused.db", tmp_path)))
    spec = EndpointSpec(url="http://suspect.example", model="m")
    x = np.arange(400, dtype=np.float32).reshape(100, 1, 4)
    first = RemoteModel(spec, Limits(batch=32), cache=cache, transport=httpx.MockTransport(server))
    assert first.labels(x).tolist() == [1] * 100 and sent == [32, 32, 32, 4] and first.sent == 100
    again = RemoteModel(spec, Limits(batch=32), cache=cache, transport=httpx.MockTransport(server))
    assert again.labels(x).tolist() == [1] * 100 and len(sent) == 4 and again.sent == 0
    assert [e["cached"] for e in again.log] == [True] * 4
    assert [e["answer_sha256"] for e in again.log] == [e["answer_sha256"] for e in first.log]
